"""Each supported decoder family's forward against transformers' on tiny random models (fp32, CPU).

Prefill of three prompts and two decode steps through the ModelRunner (torch_native backend): the last-position
logits must match transformers' full forward over the same tokens. Qwen3 covers the per-head q/k norms, Qwen2
the qkv biases, qwen3-yarn YaRN rope scaling.
"""

from __future__ import annotations

import pytest
import torch

from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.model_executor.model_runner import ModelRunner
from sglx.srt.server_args import ServerArgs
from sglx.test.runner_utils import PlacedRequests


def tiny_hf(arch: str):
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=False))
    if arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=False))
        with torch.no_grad():  # random init leaves biases at zero: make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        return model
    rope = {}
    if arch == "qwen3-yarn":  # YaRN from a 64-token original context: the ramp and attention factor both act
        rope = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                    "rope_theta": 10000.0}}
    model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=24, tie_word_embeddings=True, **rope))
    with torch.no_grad():  # norm weights start at one: make the q/k norms count
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.normal_(1, 0.3)
            layer.self_attn.k_norm.weight.normal_(1, 0.3)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3-yarn"])
def test_forward_matches_transformers(tmp_path, arch):
    check_forward(tmp_path, arch, "cpu")


def check_forward(tmp_path, arch: str, device: str, tol: float = 1e-4, **server_kw) -> None:
    """Prefill and two decode steps of the tiny `arch` on `device` against transformers' forward on the CPU."""
    hf = tiny_hf(arch).eval()
    hf.save_pretrained(str(tmp_path))
    sa = ServerArgs(model_path=str(tmp_path), tokenizer_path=str(tmp_path), device=device, max_total_tokens=2048,
                    **server_kw)
    runner = ModelRunner(ModelConfig.from_path(str(tmp_path), dtype="float32"), sa)
    reqs = PlacedRequests(runner, [7, 30, 1], 96, room=4)

    def want(i: int, tokens) -> torch.Tensor:
        with torch.no_grad():
            return hf(torch.tensor([tokens])).logits[0, -1]

    got = reqs.prefill().cpu()
    seqs = [list(p) for p in reqs.prompts]
    for i, s in enumerate(seqs):
        torch.testing.assert_close(got[i], want(i, s), rtol=tol, atol=tol)
    for _ in range(2):
        for i, t in enumerate(reqs.last_tokens):
            seqs[i].append(t)
        got = runner.forward(reqs.decode_batch([0, 1, 2])).next_token_logits.cpu()
        for i, s in enumerate(seqs):
            torch.testing.assert_close(got[i], want(i, s), rtol=tol, atol=tol)
        reqs.last_tokens = got.argmax(-1).tolist()
