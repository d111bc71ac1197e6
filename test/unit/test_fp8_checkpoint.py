"""FP8 checkpoints (layers/quantization/fp8_checkpoint.py): tiny Llama/Qwen3 models written the way
llm-compressor (compressed-tensors) and AutoFP8 (`fp8`) store them, loaded on the CPU.

References: the same model's full-precision checkpoint under `--quantization fp8`, which derives the same
per-channel codes and scales (so its logits must be identical), and transformers with every trunk weight
replaced by its dequantized checkpoint value and every linear input fake-quantized per token.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.layers.quantization.fp8 import FP8_DTYPE, FP8_E4M3_MAX, Fp8Linear, quantize_weight_per_channel
from sglx.srt.layers.quantization.fp8_checkpoint import fp8_checkpoint_config, fp8_checkpoint_weights
from sglx.srt.model_executor.model_runner import ModelRunner
from sglx.srt.server_args import ServerArgs
from sglx.test.runner_utils import PlacedRequests
from test.unit.test_model_families import tiny_hf

TRUNK = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

COMPRESSED_TENSORS = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {"targets": ["Linear"],
                                  "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False,
                                              "symmetric": True},
                                  "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                        "dynamic": True, "symmetric": True}}},
}


def fake_quant_rows(t: torch.Tensor) -> torch.Tensor:
    """What per-token FP8 quantization keeps of t (as test_fp8.py's, which this module must not import: it turns
    Triton's interpreter on, and test/gpu imports this module)."""
    s = t.abs().amax(-1, keepdim=True).clamp_min(1e-10) * (1.0 / FP8_E4M3_MAX)
    return (t * s.reciprocal()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE).float() * s


def _per_tensor(w: torch.Tensor):
    scale = w.float().abs().amax().clamp_min(1e-10) / FP8_E4M3_MAX
    return (w.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE), scale.reshape(())


def write_fp8_checkpoint(hf, out_dir, qconfig, per_tensor=False, keep=(), input_scales=False, scale_dtype=None,
                         block=None):
    """hf's weights as an FP8 checkpoint in `out_dir`; returns {name: dequantized weight} of what was stored in
    FP8. Scales per channel ([N, 1], as llm-compressor writes them), per tensor, or per `block` (as
    `weight_scale_inv`, DeepSeek-V3's name). `keep`: linear names (e.g. "down_proj") stored in full precision
    (and listed as ignored by the caller)."""
    hf.save_pretrained(out_dir)
    for f in os.listdir(out_dir):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(out_dir, f))
    tensors, dequant = {}, {}
    for name, t in hf.state_dict().items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in TRUNK and parts[-2] not in keep:
            if block:
                q, stored, full = _blockwise(t, block)
                tensors[f"{name}_scale_inv"] = stored
            else:
                q, s = _per_tensor(t) if per_tensor else quantize_weight_per_channel(t)
                full = stored = (s if per_tensor else s.reshape(-1, 1)).to(scale_dtype or torch.float32)
                tensors[f"{name}_scale"] = stored
            tensors[name] = q
            if input_scales:
                tensors[name.replace(".weight", ".input_scale")] = torch.tensor(0.05)
            dequant[name] = q.float() * full.float()
        else:
            tensors[name] = t.contiguous()
    if getattr(hf.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = qconfig
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return dequant


def runner_of(path, quantization=None) -> ModelRunner:
    sa = ServerArgs(model_path=path, tokenizer_path=path, device="cpu", max_total_tokens=2048,
                    quantization=quantization)
    return ModelRunner(ModelConfig.from_path(path, dtype="float32"), sa)


def transformers_reference(hf, dequant, prompts):
    """Logits of transformers with the checkpoint's dequantized weights, and the inputs of the linears stored
    in FP8 fake-quantized per token."""
    with torch.no_grad():
        for name, w in dequant.items():
            hf.get_parameter(name).copy_(w)
            linear = hf.get_submodule(name[: -len(".weight")])
            linear.register_forward_pre_hook(lambda mod, args: (fake_quant_rows(args[0]),))
        return [hf(torch.tensor([list(p)])).logits[0, -1] for p in prompts]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_compressed_tensors_per_channel_loads_as_stored(tmp_path, arch):
    hf = tiny_hf(arch).eval()
    full, ckpt = str(tmp_path / "full"), str(tmp_path / "fp8")
    hf.save_pretrained(full)
    dequant = write_fp8_checkpoint(hf, ckpt, COMPRESSED_TENSORS, input_scales=True, scale_dtype=torch.bfloat16
                                   if arch == "llama" else None)
    runner = runner_of(ckpt)
    layers = runner.model.model.layers
    assert all(isinstance(m, Fp8Linear) for l in layers
               for m in (l.self_attn.qkv_proj, l.self_attn.o_proj, l.mlp.gate_up_proj, l.mlp.down_proj))
    assert all(l.input_layernorm.quant_fp8 and l.mlp.act_fn.quant_fp8 for l in layers)
    qkv = layers[0].self_attn.qkv_proj
    q_rows = qkv.shard_offsets["q"][1]
    want_q = quantize_weight_per_channel(hf.model.layers[0].self_attn.q_proj.weight)[0]
    assert torch.equal(qkv.weight[:q_rows].view(torch.uint8), want_q.view(torch.uint8))  # the stored codes

    reqs = PlacedRequests(runner, [7, 30, 1], 96, room=2)
    got = reqs.prefill()
    if arch == "qwen3":  # fp32 scales: online quantization of the full checkpoint derives the same codes and scales
        online = runner_of(full, "fp8")
        same = PlacedRequests(online, [7, 30, 1], 96, room=2)
        same.prompts = reqs.prompts
        for g, o in zip(got, same.prefill()):
            assert torch.equal(g, o)
    want = transformers_reference(hf, dequant, reqs.prompts)
    with torch.no_grad():
        plain = [tiny_hf(arch).eval()(torch.tensor([list(p)])).logits[0, -1] for p in reqs.prompts]
    for i in range(3):
        torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-5)
        near, far = (got[i] - want[i]).abs().max().item(), (got[i] - plain[i]).abs().max().item()
        assert far > 10 * near, (near, far)  # the unquantized model is much farther: the test can fail


def test_fp8_per_tensor_and_ignored_layers(tmp_path):
    """AutoFP8's `fp8` method: one scale per tensor (repeated on every row), a layer kept in full precision
    by the ignore list."""
    hf = tiny_hf("llama").eval()
    ckpt = str(tmp_path / "fp8")
    qc = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head", "down_proj"]}
    dequant = write_fp8_checkpoint(hf, ckpt, qc, per_tensor=True, keep=("down_proj",), input_scales=True)
    runner = runner_of(ckpt)
    layer = runner.model.model.layers[0]
    assert isinstance(layer.self_attn.o_proj, Fp8Linear) and type(layer.mlp.down_proj) is nn.Linear
    assert not layer.mlp.act_fn.quant_fp8  # its consumer is not FP8: the activation stays in the serving dtype
    scale = layer.self_attn.o_proj.weight_scale
    assert bool((scale == scale[0]).all())
    reqs = PlacedRequests(runner, [9, 17], 96, room=2)
    got = reqs.prefill()
    assert not any(n.endswith("down_proj.weight") for n in dequant)
    for g, w in zip(got, transformers_reference(hf, dequant, reqs.prompts)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


class _Cfg:
    def __init__(self, qc):
        self.quantization_config = qc


@pytest.mark.parametrize("qc,needle", [
    ({"quant_method": "fp8", "weight_block_size": [0, 128]}, "not a positive size"),
    ({"quant_method": "awq", "bits": 4}, "awq"),
    ({**COMPRESSED_TENSORS, "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}},
     "8-bit float"),
    ({**COMPRESSED_TENSORS, "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "group"}}}},
     "per-channel"),
    ({**COMPRESSED_TENSORS, "format": "pack-quantized"}, "format"),
])
def test_unsupported_quantized_checkpoints_are_refused_by_name(qc, needle):
    with pytest.raises(ValueError, match=needle):
        fp8_checkpoint_config(_Cfg(qc))
    assert fp8_checkpoint_config(_Cfg(None)) is None
    assert fp8_checkpoint_config(_Cfg(COMPRESSED_TENSORS)).scheme == "channel"


def _blockwise(w: torch.Tensor, block):
    """DeepSeek-V3's scheme: one scale per block (amax / 448), codes = w / scale; partial edge blocks."""
    rows, cols = block
    n, k = w.shape
    scale = torch.zeros(-(-n // rows), -(-k // cols))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols].float()
            scale[i, j] = tile.abs().amax().clamp_min(1e-10) / FP8_E4M3_MAX
    full = scale.repeat_interleave(rows, 0)[:n].repeat_interleave(cols, 1)[:, :k]
    return (w.float() / full).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE), scale, full


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_blockwise_fp8_is_dequantized_as_it_loads(tmp_path, quantization):
    """`fp8` with weight_block_size (DeepSeek-V3, Qwen3 -FP8): no block-scaled GEMM yet, so the codes times their
    block's scale load as full-precision weights (32 x 32 blocks here, partial at the edges of 80 and 48), and
    --quantization fp8 quantizes them per channel again."""
    hf = tiny_hf("qwen3").eval()
    ckpt = str(tmp_path / "fp8")
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
    dequant = write_fp8_checkpoint(hf, ckpt, qc, block=(32, 32))
    runner = runner_of(ckpt, quantization)
    qkv = runner.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Fp8Linear) == (quantization == "fp8")
    reqs = PlacedRequests(runner, [7, 30, 1], 96, room=2)
    got = reqs.prefill()
    with torch.no_grad():
        for name, w in dequant.items():
            hf.get_parameter(name).copy_(fake_quant_rows(w) if quantization else w)
            if quantization:
                hf.get_submodule(name[: -len(".weight")]).register_forward_pre_hook(
                    lambda mod, args: (fake_quant_rows(args[0]),))
        want = [hf(torch.tensor([list(p)])).logits[0, -1] for p in reqs.prompts]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_weight_and_scale_pairing():
    w = torch.ones(3, 16).to(FP8_DTYPE)
    out = list(fp8_checkpoint_weights([("a.weight_scale", torch.tensor(2.0)), ("b.bias", torch.ones(3)),
                                       ("a.weight", w), ("a.input_scale", torch.tensor(1.0))]))
    assert [n for n, _ in out] == ["b.bias", "a.weight", "a.weight_scale"]
    assert out[2][1].tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="not both"):
        list(fp8_checkpoint_weights([("a.weight", w)]))
    with pytest.raises(ValueError, match="rows"):
        list(fp8_checkpoint_weights([("a.weight", w), ("a.weight_scale", torch.ones(2, 1))]))


def test_fp8_weights_into_a_full_precision_layer_fail_loudly(tmp_path):
    """A checkpoint whose ignore list does not match how it stores a layer: loading never reinterprets e4m3
    codes as values (or values as codes)."""
    hf = tiny_hf("llama").eval()
    ckpt = str(tmp_path / "fp8")
    qc = {**COMPRESSED_TENSORS, "ignore": ["lm_head", "re:.*o_proj"]}  # o_proj is stored in FP8 all the same
    write_fp8_checkpoint(hf, ckpt, qc)
    with pytest.raises(ValueError, match="dtype"):
        runner_of(ckpt)
