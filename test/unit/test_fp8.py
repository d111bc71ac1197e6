"""`--quantization fp8` on the CPU: the Triton kernels through Triton's interpreter, and whole models through the
torch path, against plain-torch formulas written out here.

  * per-token quantization: the kernel equals the reference bit for bit (scales and e4m3 codes), including
    rounding ties, zero rows and strided rows; the reference equals torch's own fp8 cast;
  * RMSNorm (with and without residual) and SiLU-and-mul fused with the quantization equal the unfused kernel
    followed by the quantization;
  * Fp8Linear equals the dequantized product; quantize_model_fp8 converts the trunk's linears, not the lm_head,
    and fuses the input quantization into the layers before them;
  * tiny Llama and Qwen3 models served with fp8 match transformers' model with the same fake quantization (and
    not the unquantized model); the real default model keeps its greedy tokens.
"""

from __future__ import annotations

from sglx.test.triton_interpreter import use_triton_interpreter

triton = use_triton_interpreter("sglx.srt.layers.quantization.fp8_kernels", "_per_token_quant_fp8_kernel")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from sglx.srt.configs.model_config import ModelConfig  # noqa: E402
from sglx.srt.layers import quantization  # noqa: E402
from sglx.srt.layers.activation import SiluAndMul  # noqa: E402
from sglx.srt.layers.layernorm import RMSNorm  # noqa: E402
from sglx.srt.layers.quantization import fp8_kernels  # noqa: E402
from sglx.srt.layers.quantization.fp8 import (  # noqa: E402
    Fp8Activation,
    Fp8Linear,
    per_token_quant_fp8_ref,
    quantize_model_fp8,
)
from sglx.srt.layers.triton_ops import fused_elementwise as fe  # noqa: E402
from sglx.srt.model_executor.model_runner import ModelRunner  # noqa: E402
from sglx.srt.server_args import ServerArgs  # noqa: E402
from sglx.test.runner_utils import PlacedRequests  # noqa: E402

E4M3 = torch.float8_e4m3fn


def fake_quant_rows(t: torch.Tensor) -> torch.Tensor:
    """What FP8 per-row quantization keeps of t, written out plainly: scale = amax * (1/448) (a multiply, not a
    division: bf16 inputs land on rounding ties often enough that a one-ulp different scale flips codes),
    then torch's e4m3 cast of t times the scale's reciprocal (likewise)."""
    s = t.abs().amax(-1, keepdim=True).clamp_min(1e-10) * (1.0 / 448.0)
    return (t * s.reciprocal()).clamp(-448.0, 448.0).to(E4M3).float() * s


def _rows(m, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k + 8, generator=g) * torch.logspace(-4, 4, m)[:, None]
    return x.to(dtype)[:, :k]  # strided rows


def _same_codes(q: torch.Tensor, want: torch.Tensor) -> None:
    assert q.dtype == E4M3 and q.shape == want.shape
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8)), \
        f"{(q.view(torch.uint8) != want.view(torch.uint8)).sum().item()} e4m3 codes differ"


# ============================================================================ the quantization kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 16), (9, 100), (5, 300)])
def test_per_token_kernel_matches_reference(dtype, m, k):
    x = _rows(m, k, dtype)
    if m > 2:
        x[2] = 0  # an all-zero row: zero codes, the floor scale
    q, s = fp8_kernels.per_token_quant_fp8(x)
    rq, rs = per_token_quant_fp8_ref(x)
    assert s.shape == (m, 1) and torch.equal(s, rs)
    _same_codes(q, rq)
    torch.testing.assert_close(q.float() * s, fake_quant_rows(x.float()), rtol=0, atol=0)


def test_rounding_ties_go_to_even_and_subnormals_round():
    """A row whose amax is 448 has scale exactly 1, so the kernel rounds the values themselves: every midpoint
    between neighbouring e4m3 values (normal and subnormal) must go to the even code, as torch's cast does."""
    codes = torch.arange(0, 126, dtype=torch.uint8).view(E4M3).float()  # 0 .. 448, ascending
    mids = (codes[:-1] + codes[1:]) / 2
    row = torch.cat([mids, -mids, torch.tensor([448.0, 1e-4, -3e-3])])[None, :]
    q, s = fp8_kernels.per_token_quant_fp8(row)
    assert s.item() == 1.0
    _same_codes(q, row.to(E4M3))
    assert torch.all(q.view(torch.uint8)[0, : len(mids)] % 2 == 0)  # ties to the even code


# ============================================================================ fused producers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_quant_equals_rmsnorm_then_quant(dtype, with_residual):
    x, w = _rows(7, 96, dtype, seed=1), (torch.rand(96) + 0.5).to(dtype)
    r = _rows(7, 96, dtype, seed=2).contiguous() if with_residual else None
    want = fe.rmsnorm(x, w, 1e-6, None if r is None else r.clone())
    got = fe.rmsnorm(x, w, 1e-6, None if r is None else r.clone(), quant_fp8=True)
    if with_residual:
        (want, want_res), (got, got_res) = want, got
        assert torch.equal(got_res, want_res)
    assert isinstance(got, Fp8Activation) and got.dtype == dtype
    rq, rs = per_token_quant_fp8_ref(want)
    assert torch.equal(got.scale, rs)
    _same_codes(got.q, rq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_quant_equals_silu_and_mul_then_quant(dtype):
    x = _rows(6, 2 * 80, dtype, seed=3)
    want = fe.silu_and_mul(x)
    got = fe.silu_and_mul(x, quant_fp8=True)
    assert isinstance(got, Fp8Activation) and got.q.shape == (6, 80)
    rq, rs = per_token_quant_fp8_ref(want)
    assert torch.equal(got.scale, rs)
    _same_codes(got.q, rq)


def test_layers_emit_fp8_activations_only_when_asked():
    norm, act = RMSNorm(32), SiluAndMul()
    x = torch.randn(3, 32)
    assert isinstance(norm(x), torch.Tensor) and isinstance(act(x), torch.Tensor)
    norm.quant_fp8 = act.quant_fp8 = True
    out, res = norm(x, torch.randn(3, 32))
    assert isinstance(out, Fp8Activation) and isinstance(act(x), Fp8Activation)


# ============================================================================ the linear layer and the model pass
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_is_the_dequantized_product(bias):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=bias)
    fp8 = Fp8Linear.from_linear(lin)
    assert fp8.weight.dtype == E4M3 and fp8.weight_scale.shape == (48,)
    x = torch.randn(2, 5, 64)
    want = fake_quant_rows(x).double() @ fake_quant_rows(lin.weight.detach()).double().t()
    if bias:
        want = want + lin.bias.detach().double()
    got = fp8(x)
    assert got.shape == (2, 5, 48)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert (got - lin(x)).abs().max() > 1e-3  # it really is quantized
    pre = Fp8Activation(*per_token_quant_fp8_ref(x.reshape(10, 64)), x.dtype)
    assert torch.equal(fp8(pre), got.reshape(10, 48))  # a pre-quantized input gives the same product


def _tiny_runner(tmp_path, arch, quant):
    from test.unit.test_model_families import tiny_hf

    hf = tiny_hf(arch).eval()
    hf.save_pretrained(str(tmp_path))
    sa = ServerArgs(model_path=str(tmp_path), tokenizer_path=str(tmp_path), device="cpu", max_total_tokens=2048,
                    quantization=quant)
    return hf, ModelRunner(ModelConfig.from_path(str(tmp_path), dtype="float32"), sa)


def _fake_quantize_hf(hf) -> None:
    """transformers' model with fp8's arithmetic simulated: every trunk linear's weight and input fake-quantized
    per row (the lm_head left alone)."""
    for layer in hf.model.layers:
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                with torch.no_grad():
                    m.weight.copy_(fake_quant_rows(m.weight))
                m.register_forward_pre_hook(lambda mod, args: (fake_quant_rows(args[0]),))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_model_matches_transformers_with_fake_quantization(tmp_path, arch):
    hf, runner = _tiny_runner(tmp_path, arch, "fp8")
    layers = runner.model.model.layers
    assert all(isinstance(m, Fp8Linear) for l in layers
               for m in (l.self_attn.qkv_proj, l.self_attn.o_proj, l.mlp.gate_up_proj, l.mlp.down_proj))
    assert all(l.input_layernorm.quant_fp8 and l.post_attention_layernorm.quant_fp8 and l.mlp.act_fn.quant_fp8
               for l in layers)
    assert not runner.model.model.norm.quant_fp8
    assert not any(isinstance(m, Fp8Linear) for m in (getattr(runner.model, "lm_head", None),))
    reqs = PlacedRequests(runner, [7, 30, 1], 96, room=2)
    got = reqs.prefill()
    with torch.no_grad():
        plain = [hf(torch.tensor([list(p)])).logits[0, -1] for p in reqs.prompts]
        _fake_quantize_hf(hf)
        want = [hf(torch.tensor([list(p)])).logits[0, -1] for p in reqs.prompts]
    for i in range(3):
        torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-5)
        near, far = (got[i] - want[i]).abs().max().item(), (got[i] - plain[i]).abs().max().item()
        assert far > 10 * near, (near, far)  # the unquantized model is much farther: the test can fail


def test_fused_and_unfused_input_quantization_give_the_same_logits(tmp_path):
    _, runner = _tiny_runner(tmp_path, "llama", "fp8")
    reqs = PlacedRequests(runner, [11, 4], 96, room=2)
    fused = reqs.prefill_batch()
    want = runner.forward(fused).next_token_logits.clone()
    for m in runner.model.modules():
        if getattr(m, "quant_fp8", False):
            m.quant_fp8 = False  # each Fp8Linear now quantizes its own input
    assert torch.equal(runner.forward(fused).next_token_logits, want)


def test_quantize_model_keeps_unaligned_linears_and_lm_head():
    model = nn.Module()
    model.a, model.b, model.lm_head = nn.Linear(32, 48), nn.Linear(30, 48), nn.Linear(32, 64)
    assert quantize_model_fp8(model) == 1
    assert isinstance(model.a, Fp8Linear) and type(model.b) is nn.Linear and type(model.lm_head) is nn.Linear


# ============================================================================ the flag
def test_server_args_name_the_choices():
    with pytest.raises(ValueError, match="--quantization must be one of fp8"):
        ServerArgs(device="cpu", quantization="int3")
    assert ServerArgs(device="cpu", quantization="fp8").quantization == "fp8"


def test_gemm_choice(monkeypatch):
    from sglx.srt.layers.quantization.fp8 import FP8_GEMM_ENV, choose_fp8_gemm

    cpu = torch.device("cpu")
    assert choose_fp8_gemm(cpu) == "reference" and Fp8Linear.from_linear(nn.Linear(16, 16)).gemm == "reference"
    monkeypatch.setenv(FP8_GEMM_ENV, "cublas")
    with pytest.raises(ValueError, match="must be auto or one of sgl_kernel, torch, reference"):
        choose_fp8_gemm(cpu)
    for name in ("torch", "sgl_kernel"):
        monkeypatch.setenv(FP8_GEMM_ENV, name)
        with pytest.raises(RuntimeError, match=f"{FP8_GEMM_ENV}={name}"):
            choose_fp8_gemm(cpu)


def test_gpu_without_fp8_refused_at_start(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(RuntimeError, match="compute capability 8.9 or newer"):
        quantization.check_device_support("fp8", torch.device("cuda", 0))
    quantization.check_device_support("fp8", torch.device("cpu"))  # the torch reference runs anywhere


def test_default_model_keeps_its_greedy_tokens():
    """SmolLM2-135M (the real GGUF) with fp8 against itself unquantized: the next-token distributions stay
    close (KL) and the greedy choices agree, over a few prompts."""
    from sglx.srt.hf_transformers_utils import get_tokenizer

    texts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return", "1, 2, 3, 4, 5,"]
    logits = {}
    for quant in (None, "fp8"):
        sa = ServerArgs(device="cpu", max_total_tokens=1024, quantization=quant)
        runner = ModelRunner(ModelConfig.from_path(sa.model_path, device="cpu"), sa)
        prompts = [get_tokenizer(sa.tokenizer_path).encode(t) for t in texts]
        reqs = PlacedRequests(runner, [len(p) for p in prompts], runner.model_config.vocab_size, room=1)
        reqs.prompts = prompts
        logits[quant] = reqs.prefill()
    p, q = logits[None].log_softmax(-1), logits["fp8"].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)  # 0.008-0.023 nats when written
    assert kl.max().item() < 0.05, kl
    assert torch.equal(logits["fp8"].argmax(-1), logits[None].argmax(-1))
    assert not torch.equal(logits["fp8"], logits[None])


def test_encoder_embeddings_under_fp8_stay_close():
    """all-MiniLM-L6-v2 (a BERT encoder, the real checkpoint) served with fp8: each embedding within cosine 0.99
    of the unquantized one, and the pairwise similarities a user ranks by within 0.03 (0.9973-0.9983 and 0.012
    when written)."""
    from sglx.srt.hf_transformers_utils import get_tokenizer
    from test.unit.test_embedding_model import embed, make_runner, minilm_path

    path = minilm_path()
    tok = get_tokenizer(path)
    texts = ["A man is eating food.", "The new movie is awesome", "Quantum computers use qubits to compute.",
             "I love playing football with my friends on weekends.", "Paris is the capital of France."]
    seqs = [tok.encode(t) for t in texts]
    out = {}
    for quant in (None, "fp8"):
        runner = make_runner(path, skip=True, quantization=quant)
        assert any(isinstance(m, Fp8Linear) for m in runner.model.modules()) == (quant == "fp8")
        out[quant] = embed(runner, seqs)
    cos = torch.nn.functional.cosine_similarity(out[None], out["fp8"], dim=-1)
    assert cos.min().item() > 0.99, cos
    assert (out[None] @ out[None].t() - out["fp8"] @ out["fp8"].t()).abs().max().item() < 0.03
    assert not torch.equal(out[None], out["fp8"])
