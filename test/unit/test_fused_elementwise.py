"""The fused elementwise Triton kernels (RMSNorm, act-and-mul, rotary, q/k norm + rotary) on CPU through
Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported: @triton.jit picks the interpreter at decoration time,
i.e. when sglx's fused_elementwise module is first imported. The launch wrappers are called directly on small
CPU tensors with odd sizes; references are the layers' own torch paths (which CPU serving runs) and plain torch
formulas written out here.
"""

from __future__ import annotations

from sglx.test.triton_interpreter import use_triton_interpreter

triton = use_triton_interpreter("sglx.srt.layers.triton_ops.fused_elementwise", "_rmsnorm_kernel")

import pytest  # noqa: E402
import torch  # noqa: E402

from sglx.srt.layers import layernorm, rotary_embedding  # noqa: E402
from sglx.srt.layers.activation import GeluAndMul, SiluAndMul  # noqa: E402
from sglx.srt.layers.layernorm import RMSNorm  # noqa: E402
from sglx.srt.layers.rotary_embedding import RotaryEmbedding  # noqa: E402
from sglx.srt.layers.triton_ops import fused_elementwise as fe  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _assert_match(got: torch.Tensor, want: torch.Tensor, max_frac: float = 0.0) -> None:
    """fp32: equal to a few ulp (summation order, rsqrt and exp implementations differ). Half types: equal,
    except at most max_frac of the elements may differ, and then by at most two rounding steps (an fp32 ulp in a
    transcendental or a reduction can flip a bf16 rounding of the normalized/activated value, which the product
    with the weight/up rounds again)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
        return
    diff = got != want
    frac = diff.float().mean().item()
    assert frac <= max_frac, f"{diff.sum().item()} of {got.numel()} elements differ"
    if diff.any():
        eps = torch.finfo(want.dtype).eps
        torch.testing.assert_close(got.float(), want.float(), rtol=2 * eps, atol=eps * 1e-3)


def _norm_formula(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return (w.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# ============================================================================ RMSNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_matches_module(dtype, with_residual):
    layer = RMSNorm(72, eps=1e-5).to(dtype)
    layer.weight.data = _rand(72, seed=1, scale=0.5).to(dtype) + 1
    x, res = _rand(11, 72, dtype=dtype, seed=2), _rand(11, 72, dtype=dtype, seed=3, scale=4.0)
    if with_residual:
        want_out, want_res = layer(x.clone(), res.clone())  # CPU: the torch path
        res_in = res.clone()
        got_out, got_res = fe.rmsnorm(x, layer.weight, 1e-5, res_in)
        assert got_res is res_in, "the residual is updated in place and returned"
        assert torch.equal(got_res, x + res), "s = x + residual, rounded to the dtype like torch's add"
        _assert_match(got_out, want_out, max_frac=0.01)
        src = (x + res)
    else:
        want_out = layer(x)
        got_out = fe.rmsnorm(x, layer.weight, 1e-5)
        _assert_match(got_out, want_out, max_frac=0.01)
        src = x
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got_out.float(), _norm_formula(src, layer.weight, 1e-5).float(), rtol=tol, atol=tol)


def test_rmsnorm_fp32_weight_bf16_input_promotes_like_torch():
    w = _rand(40, seed=4) + 1  # fp32 weight: torch's `weight * x.to(bf16)` is fp32
    x = _rand(3, 40, dtype=torch.bfloat16, seed=5)
    layer = RMSNorm(40)
    layer.weight.data = w
    got = fe.rmsnorm(x, w, 1e-6)
    assert got.dtype == torch.float32
    _assert_match(got, layer(x), max_frac=0.02)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 24])
def test_rmsnorm_per_head_on_strided_views(dtype, head_dim):
    # Qwen3's q/k norm: per-head norm of q, a column slice of a qkv tensor, seen as [tokens, heads, head_dim]
    # (row stride = qkv width, not heads * head_dim). The module gets the reshaped copy, the kernel the view.
    n, heads, kv_heads = 7, 3, 1
    qkv = _rand(n, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=6)
    qkv_before = qkv.clone()
    q = qkv[:, : heads * head_dim]
    layer = RMSNorm(head_dim).to(dtype)
    layer.weight.data = _rand(head_dim, seed=7).to(dtype)
    want = layer(q.reshape(-1, head_dim)).view(n, heads, head_dim)
    got = fe.rmsnorm(q.view(n, heads, head_dim), layer.weight, 1e-6)
    _assert_match(got, want, max_frac=0.02)
    got2 = fe.rmsnorm(q.reshape(-1, head_dim), layer.weight, 1e-6)  # the model's call, contiguous
    _assert_match(got2.view(n, heads, head_dim), want, max_frac=0.02)
    got4 = fe.rmsnorm(q.view(1, n, heads, head_dim), layer.weight, 1e-6)  # > 3 dims
    _assert_match(got4[0], want, max_frac=0.02)
    # a 2-D slice with a row stride > width, with a residual that is a transposed (non-viewable) tensor
    x = qkv[:, head_dim : 2 * head_dim]
    res = _rand(head_dim, n, dtype=dtype, seed=8).t()
    want_out, want_res = layer(x.clone(), res.clone())
    got_out, got_res = fe.rmsnorm(x, layer.weight, 1e-6, res)
    assert got_res is res and torch.equal(res, want_res)
    _assert_match(got_out, want_out, max_frac=0.02)
    assert torch.equal(qkv, qkv_before), "the input must not be written"


# ============================================================================ act and mul
def _silu_mul_formula(x: torch.Tensor) -> torch.Tensor:
    g, u = x.double().chunk(2, dim=-1)
    return (g / (1 + torch.exp(-g)) * u).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = _rand(9, 2 * 72, dtype=dtype, seed=10, scale=3.0)
    got = fe.silu_and_mul(x)
    _assert_match(got, SiluAndMul()(x), max_frac=0.01)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), _silu_mul_formula(x).float(), rtol=tol, atol=tol)
    # strided input (a column slice) and extra leading dims; output written into a given buffer
    wide = _rand(2, 5, 2 * 72 + 8, dtype=dtype, seed=11, scale=3.0)
    xs = wide[..., 4 : 4 + 2 * 72]
    out = torch.empty(2, 5, 72, dtype=dtype)
    assert fe.silu_and_mul(xs, out=out) is out
    _assert_match(out, SiluAndMul()(xs), max_frac=0.01)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_and_mul(dtype, approximate):
    x = _rand(6, 2 * 40, dtype=dtype, seed=12, scale=3.0)
    got = fe.gelu_and_mul(x, approximate)
    _assert_match(got, GeluAndMul(approximate)(x), max_frac=0.02)
    g, u = x.double().chunk(2, dim=-1)
    if approximate == "tanh":
        ref = 0.5 * g * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (g + 0.044715 * g**3))) * u
    else:
        ref = 0.5 * g * (1 + torch.erf(g / 2**0.5)) * u
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


def test_act_and_mul_empty_batch():
    assert fe.silu_and_mul(torch.empty(0, 16)).shape == (0, 8)


# ============================================================================ rotary
def _rope_formula(x: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor, head_dim: int, neox: bool):
    """fp32 rotation rounded once: the kernel's contract."""
    n, rot = x.shape[0], cache.shape[-1]
    h = x.float().reshape(n, -1, head_dim).clone()
    cos, sin = cache[pos].chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    if neox:
        x1, x2 = h[..., : rot // 2].clone(), h[..., rot // 2 : rot].clone()
        h[..., : rot // 2], h[..., rot // 2 : rot] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    else:
        x1, x2 = h[..., 0:rot:2].clone(), h[..., 1:rot:2].clone()
        h[..., 0:rot:2], h[..., 1:rot:2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return h.reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(16, 16), (24, 24), (24, 12)], ids=["d16", "d24", "d24-partial"])
def test_rotary_inplace_on_qkv_slices(dtype, neox, head_dim, rotary_dim):
    n, heads, kv_heads = 6, 3, 2
    rope = RotaryEmbedding(head_dim, rotary_dim, max_position=64, base=10000.0, is_neox_style=neox)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = _rand(n, q_size + 2 * kv_size, dtype=dtype, seed=20)
    pos = torch.tensor([0, 5, 63, 17, 1, 40], dtype=torch.int64)
    before = qkv.clone()
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    want_q, want_k = rope(pos, q.clone(), k.clone())  # CPU: the module's torch path (copies)
    want_q32 = _rope_formula(q, pos, rope.cos_sin_cache, head_dim, neox)
    want_k32 = _rope_formula(k, pos, rope.cos_sin_cache, head_dim, neox)
    got_q, got_k = fe.rotary_embedding_(pos, q, k, head_size=head_dim, cos_sin_cache=rope.cos_sin_cache,
                                        is_neox_style=neox)  # fmt: skip
    assert got_q is q and got_k is k
    # in place: qkv's q and k columns changed, v and the dims past rotary_dim did not
    assert torch.equal(qkv[:, q_size + kv_size :], before[:, q_size + kv_size :])
    for got, old in ((q, before[:, :q_size]), (k, before[:, q_size : q_size + kv_size])):
        tail = lambda t: t.reshape(n, -1, head_dim)[..., rotary_dim:]  # noqa: E731
        assert torch.equal(tail(got), tail(old))
    assert torch.equal(q, want_q32) and torch.equal(k, want_k32), "fp32 math rounded once"
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # the torch path rounds cos/sin and each product to bf16
    torch.testing.assert_close(q.float(), want_q.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(k.float(), want_k.float(), rtol=tol, atol=tol)


def test_rotary_3d_views_int32_positions_and_no_k():
    head_dim = 16
    rope = RotaryEmbedding(head_dim, head_dim, max_position=32, base=500.0)
    q = _rand(4, 2, head_dim, seed=21)
    pos = torch.tensor([3, 0, 31, 7], dtype=torch.int32)
    want = _rope_formula(q.reshape(4, -1), pos.long(), rope.cos_sin_cache, head_dim, True).view(4, 2, head_dim)
    got_q, got_k = fe.rotary_embedding_(pos, q, None, head_dim, rope.cos_sin_cache)
    assert got_k is None and got_q is q
    torch.testing.assert_close(q, want, rtol=0, atol=0)


def test_rotary_rejects_bad_shapes():
    cache = torch.zeros(8, 16)
    with pytest.raises(ValueError):
        fe.rotary_embedding_(torch.zeros(2, dtype=torch.long), torch.zeros(2, 20), None, 16, cache)
    with pytest.raises(ValueError):  # rotary_dim > head_size
        fe.rotary_embedding_(torch.zeros(2, dtype=torch.long), torch.zeros(2, 8), None, 8, cache)


# ============================================================================ q/k norm + rotary
QK_SHAPES = [(128, 128), (128, 64), (64, 64), (80, 80)]  # (head_dim, rotary_dim)


def _qk_case(dtype, head_dim, rotary_dim, neox, hq, hk, n=5, seed=30):
    """A qkv tensor (with two spare columns past v), positions, the rope and q/k norm layers."""
    rope = RotaryEmbedding(head_dim, rotary_dim, max_position=64, base=10000.0, is_neox_style=neox)
    q_norm, k_norm = RMSNorm(head_dim, eps=1e-6).to(dtype), RMSNorm(head_dim, eps=1e-6).to(dtype)
    q_norm.weight.data = _rand(head_dim, seed=seed + 1, scale=0.3).to(dtype) + 1
    k_norm.weight.data = _rand(head_dim, seed=seed + 2, scale=0.3).to(dtype) + 1
    qkv = _rand(n, (hq + 2 * hk) * head_dim + 2, dtype=dtype, seed=seed, scale=3.0)
    pos = torch.tensor([0, 5, 63, 17, 40, 1, 9][:n], dtype=torch.int64)
    return rope, q_norm, k_norm, qkv, pos


def _split(qkv, hq, hk, head_dim):
    return qkv[:, : (hq + 2 * hk) * head_dim].split([hq * head_dim, hk * head_dim, hk * head_dim], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("head_dim,rotary_dim", QK_SHAPES, ids=[f"d{d}-r{r}" for d, r in QK_SHAPES])
@pytest.mark.parametrize("hq,hk", [(4, 2), (3, 3)], ids=["gqa", "mha"])
def test_qk_norm_rope_inplace_on_qkv_slices(dtype, neox, head_dim, rotary_dim, hq, hk):
    rope, q_norm, k_norm, qkv, pos = _qk_case(dtype, head_dim, rotary_dim, neox, hq, hk)
    n, before = qkv.shape[0], qkv.clone()
    q, k, _ = _split(qkv, hq, hk, head_dim)
    # (a) the unfused kernels chained: per-head rmsnorm (new tensors), then the in-place rotation
    cq = fe.rmsnorm(q.view(n, hq, head_dim), q_norm.weight, 1e-6).view(n, -1)
    ck = fe.rmsnorm(k.view(n, hk, head_dim), k_norm.weight, 1e-6).view(n, -1)
    fe.rotary_embedding_(pos, cq, ck, head_dim, rope.cos_sin_cache, neox)
    # (b) the torch path CPU serving runs: RMSNorm._norm per head, then the module's rotation
    tq = q_norm(q.reshape(-1, head_dim)).view(n, -1)
    tk = k_norm(k.reshape(-1, head_dim)).view(n, -1)
    tq, tk = rope(pos, tq, tk)
    assert torch.equal(qkv, before), "the references must not have written qkv"

    got_q, got_k = fe.qk_norm_rope_(pos, q, k, q_norm.weight, k_norm.weight, 1e-6, head_dim, rope.cos_sin_cache,
                                    is_neox_style=neox)  # fmt: skip
    assert got_q is q and got_k is k
    assert torch.equal(q, cq) and torch.equal(k, ck), "must equal rmsnorm then rotary_embedding_, bit for bit"
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # as the rotary test: the torch path rounds cos/sin to bf16
    torch.testing.assert_close(q, tq, rtol=tol, atol=tol)
    torch.testing.assert_close(k, tk, rtol=tol, atol=tol)
    width = (hq + hk) * head_dim
    assert torch.equal(qkv[:, width:], before[:, width:]), "v and the columns past it must be untouched"
    assert not torch.equal(qkv[:, :width], before[:, :width])


@pytest.mark.parametrize("hq,hk", [(10, 3), (3, 10)])
def test_qk_norm_rope_several_head_blocks(hq, hk):
    # head_dim 128 -> 8 heads per program: q and/or k span several blocks, the last one partly masked
    rope, q_norm, k_norm, qkv, pos = _qk_case(torch.bfloat16, 128, 128, True, hq, hk, n=3)
    q, k, _ = _split(qkv, hq, hk, 128)
    want_q = fe.rmsnorm(q.view(3, hq, 128), q_norm.weight, 1e-6).view(3, -1)
    want_k = fe.rmsnorm(k.view(3, hk, 128), k_norm.weight, 1e-6).view(3, -1)
    fe.rotary_embedding_(pos, want_q, want_k, 128, rope.cos_sin_cache)
    before = qkv.clone()
    fe.qk_norm_rope_(pos, q, k, q_norm.weight, k_norm.weight, 1e-6, 128, rope.cos_sin_cache)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(qkv[:, (hq + hk) * 128 :], before[:, (hq + hk) * 128 :])


def test_qk_norm_rope_3d_views_and_int32_positions():
    rope, q_norm, k_norm, qkv, pos = _qk_case(torch.float32, 64, 32, True, 2, 1, n=4)
    q3 = qkv[:, :128].view(4, 2, 64)  # [n, heads, head_size] views are accepted too
    k3 = qkv[:, 128:192].view(4, 1, 64)
    want_q = fe.rmsnorm(q3, q_norm.weight, 1e-6)
    want_k = fe.rmsnorm(k3, k_norm.weight, 1e-6)
    fe.rotary_embedding_(pos, want_q, want_k, 64, rope.cos_sin_cache)
    fe.qk_norm_rope_(pos.int(), q3, k3, q_norm.weight, k_norm.weight, 1e-6, 64, rope.cos_sin_cache)
    assert torch.equal(q3, want_q) and torch.equal(k3, want_k)


def test_qk_norm_rope_refuses_what_it_cannot_do_in_place():
    cache = torch.zeros(8, 16)
    pos = torch.zeros(2, dtype=torch.long)
    q, k = torch.zeros(2, 32, dtype=torch.bfloat16), torch.zeros(2, 16, dtype=torch.bfloat16)
    w = torch.ones(16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="in place"):  # bf16 x * fp32 weight is fp32 in torch
        fe.qk_norm_rope_(pos, q, k, w.float(), w, 1e-6, 16, cache)
    with pytest.raises(ValueError, match="share a dtype"):
        fe.qk_norm_rope_(pos, q, k.float(), w, w, 1e-6, 16, cache)
    with pytest.raises(ValueError, match="head_size"):
        fe.qk_norm_rope_(pos, q, k, torch.ones(8, dtype=torch.bfloat16), w, 1e-6, 16, cache)
    with pytest.raises(ValueError):  # rotary_dim > head_size
        fe.qk_norm_rope_(pos, q.view(2, 4, 8), k.view(2, 2, 8), w[:8], w[:8], 1e-6, 8, cache)


def _fused_on(monkeypatch, module=rotary_embedding):
    """Route `module`'s layers to the fused kernels on CPU tensors (the interpreter runs them); count calls."""
    calls = []
    monkeypatch.setattr(module, "fused_ops", lambda t: calls.append(t) or fe)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_layer_helper_dispatch(monkeypatch, dtype):
    hq, hk, d = 4, 2, 64
    rope, q_norm, k_norm, qkv, pos = _qk_case(dtype, d, d, True, hq, hk)
    q, k, _ = _split(qkv, hq, hk, d)
    want_q, want_k = rotary_embedding.qk_norm_rope(pos, q, k, q_norm, k_norm, rope)  # CPU: the torch layers
    assert want_q.data_ptr() != q.data_ptr(), "the CPU path returns new tensors"
    _fused_on(monkeypatch)
    got_q, got_k = rotary_embedding.qk_norm_rope(pos, q, k, q_norm, k_norm, rope)
    assert got_q is q and got_k is k, "fused: in place on the qkv slices"
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got_q, want_q, rtol=tol, atol=tol)
    torch.testing.assert_close(got_k, want_k, rtol=tol, atol=tol)

    # What the kernel can't do in place, or modules it does not implement, take the unfused layers.
    class ScaledRope(RotaryEmbedding):
        pass

    sub = ScaledRope(d, d, 64, 10000.0)
    sub.cos_sin_cache = rope.cos_sin_cache
    q, k, _ = _split(qkv.clone(), hq, hk, d)
    assert rotary_embedding.qk_norm_rope(pos, q, k, q_norm, k_norm, sub)[0] is not q
    if dtype == torch.bfloat16:
        k_norm.weight.data = k_norm.weight.data.float()  # bf16 * fp32 -> fp32: not in place
        assert rotary_embedding.qk_norm_rope(pos, q, k, q_norm, k_norm, rope)[0] is not q


def test_qwen3_forward_with_fused_qk_norm_rope_matches_transformers(tmp_path, monkeypatch):
    """The model's wiring: Qwen3 on the fused q/k norm + rotary kernel (in place on qkv's slices, v passed as a
    strided view) through the runner, prefill and decode, against transformers (torch_native attention)."""
    pytest.importorskip("transformers")
    from test.unit.test_model_families import test_forward_matches_transformers

    calls = _fused_on(monkeypatch)
    test_forward_matches_transformers(tmp_path, "qwen3")
    assert calls, "the fused path was not taken"


# ============================================================================ the layers' switch
def test_layers_use_torch_path_on_cpu(monkeypatch):
    assert layernorm.fused_ops(torch.zeros(2)) is None
    cuda_like = type("T", (), {"is_cuda": True})()
    monkeypatch.setenv(layernorm.DISABLE_ENV, "1")
    assert layernorm.fused_ops(cuda_like) is None
    monkeypatch.setenv(layernorm.DISABLE_ENV, "0")
    assert layernorm.fused_ops(cuda_like) is fe
