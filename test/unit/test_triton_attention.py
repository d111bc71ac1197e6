"""The `triton` attention backend against `torch_native`, on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported: @triton.jit picks the interpreter at decoration time,
i.e. when sglx's triton_ops module is first imported (which happens lazily, inside the backend's factory).
Shapes are tiny and fp32; the reference is the torch_native backend run on an identical copy of the KV pool,
so the fused KV store is checked too (the pools must end up equal).
"""

from __future__ import annotations

from sglx.test.triton_interpreter import use_triton_interpreter

triton = use_triton_interpreter("sglx.srt.layers.attention.triton_ops.extend_attention", "_extend_kernel")

import copy  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import List, Optional, Sequence, Tuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sglx.srt.layers.attention.registry import create_attention_backend  # noqa: E402
from sglx.srt.layers.attention.triton_backend import build_kv_indices  # noqa: E402
from sglx.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglx.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglx.srt.model_executor.forward_batch import ForwardBatch, ForwardMode  # noqa: E402


def _interpreter_problem() -> Optional[str]:
    try:
        import triton.language as tl

        # What the kernels rely on: dot products, and loop bounds loaded from memory (triton 3.6's interpreter
        # fails on those with numpy >= 2.4: "only 0-dimensional arrays can be converted to Python scalars").
        @triton.jit
        def _probe(x_ptr, n_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs)
            acc = tl.sum(tl.dot(tl.reshape(x, (16, 16)), tl.reshape(x, (16, 16))), 0).sum()
            for _ in range(0, tl.load(n_ptr)):
                acc += 1.0
            tl.store(x_ptr + offs, acc + x)

        t = torch.ones(256)
        _probe[(1,)](t, torch.tensor([3], dtype=torch.int32), BLOCK=256)
        return None if t[0] == 4100 else f"probe kernel computed {t[0].item()} instead of 4100"
    except Exception as e:  # pragma: no cover - only where the interpreter is broken
        return repr(e)[:200]


_problem = _interpreter_problem()
if _problem is not None:
    pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run the kernels here: {_problem}",
                allow_module_level=True)  # fmt: skip


# ============================================================================ batch builder
@dataclass
class Case:
    lens: Sequence[Tuple[int, int]]  # (cached prefix, new tokens) per request
    mode: ForwardMode
    page_size: int = 1
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 64
    window: int = -1
    logit_cap: float = 0.0
    causal: bool = True
    dtype: torch.dtype = torch.float32
    device: str = "cpu"


def build(case: Case, seed: int = 0):
    """A real pool + req_to_token with scattered pages, random cached prefixes, and this step's q/k/v."""
    g = torch.Generator().manual_seed(seed)
    ps, dev = case.page_size, case.device
    pages_needed = sum(-(-(p + e) // ps) for p, e in case.lens)
    n_pages = pages_needed + 3
    pool = MHATokenToKVPool(n_pages * ps, ps, case.dtype, case.kv_heads, case.head_dim, 1, dev)
    r2t = ReqToTokenPool(len(case.lens) + 1, max(p + e for p, e in case.lens) + 4, dev)
    free_pages = (torch.randperm(n_pages, generator=g) + 1).tolist()  # page 0 is padding; order scrambled
    rows, new_locs = [], []
    for p, e in case.lens:
        row = r2t.alloc()
        n = p + e
        pages = [free_pages.pop() for _ in range(-(-n // ps))]
        slots = torch.tensor([pages[i // ps] * ps + i % ps for i in range(n)], dtype=torch.int64)
        r2t.write(row, 0, slots.to(dev))
        if p:
            kp = torch.randn(p, case.kv_heads, case.head_dim, generator=g).to(dev, case.dtype)
            vp = torch.randn(p, case.kv_heads, case.head_dim, generator=g).to(dev, case.dtype)
            pool.set_kv_buffer(0, slots[:p].to(dev), kp, vp)
        rows.append(row)
        new_locs.append(slots[p:])
    T = sum(e for _, e in case.lens)
    q = torch.randn(T, case.heads * case.head_dim, generator=g).to(dev, case.dtype)
    k = torch.randn(T, case.kv_heads * case.head_dim, generator=g).to(dev, case.dtype)
    v = torch.randn(T, case.kv_heads * case.head_dim, generator=g).to(dev, case.dtype)
    fb = make_fb(case, rows, torch.cat(new_locs).to(dev), r2t, pool)
    layer = RadixAttention(case.heads, case.head_dim, case.head_dim**-0.5, case.kv_heads, 0,
                           logit_cap=case.logit_cap, sliding_window_size=case.window, is_causal=case.causal)  # fmt: skip
    return fb, layer, q, k, v


def make_fb(case: Case, rows: List[int], out_cache_loc, r2t, pool) -> ForwardBatch:
    dev = case.device
    prefix = [p for p, _ in case.lens]
    ext = [e for _, e in case.lens]
    seq = [p + e for p, e in case.lens]
    starts = [sum(ext[:i]) for i in range(len(ext))]

    def t(x):
        return torch.tensor(x, dtype=torch.int64, device=dev)

    return ForwardBatch(
        forward_mode=case.mode, batch_size=len(rows), input_ids=t([0] * sum(ext)),
        positions=torch.cat([torch.arange(p, s) for p, s in zip(prefix, seq)]).to(dev),
        req_pool_indices=t(rows), seq_lens=t(seq), out_cache_loc=out_cache_loc, seq_lens_cpu=seq,
        extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=ext, extend_prefix_lens=t(prefix),
        extend_seq_lens=t(ext), extend_start_loc=t(starts), req_to_token_pool=r2t, token_to_kv_pool=pool,
        attn_backend=None,
    )  # fmt: skip


def run_backend(name: str, fb: ForwardBatch, layer, q, k, v, save_kv_cache: bool = True):
    backend = create_attention_backend(name, SimpleNamespace(device=torch.device(fb.seq_lens.device)))
    fb.attn_backend = backend
    backend.init_forward_metadata(fb)
    out = q.new_empty(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)
    res = backend.forward(q, k, v, layer, fb, out=out, save_kv_cache=save_kv_cache)
    assert res.data_ptr() == out.data_ptr(), "the backend must return the caller's buffer"
    return res


def compare(case: Case, seed: int = 0, atol: float = 1e-4) -> None:
    fb, layer, q, k, v = build(case, seed)
    fb_ref = copy.copy(fb)
    fb_ref.token_to_kv_pool = copy.deepcopy(fb.token_to_kv_pool)
    got = run_backend("triton", fb, layer, q, k, v)
    want = run_backend("torch_native", fb_ref, layer, q, k, v)
    torch.testing.assert_close(got, want, atol=atol, rtol=atol)
    kb, vb = fb.token_to_kv_pool.get_kv_buffer(0)
    kr, vr = fb_ref.token_to_kv_pool.get_kv_buffer(0)
    assert torch.equal(kb, kr) and torch.equal(vb, vr), "fused KV store differs from set_kv_buffer"


# ============================================================================ tests
E, D, M = ForwardMode.EXTEND, ForwardMode.DECODE, ForwardMode.MIXED


@pytest.mark.parametrize(
    "case",
    [
        Case([(0, 5), (0, 17), (0, 37)], E, page_size=1, heads=4, kv_heads=4),
        Case([(0, 9), (0, 33)], E, page_size=16, heads=8, kv_heads=2),
        Case([(7, 5), (20, 17), (0, 3)], E, page_size=16, heads=4, kv_heads=4),
        Case([(11, 9), (31, 2)], E, page_size=1, heads=8, kv_heads=2),
        Case([(5, 1), (12, 20), (30, 1)], M, page_size=16, heads=8, kv_heads=2),
    ],
    ids=["prefill-p1-g1", "prefill-p16-g4", "prefix-p16-g1", "prefix-p1-g4", "mixed-p16-g4"],
)
def test_extend_matches_torch_native(case: Case):
    compare(case)


@pytest.mark.parametrize(
    "case",
    [
        Case([(4, 1), (39, 1), (17, 1)], D, page_size=1, heads=8, kv_heads=2),
        Case([(0, 1), (22, 1), (35, 1)], D, page_size=16, heads=4, kv_heads=4),
    ],
    ids=["decode-p1-g4", "decode-p16-g1"],
)
def test_decode_matches_torch_native(case: Case):
    compare(case)


@pytest.mark.parametrize("mode", [E, D])
def test_sliding_window_and_soft_cap(mode):
    # prefix 40 > window + block: the kernel's skip of whole blocks below the window is exercised too
    lens = [(40, 5), (13, 20), (3, 6)] if mode == E else [(40, 1), (5, 1)]
    compare(Case(lens, mode, page_size=16, heads=8, kv_heads=2, window=7, logit_cap=2.0))


def test_non_causal_extend():
    compare(Case([(0, 6), (0, 35)], E, heads=4, kv_heads=2, causal=False))


def test_head_dim_not_power_of_two():
    compare(Case([(9, 7), (0, 4)], E, page_size=16, heads=4, kv_heads=2, head_dim=48))
    compare(Case([(9, 1), (25, 1)], D, page_size=16, heads=4, kv_heads=2, head_dim=48))


def test_extend_reads_new_tokens_from_pool_when_k_is_none():
    case = Case([(10, 6), (0, 21)], E, page_size=16, heads=8, kv_heads=2)
    fb, layer, q, k, v = build(case)
    kv = (k.view(-1, 2, 64), v.view(-1, 2, 64))
    fb.token_to_kv_pool.set_kv_buffer(0, fb.out_cache_loc, *kv)  # the caller stored them already
    got = run_backend("triton", fb, layer, q, None, None, save_kv_cache=False)
    want = run_backend("torch_native", fb, layer, q, None, None, save_kv_cache=False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_skip_kv_cache_never_touches_the_pool():
    """Embedding serving (fb.skip_kv_cache, NoOpKVPool): raw k/v only; reference = the normal cached path."""
    from sglx.srt.mem_cache.memory_pool import NoOpKVPool

    for causal in (True, False):
        case = Case([(0, 7), (0, 30)], E, heads=8, kv_heads=2, causal=causal)
        fb, layer, q, k, v = build(case)
        want = run_backend("torch_native", copy.copy(fb), layer, q, k, v)
        fb.token_to_kv_pool, fb.skip_kv_cache = NoOpKVPool(), True  # any read of it raises
        got = run_backend("triton", fb, layer, q, k, v)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_decode_split_k_with_empty_splits():
    """More KV splits than some requests have tokens: partial softmaxes must merge, empty ones be skipped."""
    from sglx.srt.layers.attention import triton_ops

    case = Case([(2, 1), (38, 1), (20, 1)], D, page_size=1, heads=8, kv_heads=2)
    fb, layer, q, k, v = build(case)
    want = run_backend("torch_native", fb, layer, q, k, v)  # also stores k/v for the direct call below
    backend = create_attention_backend("triton", SimpleNamespace(device=torch.device("cpu")))
    backend.init_forward_metadata(fb)
    meta = backend.forward_metadata
    part_o, part_lse = triton_ops.decode_scratch(3, 8, 7, 64, torch.device("cpu"))
    out = torch.full_like(want, float("nan")).view(3, 8, 64)
    kb, vb = fb.token_to_kv_pool.get_kv_buffer(0)
    triton_ops.decode_attention_fwd(q.view(3, 8, 64), kb, vb, out, meta.kv_indptr, meta.kv_indices,
                                    part_o, part_lse, layer.scaling)  # fmt: skip
    torch.testing.assert_close(out.view(3, -1), want, atol=1e-4, rtol=1e-4)
    assert torch.isinf(part_lse[0, :, 3:]).all(), "request 0 has 3 tokens: splits 3..6 must be empty"


def _qkv_column_views(q, k, v):
    """q, k, v as column slices of one [T, q + k + v + 8] tensor: rows a whole qkv width apart, not adjacent
    (the layout models hand over: slices of the fused qkv projection, never copied)."""
    qkv = torch.cat([q, k, v, torch.full_like(q[:, :8], float("nan"))], dim=-1)
    views = qkv[:, : -8].split([q.shape[1], k.shape[1], v.shape[1]], dim=-1)
    assert not any(x.is_contiguous() for x in views)
    return views


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
@pytest.mark.parametrize(
    "case",
    [
        Case([(0, 5), (0, 17)], E, page_size=1, heads=8, kv_heads=2),
        Case([(7, 5), (20, 17), (0, 3)], E, page_size=16, heads=4, kv_heads=4),
        Case([(4, 1), (39, 1), (17, 1)], D, page_size=1, heads=8, kv_heads=2),
        Case([(0, 1), (22, 1)], D, page_size=16, heads=4, kv_heads=2, head_dim=48),
    ],
    ids=["prefill-p1-g4", "prefix-p16-g1", "decode-p1-g4", "decode-p16-d48"],
)
def test_row_strided_qkv_views_match_contiguous(backend, case):
    """Backends take q/k/v as row-strided column views: same output and same KV pool as contiguous copies."""
    fb, layer, q, k, v = build(case)
    fb_ref = copy.copy(fb)
    fb_ref.token_to_kv_pool = copy.deepcopy(fb.token_to_kv_pool)
    qs, ks, vs = _qkv_column_views(q, k, v)
    if backend == "triton":  # the strided store must take the fused kernel, not set_kv_buffer
        from sglx.srt.layers.attention.triton_ops import can_fuse_store

        k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(0)
        heads = (-1, case.kv_heads, case.head_dim)
        assert can_fuse_store(ks.view(heads), k_buf, vs.view(heads), v_buf)
    got = run_backend(backend, fb, layer, qs, ks, vs)
    want = run_backend(backend, fb_ref, layer, q, k, v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(fb.token_to_kv_pool.get_kv_buffer(0), fb_ref.token_to_kv_pool.get_kv_buffer(0)):
        assert torch.equal(a, b), "the KV store of strided k/v differs"


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
def test_row_strided_qkv_views_skip_kv_cache(backend):
    """The raw-k/v embedding path (no pool) on strided views."""
    from sglx.srt.mem_cache.memory_pool import NoOpKVPool

    fb, layer, q, k, v = build(Case([(0, 7), (0, 30)], E, heads=8, kv_heads=2, causal=False))
    fb.token_to_kv_pool, fb.skip_kv_cache = NoOpKVPool(), True
    want = run_backend(backend, copy.copy(fb), layer, q, k, v)
    got = run_backend(backend, fb, layer, *_qkv_column_views(q, k, v))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_build_kv_indices_matches_loop():
    r2t = torch.randint(0, 10_000, (5, 1200), dtype=torch.int32)
    rows, lens = torch.tensor([3, 1, 4]), torch.tensor([5, 0, 1100])  # 1100 > the kernel's 512-wide block
    indptr, indices = torch.zeros(4, dtype=torch.int32), torch.full((1105,), -1, dtype=torch.int32)
    build_kv_indices(r2t, rows, lens, 1100, indptr, indices)
    assert indptr.tolist() == [0, 5, 5, 1105]
    assert indices.tolist() == r2t[3, :5].tolist() + r2t[4, :1100].tolist()


def test_cuda_graph_metadata_path_matches_eager():
    """The static-buffer (CUDA-graph) decode metadata gives the same result as eager metadata."""
    case = Case([(6, 1), (27, 1)], D, page_size=16, heads=4, kv_heads=2)
    fb, layer, q, k, v = build(case)
    want = run_backend("triton", fb, layer, q, k, v)
    runner = SimpleNamespace(device=torch.device("cpu"), req_to_token_pool=fb.req_to_token_pool)
    backend = create_attention_backend("triton", runner)
    backend.init_cuda_graph_state(max_bs=4)
    backend.init_forward_metadata_capture_cuda_graph(2, 2, fb.req_pool_indices, fb.seq_lens, D)
    backend.init_forward_metadata_replay_cuda_graph(2, fb.req_pool_indices, fb.seq_lens, 35, D, fb.seq_lens_cpu)
    out = torch.empty_like(want)
    backend.forward(q, None, None, layer, fb, out=out, save_kv_cache=False)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_factory_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        create_attention_backend("triton", SimpleNamespace(device=torch.device("cpu")))
