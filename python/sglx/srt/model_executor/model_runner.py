"""ModelRunner: owns the model, the KV memory and the attention backend; runs one batch at a time."""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch

from sglx.srt.configs.model_config import KV_DTYPES, ModelConfig
from sglx.srt.layers.attention.base_attn_backend import HybridAttnBackend
from sglx.srt.layers.attention.registry import create_model_attention_backend
from sglx.srt.layers.logits_processor import LogitsProcessorOutput
from sglx.srt.layers.pooler import Pooler, resolve_pooling_config
from sglx.srt.layers.sampler import Sampler
from sglx.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglx.srt.mem_cache.memory_pool import KVCache, MHATokenToKVPool, NoOpKVPool, ReqToTokenPool
from sglx.srt.model_executor.batch_result import EmbeddingBatchResult, GenerationBatchResult, HostCopy
from sglx.srt.model_executor.cuda_graph_runner import CudaGraphRunner
from sglx.srt.model_executor.forward_batch import ForwardBatch, ModelWorkerBatch
from sglx.srt.model_executor.model_loader import get_model
from sglx.srt.sampling.penalty_counts import PenaltyCounts
from sglx.srt.server_args import ServerArgs, resolve_attention_backends

logger = logging.getLogger(__name__)

# Without a GPU there is no memory to profile; this many KV tokens is a few hundred MB for small models.
CPU_DEFAULT_MAX_TOTAL_TOKENS = 32768

# Set to 1 to run every model's last layer on all rows (ForwardBatch.out_rows never set): A/B measurement only.
ALL_OUTPUT_ROWS_ENV = "SGLX_ALL_OUTPUT_ROWS"


# Attention backends whose extend path runs on the raw k/v when ForwardBatch.skip_kv_cache is set (they then
# never touch the KV pool; their class says so with `supports_skip_kv_cache = True`, checked at start-up).
# Any other backend serves embedding models through a real KV pool instead (the cache path). The set is by
# name because the pool is built before the backend. flashinfer and fa3 run VarlenAttention on the raw k/v.
SKIP_KV_CACHE_BACKENDS = frozenset({"torch_native", "triton", "flashinfer", "fa3"})


def decide_skip_kv_cache(model_config: ModelConfig, server_args: ServerArgs) -> bool:
    """The one place that decides whether attention skips the KV cache.

    Serving embeddings is prefill only: every request is one forward whose K/V is written and never read
    again. So the KV pool can be a no-op pool (no memory: it goes to larger batches) and attention can run
    on the raw K/V of the batch, but only when:
      * the model serves embeddings (no decode step will ever read the cache);
      * the radix cache is off: with it on, a later request would match a cached prefix whose slots point
        at KV that was never written, and attend to garbage;
      * chunked prefill is off: a later chunk reads the earlier chunks' K/V from the pool;
      * the prefill attention backend implements the raw-K/V path (SKIP_KV_CACHE_BACKENDS);
      * --disable-embedding-skip-kv-cache is not set (it keeps the cache path, for A/B measurement).
    """
    return (
        model_config.is_embedding
        and not server_args.disable_embedding_skip_kv_cache
        and server_args.disable_radix_cache
        and server_args.chunked_prefill_size == -1
        and server_args.prefill_attention_backend in SKIP_KV_CACHE_BACKENDS
    )


def embedding_trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward(input_ids, positions, fb) gives the final hidden states [tokens, hidden]:
    an encoder itself, or a causal LM's `.model` (its output is after the final norm, like transformers'
    `last_hidden_state`)."""
    if getattr(model, "forward_returns_hidden_states", False):
        return model
    trunk = getattr(model, "model", None)
    if trunk is None:
        raise ValueError(f"{type(model).__name__} cannot serve embeddings: no hidden-state trunk")
    return trunk


def set_host_threads(device: torch.device, num_threads: Optional[int]) -> None:
    """torch's intra-op threads in this process: `num_threads` when given; else torch's default (every core) on
    CPU, where the model runs on them, and one thread on CUDA, where the host only launches kernels. Measured on
    an H100 host (docs/benchmarks.md): with OMP_NUM_THREADS=8 exported, a Triton RMSNorm launch took 75 us of
    host time and a linear 26 us; with one thread 34 and 14 us, the same as torch's default without the
    variable. A 14k-token prefill launches ~470 kernels: with the variable, the host's launches of one
    (30 ms) nearly caught up with the GPU's work (33 ms)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    elif device.type == "cuda":
        torch.set_num_threads(1)


class ModelRunner:
    def __init__(self, model_config: ModelConfig, server_args: ServerArgs) -> None:
        self.model_config = model_config
        self.server_args = server_args
        resolve_attention_backends(server_args)  # the per-GPU default, where no backend was named
        self.device = torch.device(server_args.device)
        self.page_size = server_args.page_size
        torch.manual_seed(server_args.random_seed)
        set_host_threads(self.device, server_args.num_threads)
        self.model = get_model(model_config, server_args.load_format, str(self.device), server_args.quantization)
        self.kv_cache_dtype = KV_DTYPES.get(server_args.kv_cache_dtype, model_config.dtype)
        self.skip_kv_cache = decide_skip_kv_cache(model_config, server_args)
        self.init_memory_pool()
        self.attn_backend = create_model_attention_backend(server_args, self)
        prefill_backend = self.attn_backend.prefill if isinstance(self.attn_backend, HybridAttnBackend) \
            else self.attn_backend
        if self.skip_kv_cache and not getattr(prefill_backend, "supports_skip_kv_cache", False):
            raise RuntimeError(f"{type(prefill_backend).__name__} is listed in SKIP_KV_CACHE_BACKENDS but does "
                               "not implement the raw-K/V path (supports_skip_kv_cache)")
        self.sampler = Sampler(backend=server_args.sampling_backend)
        # Penalized requests' token counts, advanced on the device by every sampling step (grows on demand).
        self.penalty_counts = PenaltyCounts(model_config.vocab_size, self.device)
        self.cuda_graph_runner = self.init_cuda_graphs()
        self.pooler: Optional[Pooler] = None
        if model_config.is_embedding:
            self.pooler = Pooler(resolve_pooling_config(
                model_config.model_path, not model_config.is_encoder_only, server_args.pooling,
                server_args.no_normalize,
            ))

    # ------------------------------------------------------------------ memory
    def cell_size_bytes(self) -> int:
        c = self.model_config
        elt = torch.empty(0, dtype=self.kv_cache_dtype).element_size()
        return c.num_key_value_heads * c.head_dim * c.num_hidden_layers * 2 * elt

    def profile_max_num_token(self) -> int:
        if self.device.type != "cuda":
            return CPU_DEFAULT_MAX_TOTAL_TOKENS
        # Blocks the caching allocator holds but nothing uses (an earlier runner in this process, a test's
        # tensors) would otherwise count as taken.
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        # Leave (1 - mem_fraction_static) of the card to activations, graphs and the allocator.
        budget = free - total * (1.0 - self.server_args.mem_fraction_static)
        return max(int(budget // self.cell_size_bytes()), 0)

    def init_memory_pool(self) -> None:
        sa, c = self.server_args, self.model_config
        max_tokens = self.profile_max_num_token()
        if sa.max_total_tokens is not None:
            # A real pool must fit the card. The skip-KV pool reserves nothing: its slot count is a batch-token
            # budget only, so the user's number stands (activation memory is then what bounds a batch).
            fits_anyway = self.device.type != "cuda" or self.skip_kv_cache
            max_tokens = sa.max_total_tokens if fits_anyway else min(max_tokens, sa.max_total_tokens)
        max_tokens = max_tokens // self.page_size * self.page_size
        if max_tokens < 2 * self.page_size:
            raise RuntimeError(f"not enough memory for the KV cache: {max_tokens} tokens")
        self.max_total_num_tokens = max_tokens
        self.max_running_requests = sa.max_running_requests
        self.req_to_token_pool = ReqToTokenPool(self.max_running_requests + 1, c.context_len + 4, str(self.device))
        # The newest sampled token of each request row, kept on the device: a decode step reads its input ids
        # here (ModelWorkerBatch.input_ids is None), so the host need not know them yet (overlap schedule).
        self.last_token_ids = torch.zeros(self.req_to_token_pool.req_to_token.shape[0], dtype=torch.int64,
                                          device=self.device)
        # With the KV cache skipped, max_tokens still bounds the tokens of a batch (through the allocator,
        # whose slot numbers are then bookkeeping only), but no memory is reserved for them.
        self.token_to_kv_pool: KVCache = NoOpKVPool(
            max_tokens, self.page_size, self.kv_cache_dtype, str(self.device)
        ) if self.skip_kv_cache else MHATokenToKVPool(
            max_tokens, self.page_size, self.kv_cache_dtype, c.num_key_value_heads, c.head_dim,
            c.num_hidden_layers, str(self.device),
        )
        if self.page_size == 1:
            self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(max_tokens, str(self.device))
        else:
            self.token_to_kv_pool_allocator = PagedTokenToKVPoolAllocator(max_tokens, self.page_size, str(self.device))
        logger.info("KV cache: %d tokens (%.1f MB), page size %d%s", max_tokens,
                    self.token_to_kv_pool.mem_usage_bytes() / 2**20, self.page_size,
                    " (skipped: prefill-only embeddings; the size is the batch-token budget)"
                    if self.skip_kv_cache else "")

    def init_cuda_graphs(self) -> Optional[CudaGraphRunner]:
        sa = self.server_args
        if self.device.type != "cuda" or sa.disable_cuda_graph or self.model_config.is_embedding:
            return None  # embeddings never decode
        if not self.attn_backend.supports_cuda_graph:  # HybridAttnBackend: its decode backend's
            logger.warning("CUDA graphs off: the %s decode backend does not support them",
                           sa.decode_attention_backend)
            return None
        return CudaGraphRunner(self)

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, batch: ModelWorkerBatch) -> LogitsProcessorOutput:
        if self.cuda_graph_runner is not None and self.cuda_graph_runner.can_run(batch):
            return self.cuda_graph_runner.replay(batch)
        fb = ForwardBatch.init_new(batch, self)
        if fb.input_logprob_indices is None:  # next-token logits read only each request's last row
            fb.out_rows = self.output_rows(self.model, fb, fb.last_token_rows)
        self.attn_backend.init_forward_metadata(fb)
        return self.model.forward(fb.input_ids, fb.positions, fb)

    def output_rows(
        self, model: torch.nn.Module, fb: ForwardBatch, rows: Callable[[], Optional[torch.Tensor]]
    ) -> Optional[torch.Tensor]:
        """ForwardBatch.out_rows for an extend batch whose reader needs only `rows()`: set where the model honours
        it (`supports_output_rows`), every request has a new token, and SGLX_ALL_OUTPUT_ROWS is not 1."""
        if (not getattr(model, "supports_output_rows", False) or not fb.forward_mode.is_extend()
                or min(fb.extend_seq_lens_cpu, default=0) == 0 or os.environ.get(ALL_OUTPUT_ROWS_ENV, "0") == "1"):
            return None
        return rows()

    @torch.inference_mode()
    def forward_batch_generation(self, batch: ModelWorkerBatch) -> GenerationBatchResult:
        """Forward, sample, record each request's new token in `last_token_ids` (and, for penalized requests,
        in `penalty_counts`), and start copying the sampled tokens to the host. Nothing here waits for the
        device."""
        return self.sample(batch, self.forward(batch))

    @torch.inference_mode()
    def sample(self, batch: ModelWorkerBatch, logits_output: LogitsProcessorOutput) -> GenerationBatchResult:
        """The sampling half of forward_batch_generation, for logits `forward` already queued (the scheduler
        runs it apart when the sampling info needs the previous step's tokens, see Scheduler.step)."""
        batch.sampling_info.resolve_gates(self.last_token_ids)  # (before last_token_ids takes this step's ids)
        sampler_output = self.sampler(
            logits_output.next_token_logits, batch.sampling_info,
            return_logprob=batch.return_logprob, top_logprobs_nums=batch.top_logprobs_nums,
        )
        rows = torch.tensor(batch.req_pool_indices, dtype=torch.int64).to(self.device, non_blocking=True)
        self.last_token_ids.index_copy_(0, rows, sampler_output.next_token_ids)
        batch.sampling_info.record_sampled(sampler_output.next_token_ids)
        result = GenerationBatchResult(logits_output, sampler_output, batch.top_logprobs_nums)
        result.start_host_copy()
        return result

    @torch.inference_mode()
    def forward_batch_embedding_async(self, batch: ModelWorkerBatch) -> EmbeddingBatchResult:
        """forward_batch_embedding, its result copied to the host without waiting (see EmbeddingBatchResult)."""
        return EmbeddingBatchResult(HostCopy([self.forward_batch_embedding(batch)]))

    @torch.inference_mode()
    def forward_batch_embedding(self, batch: ModelWorkerBatch) -> torch.Tensor:
        """One pooled (and, per the pooling config, L2-normalized) float32 embedding per request."""
        if self.pooler is None:
            raise RuntimeError("this model runner was not built for an embedding model")
        fb = ForwardBatch.init_new(batch, self)
        trunk = embedding_trunk(self.model)
        fb.out_rows = self.output_rows(trunk, fb, lambda: self.pooler.rows(fb))
        self.attn_backend.init_forward_metadata(fb)
        hidden_states = trunk(fb.input_ids, fb.positions, fb)
        return self.pooler(hidden_states, fb)
