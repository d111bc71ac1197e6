"""Attention backends on CUDA, in bf16, against torch_native on the same inputs.

Every case is also scored against a float32 torch_native run on the same (bf16-rounded) inputs: the backend's
mean error there may not exceed a few times torch_native-in-bf16's own, which catches small logic errors
(one key too many in a long context) that a bf16 tolerance alone would let through.

Run alone (`pytest test/gpu`); `python test/gpu/test_attention_backends.py` prints decode/extend timings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace
from typing import List, Sequence, Tuple

import pytest
import torch

# No triton import here: the backends import it lazily, and importing it at collection time on a CPU box
# would stop test/unit/test_triton_attention.py from switching Triton to its interpreter.
from sglx.srt.layers.attention.registry import create_attention_backend
from sglx.srt.layers.radix_attention import RadixAttention
from sglx.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglx.srt.model_executor.forward_batch import ForwardBatch, ForwardMode

DEVICE = "cuda"
BACKENDS = ["triton", "flashinfer", "fa3"]
# flashinfer/fa3 plan one attention shape per batch: sliding windows and logit caps are the triton backend's.
WINDOW_BACKENDS = ["triton"]
E, D, M = ForwardMode.EXTEND, ForwardMode.DECODE, ForwardMode.MIXED
LENS = {  # (cached prefix, new tokens) per request
    "prefill": ((0, 1), (0, 77), (0, 300), (0, 513)),
    "prefix": ((100, 50), (0, 129), (257, 1), (600, 200)),
    "decode": ((0, 1), (36, 1), (511, 1), (1500, 1), (90, 1)),
    "mixed": ((40, 1), (0, 90), (700, 1), (120, 300)),
}
MODES = {"prefill": E, "prefix": E, "decode": D, "mixed": M}
GQA = {1: (8, 8), 4: (16, 4), 8: (32, 4)}  # ratio -> (q heads, kv heads)


@dataclass
class Case:
    lens: Sequence[Tuple[int, int]]
    mode: ForwardMode
    page_size: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 128
    window: int = -1
    logit_cap: float = 0.0
    causal: bool = True


def build(case: Case, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ps = case.page_size
    n_pages = sum(-(-(p + e) // ps) for p, e in case.lens) + 3
    pool = MHATokenToKVPool(n_pages * ps, ps, dtype, case.kv_heads, case.head_dim, 1, DEVICE)
    r2t = ReqToTokenPool(len(case.lens) + 1, max(p + e for p, e in case.lens) + 4, DEVICE)
    free_pages = (torch.randperm(n_pages, generator=g) + 1).tolist()  # scattered, non-contiguous pages
    rows, locs = [], []
    for p, e in case.lens:
        row, n = r2t.alloc(), p + e
        pages = [free_pages.pop() for _ in range(-(-n // ps))]
        slots = torch.tensor([pages[i // ps] * ps + i % ps for i in range(n)], dtype=torch.int64)
        r2t.write(row, 0, slots.to(DEVICE))
        if p:
            kp, vp = (torch.randn(p, case.kv_heads, case.head_dim, generator=g) for _ in range(2))
            pool.set_kv_buffer(0, slots[:p].to(DEVICE), kp.to(DEVICE, dtype), vp.to(DEVICE, dtype))
        rows.append(row)
        locs.append(slots[p:])
    T = sum(e for _, e in case.lens)
    q, k, v = (torch.randn(T, h * case.head_dim, generator=g).to(DEVICE, dtype)
               for h in (case.heads, case.kv_heads, case.kv_heads))  # fmt: skip
    fb = make_fb(case, rows, torch.cat(locs).to(DEVICE), r2t, pool)
    layer = RadixAttention(case.heads, case.head_dim, case.head_dim**-0.5, case.kv_heads, 0,
                           logit_cap=case.logit_cap, sliding_window_size=case.window, is_causal=case.causal)  # fmt: skip
    return fb, layer, q, k, v


def make_fb(case: Case, rows: List[int], out_cache_loc, r2t, pool) -> ForwardBatch:
    prefix, ext = [p for p, _ in case.lens], [e for _, e in case.lens]
    seq = [p + e for p, e in case.lens]

    def t(x):
        return torch.tensor(x, dtype=torch.int64, device=DEVICE)

    return ForwardBatch(
        forward_mode=case.mode, batch_size=len(rows), input_ids=t([0] * sum(ext)),
        positions=torch.cat([torch.arange(p, s) for p, s in zip(prefix, seq)]).to(DEVICE),
        req_pool_indices=t(rows), seq_lens=t(seq), out_cache_loc=out_cache_loc, seq_lens_cpu=seq,
        extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=ext, extend_prefix_lens=t(prefix),
        extend_seq_lens=t(ext), extend_start_loc=t([sum(ext[:i]) for i in range(len(ext))]),
        req_to_token_pool=r2t, token_to_kv_pool=pool, attn_backend=None,
    )  # fmt: skip


def with_pool(fb: ForwardBatch, dtype: torch.dtype) -> ForwardBatch:
    """A copy of the batch whose KV pool is a deep copy (optionally cast): each backend writes its own."""
    fb2 = copy.copy(fb)
    pool = copy.deepcopy(fb.token_to_kv_pool)
    if dtype != pool.dtype:
        pool.k_buffer = [b.to(dtype) for b in pool.k_buffer]
        pool.v_buffer = [b.to(dtype) for b in pool.v_buffer]
        pool.dtype = pool.store_dtype = dtype
    fb2.token_to_kv_pool = pool
    return fb2


def run_backend(name: str, fb: ForwardBatch, layer, q, k, v, save_kv_cache: bool = True):
    backend = create_attention_backend(name, SimpleNamespace(device=torch.device(DEVICE)))
    fb.attn_backend = backend
    backend.init_forward_metadata(fb)
    out = q.new_empty(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)
    res = backend.forward(q, k, v, layer, fb, out=out, save_kv_cache=save_kv_cache)
    assert res is out and res.data_ptr() == out.data_ptr(), f"{name} must write into and return `out`"
    return res


def check(name: str, case: Case) -> None:
    fb, layer, q, k, v = build(case)
    fb_ref, fb_32 = with_pool(fb, torch.bfloat16), with_pool(fb, torch.float32)
    got = run_backend(name, fb, layer, q, k, v).float()
    want = run_backend("torch_native", fb_ref, layer, q, k, v).float()
    exact = run_backend("torch_native", fb_32, layer, q.float(), k.float(), v.float())
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    err, ref_err = (got - exact).abs().mean().item(), (want - exact).abs().mean().item()
    print(f"[{name}] mean|err| vs fp32 {err:.2e} (torch_native bf16: {ref_err:.2e})")
    assert err <= 3 * ref_err + 1e-4, f"{name} error {err:.2e} vs torch_native bf16 {ref_err:.2e}"
    for got_buf, ref_buf in zip(fb.token_to_kv_pool.get_kv_buffer(0), fb_ref.token_to_kv_pool.get_kv_buffer(0)):
        assert torch.equal(got_buf, ref_buf), "KV pool contents differ after the store"


# ============================================================================ the matrix
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("kind", list(LENS))
def test_matrix(name, kind, page_size, gqa, head_dim):
    heads, kv_heads = GQA[gqa]
    check(name, Case(LENS[kind], MODES[kind], page_size, heads, kv_heads, head_dim))


@pytest.mark.parametrize("name", WINDOW_BACKENDS)
@pytest.mark.parametrize("kind", ["prefix", "decode", "mixed"])
@pytest.mark.parametrize("window,cap", [(100, 0.0), (-1, 30.0), (64, 5.0)], ids=["window", "softcap", "both"])
def test_sliding_window_and_soft_cap(name, kind, window, cap):
    check(name, Case(LENS[kind], MODES[kind], 16, 16, 4, 128, window=window, logit_cap=cap))


@pytest.mark.parametrize("name", WINDOW_BACKENDS)
@pytest.mark.parametrize("head_dim", [96, 256])
@pytest.mark.parametrize("kind", ["prefix", "decode"])
def test_other_head_dims(name, kind, head_dim):
    check(name, Case(LENS[kind], MODES[kind], 16, 16, 4, head_dim))


@pytest.mark.parametrize("name", BACKENDS)
def test_non_causal(name):
    check(name, Case(LENS["prefill"], E, 1, 16, 4, 64, causal=False))


@pytest.mark.parametrize("name", ["flashinfer", "fa3"])
def test_flashinfer_refuses_window_and_cap(name):
    fb, layer, q, k, v = build(Case(LENS["decode"], D, 16, 16, 4, 128, window=100))
    with pytest.raises(NotImplementedError, match="sliding window"):
        run_backend(name, fb, layer, q, k, v)


@pytest.mark.parametrize("name", BACKENDS)
def test_skip_kv_cache_never_touches_the_pool(name):
    """The embedding path (fb.skip_kv_cache): raw k/v in, the pool neither written nor read."""
    case = Case(LENS["prefill"], E, 1, 16, 4, 128)
    fb, layer, q, k, v = build(case)
    want = run_backend("torch_native", with_pool(fb, torch.bfloat16), layer, q, k, v)
    before = [b.clone() for b in fb.token_to_kv_pool.get_kv_buffer(0)]
    fb.skip_kv_cache = True
    got = run_backend(name, fb, layer, q, k, v)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    for b0, b1 in zip(before, fb.token_to_kv_pool.get_kv_buffer(0)):
        assert torch.equal(b0, b1), "the skip-KV path wrote the pool"


@pytest.mark.parametrize("name", ["flashinfer", "fa3"])
@pytest.mark.parametrize("page_size,causal", [(1, True), (16, True), (1, False)])
def test_prefix_free_batch_read_back_from_the_pool(name, page_size, causal):
    """ragged_prefix_free=False (bench_embedding's pool-read baseline): a prefix-free batch is stored, then
    attended from the pool through the page table; the same output as torch_native, the same pool."""
    fb, layer, q, k, v = build(Case(LENS["prefill"], E, page_size, 16, 4, 128, causal=causal))
    fb_ref = with_pool(fb, torch.bfloat16)
    want = run_backend("torch_native", fb_ref, layer, q, k, v)
    backend = create_attention_backend(name, SimpleNamespace(device=torch.device(DEVICE)))
    backend.ragged_prefix_free = False
    fb.attn_backend = backend
    backend.init_forward_metadata(fb)
    assert backend.plan.kind == "paged"
    got = backend.forward(q, k, v, layer, fb, out=torch.empty_like(want))
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    for a, b in zip(fb.token_to_kv_pool.get_kv_buffer(0), fb_ref.token_to_kv_pool.get_kv_buffer(0)):
        assert torch.equal(a, b), "the KV store differs"


def _qkv_column_views(q, k, v):
    """q, k, v as column slices of one [T, q + k + v + 8] tensor (rows a qkv width apart), as models pass them."""
    qkv = torch.cat([q, k, v, torch.full_like(q[:, :8], float("nan"))], dim=-1)
    views = qkv[:, :-8].split([q.shape[1], k.shape[1], v.shape[1]], dim=-1)
    assert not any(x.is_contiguous() for x in views)
    return views


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("kind,page_size,skip_kv", [
    ("prefill", 1, False), ("prefix", 16, False), ("decode", 1, False), ("decode", 16, False), ("prefill", 1, True),
])
def test_row_strided_qkv_views_match_contiguous(name, kind, page_size, skip_kv):
    """q/k/v as views of one qkv tensor (models no longer copy v): the same output, bit for bit, and the same
    KV pool as contiguous copies, on every GPU backend (flashinfer's kernels read the row strides)."""
    fb, layer, q, k, v = build(Case(LENS[kind], MODES[kind], page_size, 16, 4, 128))
    fb.skip_kv_cache = skip_kv
    fb_ref = with_pool(fb, torch.bfloat16)
    got = run_backend(name, fb, layer, *_qkv_column_views(q, k, v))
    want = run_backend(name, fb_ref, layer, q, k, v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(fb.token_to_kv_pool.get_kv_buffer(0), fb_ref.token_to_kv_pool.get_kv_buffer(0)):
        assert torch.equal(a, b), "the KV store of strided k/v differs"


def test_flash_attn_one_shot_helpers():
    """flash_attn_varlen_func / flash_attn_with_kvcache (fa3) against torch_native's reference."""
    from sglx.srt.layers.attention.flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    case = Case(LENS["prefix"], E, 16, 16, 4, 128)
    fb, layer, q, k, v = build(case)
    want = run_backend("torch_native", fb, layer, q, k, v)  # also stores the new k/v in the pool
    q3 = q.view(-1, 16, 128)
    ext = torch.tensor([0] + fb.extend_seq_lens_cpu).cumsum(0).to(torch.int32)
    kb, vb = fb.token_to_kv_pool.get_kv_buffer(0)
    ps = 16
    table = fb.req_to_token_pool.req_to_token[fb.req_pool_indices, ::ps] // ps
    out = torch.empty_like(q3)
    got = flash_attn_with_kvcache(q3, kb.view(-1, ps, 4, 128), vb.view(-1, ps, 4, 128), table, fb.seq_lens, ext,
                                  softmax_scale=layer.scaling, causal=True, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got.view_as(want), want, atol=2e-2, rtol=2e-2)

    fb, layer, q, k, v = build(Case(LENS["prefill"], E, 1, 16, 4, 128))
    want = run_backend("torch_native", fb, layer, q, k, v)
    cu = torch.tensor([0] + fb.extend_seq_lens_cpu).cumsum(0).to(torch.int32)
    out = torch.empty(q.shape[0], 16, 128, dtype=q.dtype, device=DEVICE)
    got = flash_attn_varlen_func(q.view(-1, 16, 128), k.view(-1, 4, 128), v.view(-1, 4, 128), cu, cu,
                                 softmax_scale=layer.scaling, causal=True, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got.view_as(want), want, atol=2e-2, rtol=2e-2)


def test_triton_cuda_graph_decode_replay():
    """Capture one decode step in a CUDA graph at short lengths, replay it for the real (longer) ones."""
    case = Case(((40, 1), (700, 1), (6, 1)), D, page_size=16, heads=16, kv_heads=4, head_dim=128)
    fb, layer, q, k, v = build(case)
    fb_ref = with_pool(fb, torch.bfloat16)  # before the capture scribbles on the new tokens' slots
    want = run_backend("torch_native", fb_ref, layer, q, k, v)

    runner = SimpleNamespace(device=torch.device(DEVICE), req_to_token_pool=fb.req_to_token_pool)
    backend = create_attention_backend("triton", runner)
    backend.init_cuda_graph_state(max_bs=8)
    fb.attn_backend = backend
    static_q, static_k, static_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    out = torch.empty(q.shape[0], 16 * 128, dtype=q.dtype, device=DEVICE)

    def step():
        backend.forward(static_q, static_k, static_v, layer, fb, out=out)

    short = torch.tensor([10, 20, 3], dtype=torch.int64, device=DEVICE)
    backend.init_forward_metadata_capture_cuda_graph(3, 3, fb.req_pool_indices, short, D)
    step()  # warm-up: compiles the kernels and allocates the static scratch outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for dst, src in ((static_q, q), (static_k, k), (static_v, v)):
        dst.copy_(src)  # graph inputs (test plumbing, not an attention result)
    out.fill_(float("nan"))
    backend.init_forward_metadata_replay_cuda_graph(
        3, fb.req_pool_indices, fb.seq_lens, sum(fb.seq_lens_cpu), D, fb.seq_lens_cpu
    )
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)


# ============================================================================ timing (not a test)
def _time_ms(fn, iters: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def bench(kind: str, lens, heads: int = 32, kv_heads: int = 8, head_dim: int = 128) -> None:
    """Llama-8B head shapes; KV store excluded (save_kv_cache=False), metadata built once as in a real step."""
    case = Case(lens, MODES[kind], 16, heads, kv_heads, head_dim)
    fb, layer, q, k, v = build(case)
    fb.token_to_kv_pool.set_kv_buffer(0, fb.out_cache_loc, k.view(-1, kv_heads, head_dim),
                                      v.view(-1, kv_heads, head_dim))  # fmt: skip
    out = q.new_empty(q.shape[0], heads * head_dim)
    name0 = torch.cuda.get_device_name()
    for name in ["torch_native"] + BACKENDS:
        backend = create_attention_backend(name, SimpleNamespace(device=torch.device(DEVICE)))
        fb.attn_backend = backend
        meta_ms = _time_ms(lambda: backend.init_forward_metadata(fb))
        backend.init_forward_metadata(fb)
        ms = _time_ms(lambda: backend.forward(q, None, None, layer, fb, out=out, save_kv_cache=False))
        print(f"{name0} | {kind} bs={len(lens)} | {name:13s} | forward {ms * 1000:8.1f} us | metadata "
              f"{meta_ms * 1000:7.1f} us")  # fmt: skip


def sweep_triton_configs() -> None:
    """Launch configurations around the defaults, each checked against torch_native (Llama-8B heads)."""
    from sglx.srt.layers.attention import triton_ops as ops

    for kind, lens, configs in (
        ("decode", [(1023, 1)] * 64, [(bn, w, st, sp) for bn in (32, 64) for w in (4, 8) for st in (2, 3)
                                      for sp in (1, 2, 4, 8)]),
        ("prefill", [(0, 2048)] * 4, [(128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2),
                                      (64, 32, 4, 2)]),
    ):  # fmt: skip
        fb, layer, q, k, v = build(Case(lens, MODES[kind], 16, 32, 8, 128))
        want = run_backend("torch_native", fb, layer, q, k, v)
        backend = create_attention_backend("triton", SimpleNamespace(device=torch.device(DEVICE)))
        backend.init_forward_metadata(fb)
        meta, (kb, vb) = backend.forward_metadata, fb.token_to_kv_pool.get_kv_buffer(0)
        q3, out = q.view(-1, 32, 128), torch.empty_like(want)
        o3 = out.view(-1, 32, 128)
        for c in configs:
            if kind == "decode":
                part = ops.decode_scratch(len(lens), 32, c[3], 128, q.device)
                cfg = ops.DecodeLaunchConfig(*c[:3])
                fn = lambda: ops.decode_attention_fwd(q3, kb, vb, o3, meta.kv_indptr, meta.kv_indices, *part,  # noqa: E731
                                                      layer.scaling, config=cfg)  # fmt: skip
            else:
                cfg = ops.ExtendLaunchConfig(*c)
                fn = lambda: ops.extend_attention_fwd(q3, None, None, kb, vb, o3, meta.qo_indptr,  # noqa: E731
                                                      meta.kv_indptr, meta.kv_indices, fb.out_cache_loc,
                                                      meta.max_extend_len, layer.scaling, config=cfg)  # fmt: skip
            ms = _time_ms(fn)
            err = (out.float() - want.float()).abs().max().item()
            print(f"sweep {kind} {c}: {ms * 1000:8.1f} us  max|err| {err:.1e}")


if __name__ == "__main__":
    bench("decode", [(1023, 1)] * 64)
    bench("decode", [(4095, 1)] * 8)
    bench("prefill", [(0, 2048)] * 4)
    sweep_triton_configs()
