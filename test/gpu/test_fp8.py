"""FP8 W8A8 (`--quantization fp8`) on CUDA:
  * the Triton per-token quantization equals the torch reference bit for bit (scales and e4m3 codes), and
    fused into RMSNorm and SiLU-and-mul it equals the unfused kernels followed by it (up to rare one-step flips);
  * Fp8Linear's GEMMs (torch._scaled_mm, and sgl_kernel's fp8_scaled_mm where it imports) equal the reference
    product of the same quantized operands;
  * a whole model: CUDA-graph decode replays match eager, and embeddings (Qwen3-0.6B shape) agree between the
    skip-KV and the cache path and stay close to the bf16 model's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sglx.srt.layers.quantization.fp8 import Fp8Linear, per_token_quant_fp8_ref, scaled_mm_ref
from sglx.test.runner_utils import PlacedRequests

from test_model_runner_gpu import LLAMA, QWEN3_06B, embed_once, llama_dir, make_runner  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an FP8 GPU (sm89+)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 16), (7, 1000), (4097, 3072), (300, 6144)])
def test_quant_kernel_matches_reference(dtype, shape):
    from sglx.srt.layers.quantization import fp8_kernels

    m, k = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    wide = torch.randn(m, k + 32, device="cuda", generator=gen) * torch.logspace(-4, 4, m, device="cuda")[:, None]
    x = wide.to(dtype)[:, :k]  # strided rows
    if m > 3:
        x[3] = 0
    q, s = fp8_kernels.per_token_quant_fp8(x)
    rq, rs = per_token_quant_fp8_ref(x)
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


def assert_same_quantization(got, want: torch.Tensor) -> None:
    """The fused kernel's Fp8Activation against the unfused kernel's output quantized by the reference. The two
    are separately compiled kernels, so an fp32 ulp (FMA contraction) can flip a bf16 rounding of the norm or
    activation now and then, and with it one e4m3 code: at most 1 in 10^4 dequantized values may differ, each by
    at most one e4m3 step (1/8 of its row's largest value)."""
    rq, rs = per_token_quant_fp8_ref(want)
    a, b = got.q.float() * got.scale, rq.float() * rs
    diff = a != b
    print(f"fused vs unfused: {diff.sum().item()} of {diff.numel()} dequantized values differ")
    assert diff.float().mean().item() <= 1e-4
    if diff.any():
        assert ((a - b).abs() <= 0.13 * b.abs().amax(-1, keepdim=True))[diff].all()


@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_producers_match_unfused_then_quant(with_residual):
    from sglx.srt.layers.triton_ops import fused_elementwise as fe

    torch.manual_seed(0)
    x = torch.randn(4099, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(1024, device="cuda", dtype=torch.bfloat16) + 0.5
    r = torch.randn_like(x) if with_residual else None
    want = fe.rmsnorm(x, w, 1e-6, None if r is None else r.clone())
    got = fe.rmsnorm(x, w, 1e-6, None if r is None else r.clone(), quant_fp8=True)
    if with_residual:
        (want, want_res), (got, got_res) = want, got
        assert torch.equal(got_res, want_res)
    assert_same_quantization(got, want)
    g = torch.randn(4099, 2 * 3072, device="cuda", dtype=torch.bfloat16)
    assert_same_quantization(fe.silu_and_mul(g, quant_fp8=True), fe.silu_and_mul(g))


def _gemms():
    from sglx.srt.layers.quantization.fp8 import _sgl_kernel_fp8_gemm_available

    # Called at collection, also where there is no GPU (the module is skipped there, but collected).
    cuda = torch.cuda.is_available()
    return ["torch"] + (["sgl_kernel"] if cuda and _sgl_kernel_fp8_gemm_available(torch.device("cuda")) else [])


def test_default_gemm_is_sgl_kernel_where_it_runs():
    lin = torch.nn.Linear(64, 32, device="cuda", dtype=torch.bfloat16)
    assert Fp8Linear.from_linear(lin).gemm == _gemms()[-1]


@pytest.mark.parametrize("gemm", _gemms())
@pytest.mark.parametrize("m", [1, 5, 16, 4097])
@pytest.mark.parametrize("bias", [False, True])
def test_scaled_mm_matches_reference(gemm, m, bias, monkeypatch):
    from sglx.srt.layers.quantization.fp8 import FP8_GEMM_ENV

    monkeypatch.setenv(FP8_GEMM_ENV, gemm)
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 3072 + 16, bias=bias, device="cuda", dtype=torch.bfloat16)
    fp8 = Fp8Linear.from_linear(lin)
    assert fp8.gemm == gemm
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    got = fp8(x).float()
    qx, sx = per_token_quant_fp8_ref(x)
    want = scaled_mm_ref(qx, sx, fp8.weight, fp8.weight_scale, torch.float32)
    if bias:
        want = want + lin.bias.float()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)  # bf16 output rounding
    exact = lin(x).float()
    assert ((got - exact).norm() / exact.norm()).item() < 0.05  # FP8's own error, against the bf16 layer


def test_cuda_graph_replay_matches_eager_fp8(llama_dir):
    runner = make_runner(llama_dir, attention_backend="fa3", page_size=16, cuda_graph_max_bs=8, quantization="fp8")
    assert any(isinstance(m, Fp8Linear) for m in runner.model.modules())
    graphs = runner.cuda_graph_runner
    reqs = PlacedRequests(runner, [5, 300, 77, 1000, 12, 64], LLAMA["vocab_size"], room=20)
    reqs.prefill()
    for which in ([0], [1, 2, 3], list(range(6))):
        batch = reqs.decode_batch(which)
        runner.cuda_graph_runner = None
        want = runner.forward(batch).next_token_logits.clone()
        runner.cuda_graph_runner = graphs
        got = runner.forward(batch).next_token_logits
        torch.testing.assert_close(got, want, atol=5e-2, rtol=2e-2)
        for i, t in zip(which, got.argmax(-1).tolist()):
            reqs.last_tokens[i] = t


def test_fp8_embeddings_skip_equals_cache_and_stay_close_to_bf16():
    lens = [500, 1200, 37, 3000]
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 151669, (n,), generator=gen).tolist() for n in lens]
    kw = dict(is_embedding=True, disable_radix_cache=True, attention_backend="fa3", max_total_tokens=16384)

    def embed(**extra):
        runner = make_runner(QWEN3_06B, **kw, **extra)
        out = embed_once(runner, seqs).cpu()
        del runner
        torch.cuda.empty_cache()
        return out

    skip, cache = embed(quantization="fp8"), embed(quantization="fp8", disable_embedding_skip_kv_cache=True)
    bf16 = embed()
    same = F.cosine_similarity(skip, cache, dim=-1)
    close = F.cosine_similarity(skip, bf16, dim=-1)
    print(f"fp8 skip vs cache {same.tolist()}; fp8 vs bf16 {close.tolist()}")
    assert same.min().item() >= 0.999
    assert close.min().item() >= 0.98


def test_an_fp8_checkpoint_loads_on_cuda(tmp_path):
    """A compressed-tensors FP8 checkpoint (tiny Qwen3, written by test/unit/test_fp8_checkpoint.py's helper)
    through the GPU's FP8 GEMM: logits close to the same weights' full-precision checkpoint under
    --quantization fp8, which derives the same codes and scales."""
    from sglx.srt.configs.model_config import ModelConfig
    from sglx.srt.model_executor.model_runner import ModelRunner
    from sglx.srt.server_args import ServerArgs
    from test.unit.test_fp8_checkpoint import COMPRESSED_TENSORS, write_fp8_checkpoint
    from test.unit.test_model_families import tiny_hf

    hf = tiny_hf("qwen3").eval().to(torch.bfloat16)
    full, ckpt = tmp_path / "full", tmp_path / "fp8"
    hf.save_pretrained(str(full))
    write_fp8_checkpoint(hf, str(ckpt), COMPRESSED_TENSORS)

    def logits(path, quantization):
        # torch_native: the tiny model's head dim (24) is not one flashinfer's kernels build for.
        sa = ServerArgs(model_path=str(path), tokenizer_path=str(path), device="cuda", max_total_tokens=4096,
                        mem_fraction_static=0.3, quantization=quantization, disable_cuda_graph=True,
                        attention_backend="torch_native")
        runner = ModelRunner(ModelConfig.from_path(str(path), device="cuda"), sa)
        assert any(isinstance(m, Fp8Linear) for m in runner.model.modules())
        reqs = PlacedRequests(runner, [7, 30, 1], 96, room=2, seed=3)
        return torch.stack([t.float() for t in reqs.prefill()])

    got, want = logits(ckpt, None), logits(full, "fp8")
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
