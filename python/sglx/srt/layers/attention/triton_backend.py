"""The `triton` attention backend: own Triton kernels over the paged KV pool (extend + split-K decode).

Per batch, `init_forward_metadata` turns req_to_token into flat index arrays once (kv_indptr / kv_indices, and
qo_indptr for extend batches) with a cumsum and one small Triton kernel, no host sync; every layer's `forward`
then only launches kernels, which store their result straight into the caller's `out`.

This module imports triton lazily (in the factory), so registering it costs nothing on machines without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

from sglx.srt.layers.attention.base_attn_backend import AttentionBackend
from sglx.srt.layers.attention.registry import register_attention_backend

if TYPE_CHECKING:
    from sglx.srt.layers.radix_attention import RadixAttention
    from sglx.srt.model_executor.forward_batch import ForwardBatch, ForwardMode


@dataclass
class TritonMetadata:
    is_decode: bool
    kv_indptr: torch.Tensor  # int32 [bs + 1]: decode = whole sequence, extend = cached prefix only
    kv_indices: torch.Tensor  # int32 slots, request after request
    max_seq_len: int  # decode: longest sequence (sets the number of KV splits)
    qo_indptr: Optional[torch.Tensor] = None  # extend: int32 [bs + 1] offsets of each request's new tokens
    max_extend_len: int = 0
    max_prefix_len: int = 0
    # decode scratch, keyed by (heads, v_dim, splits); shared by every layer of the batch
    scratch: Dict[Tuple[int, int, int], Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def build_kv_indices(
    req_to_token: Optional[torch.Tensor],  # int32 [rows, max_ctx]; untouched (may be None) when max_len == 0
    req_pool_indices: torch.Tensor,  # int64 [bs]
    lens: torch.Tensor,  # int64 [bs] tokens to take from the start of each row
    max_len: int,
    indptr: torch.Tensor,  # int32 [>= bs + 1] whose indptr[0] is 0 already; indptr[1:bs+1] filled
    indices: torch.Tensor,  # int32 [>= sum(lens)], filled
    page_size: int = 1,  # > 1: lens count pages, and indices get page numbers
) -> None:
    """Flatten req_to_token[row_i, :lens_i] for all i into `indices` (or, with pages, every page_size-th
    slot divided by page_size): two launches, no host sync."""
    bs = lens.numel()
    if bs == 0:
        return
    torch.cumsum(lens, 0, dtype=torch.int32, out=indptr[1 : bs + 1])
    if max_len > 0:
        from sglx.srt.layers.attention.triton_ops import fill_kv_indices

        fill_kv_indices(req_to_token, req_pool_indices, lens, indptr, indices, page_size)


class TritonAttnBackend(AttentionBackend):
    supports_cuda_graph = True
    # ForwardBatch.skip_kv_cache (prefill-only embedding serving): extend runs on the batch's raw k/v and
    # never touches the pool, which is what the kernel does anyway for batches without a cached prefix.
    supports_skip_kv_cache = True

    def __init__(self, runner: Any) -> None:
        from sglx.srt.layers.attention import triton_ops  # imports triton; the factory checked it is there

        self.ops = triton_ops
        self.runner = runner
        self.device = torch.device(runner.device)
        self.num_sms = (
            torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 4
        )
        self.forward_metadata: Optional[TritonMetadata] = None
        self._graph: Optional[_GraphBuffers] = None

    # ---- per-batch metadata -------------------------------------------------------------------------------
    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        if fb.forward_mode.is_decode():
            total, max_len = sum(fb.seq_lens_cpu), max(fb.seq_lens_cpu, default=0)
            indptr, indices = self._alloc_indices(fb.batch_size, total)
            r2t = fb.req_to_token_pool.req_to_token
            build_kv_indices(r2t, fb.req_pool_indices, fb.seq_lens, max_len, indptr, indices)
            self.forward_metadata = TritonMetadata(True, indptr, indices, max_seq_len=max_len)
            return
        max_prefix = max(fb.extend_prefix_lens_cpu, default=0)
        indptr, indices = self._alloc_indices(fb.batch_size, sum(fb.extend_prefix_lens_cpu))
        r2t = fb.req_to_token_pool.req_to_token if max_prefix > 0 else None  # skip_kv_cache: no table needed
        build_kv_indices(r2t, fb.req_pool_indices, fb.extend_prefix_lens, max_prefix, indptr, indices)
        qo_indptr = torch.zeros(fb.batch_size + 1, dtype=torch.int32, device=self.device)
        torch.cumsum(fb.extend_seq_lens, 0, dtype=torch.int32, out=qo_indptr[1:])
        self.forward_metadata = TritonMetadata(
            False,
            indptr,
            indices,
            max_seq_len=max(fb.seq_lens_cpu, default=0),
            qo_indptr=qo_indptr,
            max_extend_len=max(fb.extend_seq_lens_cpu, default=0),
            max_prefix_len=max_prefix,
        )

    def _alloc_indices(self, bs: int, total: int) -> Tuple[torch.Tensor, torch.Tensor]:
        indptr = torch.zeros(bs + 1, dtype=torch.int32, device=self.device)
        indices = torch.empty(max(total, 1), dtype=torch.int32, device=self.device)  # never empty: a valid pointer
        return indptr, indices

    # ---- per-layer forward ----------------------------------------------------------------------------------
    def forward(self, q, k, v, layer: "RadixAttention", fb: "ForwardBatch", *, out, save_kv_cache=True):
        meta = self.forward_metadata
        if fb.batch_size == 0 or q.shape[0] == 0:
            return out
        k3 = k.view(-1, layer.tp_k_head_num, layer.qk_head_dim) if k is not None else None
        v3 = v.view(-1, layer.tp_v_head_num, layer.v_head_dim) if v is not None else None
        skip_cache = bool(getattr(fb, "skip_kv_cache", False))
        if skip_cache and (k3 is None or meta.max_prefix_len > 0 or meta.is_decode):
            raise RuntimeError("skip_kv_cache needs an extend batch without cached prefixes and with its k/v")
        if save_kv_cache and k3 is not None and not skip_cache:
            store_kv(layer, fb, k3, v3)
        q3 = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o3 = out.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        if meta.is_decode:
            self._decode(q3, o3, layer, fb, meta)
        else:
            self._extend(q3, k3, v3, o3, layer, fb, meta)
        return out

    def _extend(self, q3, k3, v3, o3, layer, fb, meta: TritonMetadata) -> None:
        if meta.max_prefix_len == 0 and k3 is not None:
            k_buf, v_buf = k3, v3  # nothing cached to read: the pool is never touched (works with NoOpKVPool)
        else:
            k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        self.ops.extend_attention_fwd(
            q3, k3, v3 if k3 is not None else None, k_buf, v_buf, o3,
            meta.qo_indptr, meta.kv_indptr, meta.kv_indices,
            fb.out_cache_loc if k3 is None else None,
            meta.max_extend_len, layer.scaling, layer.logit_cap, layer.sliding_window_size, layer.is_causal,
        )  # fmt: skip

    def _decode(self, q3, o3, layer, fb, meta: TritonMetadata) -> None:
        k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        part_o, part_lse = self._decode_scratch(meta, fb.batch_size, layer)
        self.ops.decode_attention_fwd(
            q3, k_buf, v_buf, o3, meta.kv_indptr, meta.kv_indices, part_o, part_lse,
            layer.scaling, layer.logit_cap, layer.sliding_window_size,
        )  # fmt: skip

    def _decode_scratch(self, meta: TritonMetadata, bs: int, layer: "RadixAttention"):
        splits = self.ops.choose_num_kv_splits(bs, layer.tp_k_head_num, meta.max_seq_len, self.num_sms)
        key = (layer.tp_q_head_num, layer.v_head_dim, splits)
        if key not in meta.scratch:
            if self._graph is not None and meta is self._graph.meta:
                meta.scratch[key] = self._graph.scratch(key, bs)
            else:
                meta.scratch[key] = self.ops.decode_scratch(bs, key[0], splits, key[1], self.device)
        return meta.scratch[key]

    # ---- CUDA graphs (decode only) ------------------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int = 0) -> None:
        """Static index and scratch buffers for batches of up to `max_bs` decode requests."""
        max_ctx = self.runner.req_to_token_pool.req_to_token.shape[1]
        # A decode batch holds at most every pool slot plus one padding slot per row.
        max_indices = min(max_bs * max_ctx, getattr(self.runner, "max_total_num_tokens", max_bs * max_ctx) + max_bs)
        self._graph = _GraphBuffers(max_bs, max_ctx, max_indices, self.device)

    def init_forward_metadata_capture_cuda_graph(
        self, bs: int, num_tokens: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
        forward_mode: "ForwardMode",
    ) -> None:  # fmt: skip
        self._require_graph_decode(forward_mode)
        self._graph_fill(bs, req_pool_indices, seq_lens, max_len=int(seq_lens.max().item()) if bs else 0)

    def init_forward_metadata_replay_cuda_graph(
        self, bs: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, seq_lens_sum: int,
        forward_mode: "ForwardMode", seq_lens_cpu: Optional[List[int]] = None,
    ) -> None:  # fmt: skip
        self._require_graph_decode(forward_mode)
        max_len = max(seq_lens_cpu) if seq_lens_cpu else int(seq_lens.max().item())
        self._graph_fill(bs, req_pool_indices, seq_lens, max_len)

    def _graph_fill(self, bs: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, max_len: int) -> None:
        g = self._graph
        if g is None:
            raise RuntimeError("init_cuda_graph_state must run before capturing CUDA graphs")
        r2t = self.runner.req_to_token_pool.req_to_token
        build_kv_indices(r2t, req_pool_indices, seq_lens, max_len, g.kv_indptr, g.kv_indices)
        # The split count is fixed per graph (it is baked into the launch): plan for the longest context.
        g.meta.kv_indptr = g.kv_indptr[: bs + 1]
        g.meta.max_seq_len = g.max_ctx
        g.meta.scratch = {}  # re-sliced from the static buffers for this batch size on first use
        self.forward_metadata = g.meta

    @staticmethod
    def _require_graph_decode(forward_mode: "ForwardMode") -> None:
        if not forward_mode.is_decode():
            raise NotImplementedError("the triton backend captures CUDA graphs for decode batches only")


class _GraphBuffers:
    """Buffers whose addresses a captured graph bakes in: sized for the largest batch, sliced per batch size."""

    def __init__(self, max_bs: int, max_ctx: int, max_indices: int, device: torch.device) -> None:
        self.max_bs, self.max_ctx, self.device = max_bs, max_ctx, device
        self.kv_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=device)
        self.kv_indices = torch.zeros(max_indices, dtype=torch.int32, device=device)
        self.meta = TritonMetadata(True, self.kv_indptr, self.kv_indices, max_seq_len=max_ctx)
        self._scratch: Dict[Tuple[int, int, int], Tuple[torch.Tensor, torch.Tensor]] = {}

    def scratch(self, key: Tuple[int, int, int], bs: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if key not in self._scratch:
            heads, v_dim, splits = key
            part_o = torch.empty((self.max_bs, heads, splits, v_dim), dtype=torch.float32, device=self.device)
            part_lse = torch.empty((self.max_bs, heads, splits), dtype=torch.float32, device=self.device)
            self._scratch[key] = (part_o, part_lse)
        part_o, part_lse = self._scratch[key]
        return part_o[:bs], part_lse[:bs]


def store_kv(layer: "RadixAttention", fb: "ForwardBatch", k3: torch.Tensor, v3: torch.Tensor) -> None:
    """Store the new tokens' k/v [n, kv_heads, d] at fb.out_cache_loc: one fused Triton kernel for the plain
    MHA pool, the pool's own set_kv_buffer otherwise (casts, fp8 scales, other pool layouts)."""
    from sglx.srt.layers.attention import triton_ops

    pool = fb.token_to_kv_pool
    if _is_plain_mha_pool(pool):
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        if triton_ops.can_fuse_store(k3, k_buf, v3, v_buf):
            triton_ops.store_kv_cache(k3, v3, k_buf, v_buf, fb.out_cache_loc)
            return
    pool.set_kv_buffer(layer.layer_id, fb.out_cache_loc, k3, v3)


def _is_plain_mha_pool(pool: Any) -> bool:
    from sglx.srt.mem_cache.memory_pool import MHATokenToKVPool

    # Exactly the MHA pool: subclasses (SWA maps, scaled FP8) may store differently, so they keep their own path.
    return type(pool) is MHATokenToKVPool


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@register_attention_backend("triton", needs_cuda=lambda: not _interpreting())
def _create(runner: Any) -> AttentionBackend:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "--attention-backend triton needs the `triton` package; use --attention-backend torch_native"
        ) from e
    if torch.device(runner.device).type != "cuda" and not _interpreting():
        raise RuntimeError(
            "--attention-backend triton needs a CUDA GPU (or TRITON_INTERPRET=1 for debugging); "
            "use --attention-backend torch_native on CPU"
        )
    return TritonAttnBackend(runner)
