"""The `flashinfer` (FA2 kernels) and `fa3` (FlashAttention-3 kernels, sm90) attention backends.

Both drive flashinfer's planned wrappers through layers/attention/flash_attn.py; they differ only in the
kernel family of prefill. Decode runs flashinfer's FA2-family decode kernels in both: its FA3 path at one query
per sequence measured 2.1x / 3.7x the HBM floor of a Llama-8B step at batch 64 / 256 on an H100, against
1.58x / 1.51x for the FA2 decode kernels (docs/benchmarks.md). Per batch, `init_forward_metadata` picks one operation and plans it once:
  * decode                            -> PagedDecode over the pool's pages;
  * extend, no cached prefix anywhere -> VarlenAttention on the new tokens' own k/v (ragged, causal or not
    as the model says). This is also the skip-KV embedding path: the pool is never read or written;
  * extend on top of cached prefixes  -> PagedAttention over prefix + new tokens, read back from the pool
    after this layer's k/v is stored.
Every `forward` then stores k/v (one fused Triton kernel) and runs the planned kernel into `out`.

The pool's per-layer buffers [rows, kv_heads, d] are viewed as [pages, page_size, kv_heads, d] (NHD): the
pool has size + page_size rows, a whole number of pages, page 0 being the reserved padding page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

from sglx.srt.layers.attention.base_attn_backend import AttentionBackend
from sglx.srt.layers.attention.registry import register_attention_backend
from sglx.srt.layers.attention.triton_backend import build_kv_indices, store_kv

if TYPE_CHECKING:
    from sglx.srt.layers.radix_attention import RadixAttention
    from sglx.srt.model_executor.forward_batch import ForwardBatch, ForwardMode


@dataclass(frozen=True)
class _Shape:
    """What a plan needs from the layers: one shape for the whole model (checked on every layer)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    scale: float
    is_causal: bool

    @staticmethod
    def of(layer: "RadixAttention") -> "_Shape":
        if layer.sliding_window_size > 0 or layer.logit_cap > 0:
            raise NotImplementedError(
                f"the flashinfer/fa3 backends plan one attention shape per batch; layer {layer.layer_id} has a "
                "sliding window or a logit cap: use --attention-backend triton"
            )
        return _Shape(layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim,
                      layer.scaling, layer.is_causal)

    @property
    def decode_tensor_cores(self) -> bool:
        # Decode: tensor cores pay off from a GQA group of 4 up.
        return self.num_heads // self.num_kv_heads >= 4


@dataclass
class _Plan:
    kind: str  # "decode" | "ragged" | "paged"
    op: Any  # VarlenAttention / PagedAttention / PagedDecode
    page_size: int
    args: tuple  # index arguments of op.plan
    planned: Optional[_Shape] = None


def _first_attention_layer(model: Optional[torch.nn.Module]) -> Optional["RadixAttention"]:
    from sglx.srt.layers.radix_attention import RadixAttention

    for m in model.modules() if model is not None else ():
        if isinstance(m, RadixAttention):
            return m
    return None


class FlashInferAttnBackend(AttentionBackend):
    supports_cuda_graph = True
    # ForwardBatch.skip_kv_cache: extend batches without a prefix run VarlenAttention on the raw k/v and never
    # touch the pool (see model_runner.decide_skip_kv_cache).
    supports_skip_kv_cache = True

    def __init__(self, runner: Any, kernel: str) -> None:
        from sglx.srt.layers.attention import flash_attn

        self.fa = flash_attn
        self.runner = runner
        self.device = torch.device(runner.device)
        flash_attn.check_kernel_family(kernel, self.device)
        # The plan is made when the first layer runs (its shape is the model's); CUDA-graph hooks plan before
        # any layer runs, so they take the shape from the model's first attention layer.
        first = _first_attention_layer(getattr(runner, "model", None))
        self.shape: Optional[_Shape] = _Shape.of(first) if first is not None else None
        self.varlen_op = flash_attn.VarlenAttention(self.device, kernel)
        self.paged_op = flash_attn.PagedAttention(self.device, kernel)
        self.decode_ops: Dict[bool, Any] = {}  # by use_tensor_cores
        self.plan: Optional[_Plan] = None
        # False: a prefix-free extend batch (skip-KV excepted) is stored, then read back from the pool through
        # the page table like a prefix batch, as SGLang's FA backend attends every extend. Slower; only
        # bench_embedding's pool-read and pre-seeds modes set it, to rebuild the seeds' baseline.
        self.ragged_prefix_free = True
        self._graph_decodes: Dict[int, Any] = {}
        self._graph_bufs: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    # ---- per-batch metadata -------------------------------------------------------------------------------
    def _page_table(
        self, page_size: int, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
        seq_lens_cpu: List[int],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """(page indptr on CPU, page indices on the device, last-page lengths on CPU) of whole sequences.
        Host-side pointers come from the CPU lengths and the device indices from req_to_token: no sync."""
        ps = page_size
        lens = torch.tensor(seq_lens_cpu, dtype=torch.int32)
        n_pages = (lens + ps - 1) // ps
        indptr = torch.zeros(len(seq_lens_cpu) + 1, dtype=torch.int32)
        torch.cumsum(n_pages, 0, out=indptr[1:])
        total = int(indptr[-1])
        indices = torch.empty(max(total, 1), dtype=torch.int32, device=self.device)
        dev_indptr = torch.zeros(len(seq_lens_cpu) + 1, dtype=torch.int32, device=self.device)
        build_kv_indices(req_to_token, req_pool_indices, (seq_lens + ps - 1) // ps, max(n_pages.tolist(), default=0),
                         dev_indptr, indices, ps)  # fmt: skip
        return indptr, indices[:total], (lens - 1) % ps + 1

    def _decode_op(self, shape: _Shape) -> Any:
        tc = shape.decode_tensor_cores
        if tc not in self.decode_ops:
            self.decode_ops[tc] = self.fa.PagedDecode(self.device, tc)
        return self.decode_ops[tc]

    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        pool, r2t = fb.token_to_kv_pool, fb.req_to_token_pool
        ps = getattr(pool, "page_size", 1)
        if fb.forward_mode.is_decode():
            table = self._page_table(ps, r2t.req_to_token, fb.req_pool_indices, fb.seq_lens, fb.seq_lens_cpu)
            self.plan = _Plan("decode", None, ps, table)
            return
        qo_indptr = torch.zeros(fb.batch_size + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(fb.extend_seq_lens_cpu, dtype=torch.int32), 0, out=qo_indptr[1:])
        if fb.skip_kv_cache or (self.ragged_prefix_free and not any(fb.extend_prefix_lens_cpu)):
            self.plan = _Plan("ragged", self.varlen_op, ps, (qo_indptr, qo_indptr))
            return
        table = self._page_table(ps, r2t.req_to_token, fb.req_pool_indices, fb.seq_lens, fb.seq_lens_cpu)
        self.plan = _Plan("paged", self.paged_op, ps, (qo_indptr, *table))

    def _ensure_planned(self, layer: "RadixAttention", q_dtype: torch.dtype, kv_dtype: torch.dtype) -> _Plan:
        plan = self.plan
        shape = _Shape.of(layer)
        if plan.planned is not None:
            if shape != plan.planned:
                raise NotImplementedError(f"layer {layer.layer_id}'s attention shape differs from the model's first "
                                          "layer: the flashinfer/fa3 backends plan one shape per batch")
            return plan
        s = shape
        heads = (s.num_heads, s.num_kv_heads, s.head_dim)
        if plan.kind == "decode":
            plan.op = plan.op or self._decode_op(s)
            plan.op.plan(*plan.args, *heads, plan.page_size, softmax_scale=s.scale, dtype=q_dtype, kv_dtype=kv_dtype)
        elif plan.kind == "ragged":
            plan.op.plan(*plan.args, *heads, causal=s.is_causal, softmax_scale=s.scale, dtype=q_dtype,
                         v_head_dim=s.v_head_dim)
        else:
            plan.op.plan(*plan.args, *heads, plan.page_size, causal=s.is_causal, softmax_scale=s.scale,
                         dtype=q_dtype, kv_dtype=kv_dtype)
        plan.planned = shape
        return plan

    # ---- per-layer forward ----------------------------------------------------------------------------------
    def forward(self, q, k, v, layer: "RadixAttention", fb: "ForwardBatch", *, out, save_kv_cache=True):
        if q.shape[0] == 0:
            return out
        pool = fb.token_to_kv_pool
        plan = self._ensure_planned(layer, q.dtype, getattr(pool, "dtype", q.dtype))
        q3 = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o3 = out.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        k3 = k.view(-1, layer.tp_k_head_num, layer.qk_head_dim) if k is not None else None
        v3 = v.view(-1, layer.tp_v_head_num, layer.v_head_dim) if v is not None else None
        if fb.skip_kv_cache:
            if plan.kind != "ragged" or k3 is None:
                raise RuntimeError("skip_kv_cache needs an extend batch without cached prefixes and with its k/v")
            plan.op.run(q3, k3, v3, o3)
            return out
        if save_kv_cache and k3 is not None:
            store_kv(layer, fb, k3, v3)
        if plan.kind == "ragged":
            if k3 is None:
                raise RuntimeError("a prefix-free extend batch needs its k/v")
            plan.op.run(q3, k3, v3, o3)
        else:
            k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
            ps = plan.page_size
            plan.op.run(q3, k_buf.view(-1, ps, *k_buf.shape[1:]), v_buf.view(-1, ps, *v_buf.shape[1:]), o3)
        return out

    # ---- CUDA graphs (decode only) ------------------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int = 0) -> None:
        if self.shape is None:
            raise RuntimeError("CUDA graphs need the model (runner.model) to take the attention shape from")
        # Page indices of a whole decode batch: at most the pool's pages plus one padding page per row.
        max_pages = self.runner.max_total_num_tokens // self.runner.page_size + max_bs + 1
        self._graph_bufs = (
            torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device),
            torch.zeros(max_pages, dtype=torch.int32, device=self.device),
            torch.ones(max_bs, dtype=torch.int32, device=self.device),
        )

    def _plan_graph_decode(self, bs: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                           seq_lens_cpu: List[int]) -> None:  # fmt: skip
        if bs not in self._graph_decodes:
            indptr, indices, last = self._graph_bufs
            self._graph_decodes[bs] = self.fa.PagedDecode(
                self.device, self.shape.decode_tensor_cores, (indptr[: bs + 1], indices, last[:bs])
            )
        r = self.runner
        table = self._page_table(r.page_size, r.req_to_token_pool.req_to_token, req_pool_indices, seq_lens,
                                 seq_lens_cpu)  # fmt: skip
        self.plan = _Plan("decode", self._graph_decodes[bs], r.page_size, table)
        s = self.shape
        self.plan.op.plan(*table, s.num_heads, s.num_kv_heads, s.head_dim, r.page_size, softmax_scale=s.scale,
                          dtype=r.model_config.dtype, kv_dtype=r.kv_cache_dtype)
        self.plan.planned = s

    def init_forward_metadata_capture_cuda_graph(
        self, bs: int, num_tokens: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
        forward_mode: "ForwardMode",
    ) -> None:  # fmt: skip
        if not forward_mode.is_decode():
            raise NotImplementedError("CUDA graphs are captured for decode batches only")
        self._plan_graph_decode(bs, req_pool_indices, seq_lens, seq_lens.tolist())

    def init_forward_metadata_replay_cuda_graph(
        self, bs: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, seq_lens_sum: int,
        forward_mode: "ForwardMode", seq_lens_cpu: Optional[List[int]] = None,
    ) -> None:  # fmt: skip
        if not forward_mode.is_decode():
            raise NotImplementedError("CUDA graphs are captured for decode batches only")
        self._plan_graph_decode(bs, req_pool_indices, seq_lens, seq_lens_cpu or seq_lens.tolist())


def _create(runner: Any, kernel: str) -> AttentionBackend:
    if torch.device(runner.device).type != "cuda":
        raise RuntimeError(f"--attention-backend {'fa3' if kernel == 'fa3' else 'flashinfer'} needs a CUDA GPU; "
                           "use --attention-backend torch_native on CPU")
    try:
        import flashinfer  # noqa: F401
    except ImportError as e:
        raise RuntimeError("this attention backend needs the `flashinfer-python` package") from e
    return FlashInferAttnBackend(runner, kernel)


@register_attention_backend("flashinfer", needs_cuda=True)
def _create_flashinfer(runner: Any) -> AttentionBackend:
    return _create(runner, "fa2")


@register_attention_backend("fa3", needs_cuda=True)
def _create_fa3(runner: Any) -> AttentionBackend:
    return _create(runner, "fa3")
