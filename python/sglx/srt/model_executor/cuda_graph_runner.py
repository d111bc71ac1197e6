"""CudaGraphRunner: decode forwards captured once per padded batch size and replayed.

A decode step of a small model is host-bound: each layer launches a few dozen small kernels, and Python
issues them slower than the GPU runs them. Capturing the whole decode forward once per batch size (1, 2, 4,
8, then every 8 up to --cuda-graph-max-bs) turns a step into a handful of copies, the backend's metadata
update, and one graph launch.

How a step replays:
  * The batch is padded up to the next captured size. Its inputs are copied into static buffers that the
    graph reads; padding rows point at req_to_token row 0 and KV slot 0, both reserved and never handed
    to a request (see ReqToTokenPool and the allocators), so a padding row never writes a live KV slot.
  * The attention backend refreshes its captured metadata in place (init_forward_metadata_replay_cuda_graph),
    outside the graph.
  * The graph writes the logits into one static buffer shared by every batch size (a copy at the end of
    the graph: the graphs can then share one memory pool, instead of each keeping its own logits alive).

Graph handles are pluggable (`graph_factory`): `TorchCudaGraph` on a GPU, `EagerGraph` in CPU tests, which
re-runs the captured function on the same static buffers and so checks the buffer and padding logic.
"""

from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import torch

from sglx.srt.layers.logits_processor import LogitsProcessorOutput
from sglx.srt.model_executor.forward_batch import ForwardBatch, ForwardMode, ModelWorkerBatch

if TYPE_CHECKING:
    from sglx.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def capture_batch_sizes(max_bs: int) -> List[int]:
    """1, 2, 4, 8, then every 8 up to max_bs (and max_bs itself)."""
    sizes = [bs for bs in (1, 2, 4) if bs < max_bs] + list(range(8, max_bs + 1, 8))
    if not sizes or sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


class TorchCudaGraph:
    """One torch.cuda.CUDAGraph; every graph of a runner shares one memory pool."""

    def __init__(self, pool: Any) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], Any]) -> Any:
        with torch.cuda.graph(self.graph, pool=self.pool):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class EagerGraph:
    """Stand-in for CPU tests: 'replay' calls the captured function again on the same static buffers."""

    def __init__(self, pool: Any = None) -> None:
        self.fn: Optional[Callable[[], Any]] = None

    def capture(self, fn: Callable[[], Any]) -> Any:
        self.fn = fn
        return fn()

    def replay(self) -> None:
        assert self.fn is not None
        self.fn()


class CudaGraphRunner:
    def __init__(self, runner: "ModelRunner", graph_factory: Optional[Callable[[Any], Any]] = None) -> None:
        self.runner = runner
        self.device = runner.device
        self.backend = runner.attn_backend
        # No decode batch is larger than --max-running-requests: capturing beyond it would only cost memory.
        max_bs = min(runner.server_args.cuda_graph_max_bs, runner.max_running_requests or 1 << 30)
        self.batch_sizes = capture_batch_sizes(max_bs)
        self.max_bs = self.batch_sizes[-1]
        if graph_factory is None:
            pool = torch.cuda.graph_pool_handle()
            graph_factory = lambda: TorchCudaGraph(pool)  # noqa: E731
        self.graph_factory = graph_factory
        cfg = runner.model_config
        # Static inputs: rows of one int64 tensor, so a step's host-side inputs go over in one copy.
        self.static_ints = torch.zeros((4, self.max_bs), dtype=torch.int64, device=self.device)
        self.input_ids, self.positions, self.req_pool_indices, self.seq_lens = self.static_ints.unbind(0)
        self.out_cache_loc = torch.zeros(self.max_bs, dtype=torch.int64, device=self.device)
        self.logits = torch.zeros((self.max_bs, cfg.vocab_size), dtype=torch.float32, device=self.device)
        self.hidden = torch.zeros((self.max_bs, cfg.hidden_size), dtype=cfg.dtype, device=self.device)
        self.graphs: Dict[int, Any] = {}
        self.backend.init_cuda_graph_state(self.max_bs, self.max_bs)
        self.capture()

    # ------------------------------------------------------------------ capture
    def _forward_batch(self, bs: int, seq_lens_cpu: List[int]) -> ForwardBatch:
        r = self.runner
        zeros = self.out_cache_loc.new_zeros(bs)
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=bs,
            input_ids=self.input_ids[:bs], positions=self.positions[:bs],
            req_pool_indices=self.req_pool_indices[:bs], seq_lens=self.seq_lens[:bs],
            out_cache_loc=self.out_cache_loc[:bs], seq_lens_cpu=seq_lens_cpu,
            extend_prefix_lens_cpu=[s - 1 for s in seq_lens_cpu], extend_seq_lens_cpu=[1] * bs,
            extend_prefix_lens=self.seq_lens[:bs] - 1, extend_seq_lens=zeros + 1, extend_start_loc=zeros,
            req_to_token_pool=r.req_to_token_pool, token_to_kv_pool=r.token_to_kv_pool, attn_backend=self.backend,
        )  # fmt: skip

    def capture(self) -> None:
        # Padding state: row 0, slot 0, one token, position 0. Capture with it; replays overwrite it.
        self.static_ints.zero_()
        self.seq_lens.fill_(1)
        self.out_cache_loc.zero_()
        for bs in reversed(self.batch_sizes):  # largest first: the smaller ones reuse its pool memory
            fb = self._forward_batch(bs, [1] * bs)
            self.backend.init_forward_metadata_capture_cuda_graph(
                bs, bs, self.req_pool_indices[:bs], self.seq_lens[:bs], ForwardMode.DECODE
            )
            run = self._make_run(bs, fb)
            for _ in range(2):  # compiles/autotunes kernels before capture, outside it
                run()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            graph = self.graph_factory()
            graph.capture(run)
            self.graphs[bs] = graph
        logger.info("captured CUDA graphs for decode batch sizes %s", self.batch_sizes)

    def _make_run(self, bs: int, fb: ForwardBatch) -> Callable[[], None]:
        model = self.runner.model

        def run() -> None:
            with torch.inference_mode():
                out = model.forward(fb.input_ids, fb.positions, fb)
                self.logits[:bs].copy_(out.next_token_logits)
                if out.hidden_states is not None:
                    self.hidden[:bs].copy_(out.hidden_states)

        return run

    # ------------------------------------------------------------------ replay
    def can_run(self, batch: ModelWorkerBatch) -> bool:
        return batch.forward_mode.is_decode() and 0 < len(batch.seq_lens) <= self.max_bs

    def replay(self, batch: ModelWorkerBatch) -> LogitsProcessorOutput:
        bs = len(batch.seq_lens)
        padded = self.batch_sizes[bisect.bisect_left(self.batch_sizes, bs)]
        pad = padded - bs
        seq_lens = list(batch.seq_lens) + [1] * pad
        ids = list(batch.input_ids) + [0] * pad if batch.input_ids is not None else [0] * padded
        host = torch.tensor(
            [ids, [s - 1 for s in seq_lens], list(batch.req_pool_indices) + [0] * pad, seq_lens], dtype=torch.int64
        )
        self.static_ints[:, :padded].copy_(host, non_blocking=True)
        if batch.input_ids is None:  # the newest tokens, on the device (padding rows read row 0's: unused)
            torch.index_select(self.runner.last_token_ids, 0, self.req_pool_indices[:padded],
                               out=self.input_ids[:padded])
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc, non_blocking=True)
        if pad:
            self.out_cache_loc[bs:padded].zero_()
        self.backend.init_forward_metadata_replay_cuda_graph(
            padded, self.req_pool_indices[:padded], self.seq_lens[:padded], sum(seq_lens), ForwardMode.DECODE,
            seq_lens_cpu=seq_lens,
        )
        self.graphs[padded].replay()
        return LogitsProcessorOutput(next_token_logits=self.logits[:bs], hidden_states=self.hidden[:bs])
