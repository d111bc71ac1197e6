"""Attention kernels of flashinfer in FlashAttention's calling style, every result written into `out=`.

flashinfer builds (JIT) FA2 kernels for any CUDA GPU and FlashAttention-3 kernels for sm90 (`kernel="fa3"`);
this module is the only place sglx touches its wrappers. Three planned operations:

  * `VarlenAttention`  ~ flash_attn_varlen_func: ragged q/k/v given by cumulative lengths (prefill without a
    cached prefix, and the skip-KV embedding path, where the keys' lengths are the queries').
  * `PagedAttention`   ~ flash_attn_with_kvcache: new queries against the paged KV pool (prefill on top of a
    cached prefix, causal with queries aligned to the end of each sequence).
  * `PagedDecode`      ~ flash_attn_with_kvcache with one query per sequence: decode (FA2-family kernels),
    optionally with CUDA-graph buffers (one instance per captured batch size).

Planning copies the (host) index pointers and schedules work; it happens once per batch (`plan`), and every
layer then only launches the kernel (`run`). Index pointers are passed as CPU tensors: planning on device
tensors would force a host sync. The one-shot functions `flash_attn_varlen_func` / `flash_attn_with_kvcache`
plan and run in one call, for tests and one-off callers.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

WORKSPACE_BYTES = 256 * 1024 * 1024
_workspaces: dict = {}


def workspace(device: torch.device) -> torch.Tensor:
    """flashinfer's float workspace (split-KV partial results), one per device, shared by all wrappers: a
    batch runs one kind of attention at a time."""
    key = str(device)
    if key not in _workspaces:
        _workspaces[key] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _workspaces[key]


def check_kernel_family(kernel: str, device: torch.device) -> None:
    if kernel not in ("fa2", "fa3"):
        raise ValueError(f"unknown flashinfer kernel family {kernel!r} (fa2 | fa3)")
    if kernel == "fa3":
        major, _ = torch.cuda.get_device_capability(device)
        if major != 9:
            raise RuntimeError(f"FlashAttention-3 kernels need an sm90 GPU (H100/H200); this one is sm{major}x")


def _i32(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) and x.dtype == torch.int32 else torch.as_tensor(x, dtype=torch.int32)


class VarlenAttention:
    def __init__(self, device: torch.device, kernel: str = "fa2") -> None:
        import flashinfer

        self.wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace(device), "NHD", backend=kernel)

    def plan(
        self, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, num_heads: int, num_kv_heads: int,
        head_dim: int, *, causal: bool, softmax_scale: float, dtype: torch.dtype, v_head_dim: Optional[int] = None,
    ) -> None:  # fmt: skip
        self.wrapper.plan(
            _i32(cu_seqlens_q), _i32(cu_seqlens_k), num_heads, num_kv_heads, head_dim, head_dim_vo=v_head_dim,
            causal=causal, sm_scale=softmax_scale, q_data_type=dtype, kv_data_type=dtype,
        )  # fmt: skip

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """q [n, heads, d], k/v [n_kv, kv_heads, d], out [n, heads, d_v]: written in place and returned."""
        return self.wrapper.run(q, k, v, out=out)


class PagedAttention:
    def __init__(self, device: torch.device, kernel: str = "fa2") -> None:
        import flashinfer

        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace(device), "NHD", backend=kernel)

    def plan(
        self, cu_seqlens_q: torch.Tensor, page_indptr: torch.Tensor, page_indices: torch.Tensor,
        last_page_len: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int, *,
        causal: bool, softmax_scale: float, dtype: torch.dtype, kv_dtype: torch.dtype,
    ) -> None:  # fmt: skip
        self.wrapper.plan(
            _i32(cu_seqlens_q), _i32(page_indptr), page_indices, _i32(last_page_len), num_heads, num_kv_heads,
            head_dim, page_size, causal=causal, sm_scale=softmax_scale, q_data_type=dtype, kv_data_type=kv_dtype,
        )  # fmt: skip

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """k_cache/v_cache [pages, page_size, kv_heads, d] (NHD)."""
        return self.wrapper.run(q, (k_cache, v_cache), out=out)


class PagedDecode:
    """One query per sequence, on flashinfer's FA2-family decode kernels (with its FA3 path a Llama-8B decode step
    measured 2.1x / 3.7x its HBM floor at batch 64 / 256, against 1.58x / 1.51x; docs/backends.md). With `graph_buffers` (indptr [bs+1], indices,
    last_page_len [bs]) the wrapper is fixed to that batch size and keeps its metadata at those addresses, as a
    captured CUDA graph needs."""

    def __init__(
        self, device: torch.device, use_tensor_cores: bool,
        graph_buffers: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    ) -> None:  # fmt: skip
        import flashinfer

        kwargs = dict(use_tensor_cores=use_tensor_cores)
        if graph_buffers is not None:
            indptr, indices, last = graph_buffers
            kwargs.update(use_cuda_graph=True, paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices,
                          paged_kv_last_page_len_buffer=last)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(device), "NHD", **kwargs)

    def plan(
        self, page_indptr: torch.Tensor, page_indices: torch.Tensor, last_page_len: torch.Tensor, num_heads: int,
        num_kv_heads: int, head_dim: int, page_size: int, *, softmax_scale: float, dtype: torch.dtype,
        kv_dtype: torch.dtype,
    ) -> None:  # fmt: skip
        self.wrapper.plan(
            _i32(page_indptr), page_indices, _i32(last_page_len), num_heads, num_kv_heads, head_dim, page_size,
            sm_scale=softmax_scale, q_data_type=dtype, kv_data_type=kv_dtype,
        )  # fmt: skip

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.wrapper.run(q, (k_cache, v_cache), out=out)


# ---------------------------------------------------------------------------------------------- one-shot forms
def flash_attn_varlen_func(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    *, softmax_scale: Optional[float] = None, causal: bool = False, out: Optional[torch.Tensor] = None,
    kernel: str = "fa3",
) -> torch.Tensor:  # fmt: skip
    """Plan and run once (q [n, H, D], k/v [n_kv, Hkv, D]); prefer VarlenAttention where many layers share a plan."""
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device) if out is None else out
    op = VarlenAttention(q.device, kernel)
    op.plan(cu_seqlens_q.cpu(), cu_seqlens_k.cpu(), q.shape[1], k.shape[1], q.shape[2], causal=causal,
            softmax_scale=softmax_scale or q.shape[2] ** -0.5, dtype=q.dtype, v_head_dim=v.shape[2])
    return op.run(q, k, v, out)


def flash_attn_with_kvcache(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
    cache_seqlens: torch.Tensor, cu_seqlens_q: torch.Tensor, *, softmax_scale: Optional[float] = None,
    causal: bool = True, out: Optional[torch.Tensor] = None, kernel: str = "fa3",
) -> torch.Tensor:  # fmt: skip
    """q [n, H, D] against k/v_cache [pages, page_size, Hkv, D]; page_table [bs, max_pages] int32 (CPU or
    device), cache_seqlens [bs] (total KV length of each sequence, new tokens included)."""
    out = torch.empty_like(q) if out is None else out
    ps = k_cache.shape[1]
    lens = cache_seqlens.cpu().to(torch.int32)
    n_pages = (lens + ps - 1) // ps
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    torch.cumsum(n_pages, 0, out=indptr[1:])
    table = page_table.cpu()
    indices = torch.cat([table[i, : int(n)] for i, n in enumerate(n_pages)]).to(torch.int32).to(q.device)
    op = PagedAttention(q.device, kernel)
    op.plan(cu_seqlens_q.cpu(), indptr, indices, (lens - 1) % ps + 1, q.shape[1], k_cache.shape[2], q.shape[2],
            ps, causal=causal, softmax_scale=softmax_scale or q.shape[2] ** -0.5, dtype=q.dtype,
            kv_dtype=k_cache.dtype)
    return op.run(q, k_cache, v_cache, out)
