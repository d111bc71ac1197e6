"""ModelRunner: owns the model, the KV memory and the attention backend; runs one batch at a time."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.layers.attention.registry import create_model_attention_backend
from sglx.srt.layers.logits_processor import LogitsProcessorOutput
from sglx.srt.layers.sampler import Sampler, SamplerOutput
from sglx.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglx.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglx.srt.model_executor.forward_batch import ForwardBatch, ModelWorkerBatch
from sglx.srt.model_executor.model_loader import get_model
from sglx.srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

# Without a GPU there is no memory to profile; this many KV tokens is a few hundred MB for small models.
CPU_DEFAULT_MAX_TOTAL_TOKENS = 32768

KV_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class GenerationBatchResult:
    logits_output: LogitsProcessorOutput
    sampler_output: Optional[SamplerOutput]


class ModelRunner:
    def __init__(self, model_config: ModelConfig, server_args: ServerArgs) -> None:
        self.model_config = model_config
        self.server_args = server_args
        self.device = torch.device(server_args.device)
        self.page_size = server_args.page_size
        torch.manual_seed(server_args.random_seed)
        if self.device.type == "cpu" and server_args.num_threads:
            torch.set_num_threads(server_args.num_threads)
        self.model = get_model(model_config, server_args.load_format, str(self.device))
        self.kv_cache_dtype = KV_DTYPES.get(server_args.kv_cache_dtype, model_config.dtype)
        self.init_memory_pool()
        self.attn_backend = create_model_attention_backend(server_args, self)
        self.sampler = Sampler()

    # ------------------------------------------------------------------ memory
    def cell_size_bytes(self) -> int:
        c = self.model_config
        elt = torch.empty(0, dtype=self.kv_cache_dtype).element_size()
        return c.num_key_value_heads * c.head_dim * c.num_hidden_layers * 2 * elt

    def profile_max_num_token(self) -> int:
        if self.device.type != "cuda":
            return CPU_DEFAULT_MAX_TOTAL_TOKENS
        free, total = torch.cuda.mem_get_info(self.device)
        # Leave (1 - mem_fraction_static) of the card to activations, graphs and the allocator.
        budget = free - total * (1.0 - self.server_args.mem_fraction_static)
        return max(int(budget // self.cell_size_bytes()), 0)

    def init_memory_pool(self) -> None:
        sa, c = self.server_args, self.model_config
        max_tokens = self.profile_max_num_token()
        if sa.max_total_tokens is not None:
            max_tokens = min(max_tokens, sa.max_total_tokens) if self.device.type == "cuda" else sa.max_total_tokens
        max_tokens = max_tokens // self.page_size * self.page_size
        if max_tokens < 2 * self.page_size:
            raise RuntimeError(f"not enough memory for the KV cache: {max_tokens} tokens")
        self.max_total_num_tokens = max_tokens
        self.max_running_requests = sa.max_running_requests
        self.req_to_token_pool = ReqToTokenPool(self.max_running_requests + 1, c.context_len + 4, str(self.device))
        self.token_to_kv_pool = MHATokenToKVPool(
            max_tokens, self.page_size, self.kv_cache_dtype, c.num_key_value_heads, c.head_dim,
            c.num_hidden_layers, str(self.device),
        )
        if self.page_size == 1:
            self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(max_tokens, str(self.device))
        else:
            self.token_to_kv_pool_allocator = PagedTokenToKVPoolAllocator(max_tokens, self.page_size, str(self.device))
        logger.info("KV cache: %d tokens (%.1f MB), page size %d", max_tokens,
                    max_tokens * self.cell_size_bytes() / 2**20, self.page_size)

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, batch: ModelWorkerBatch) -> LogitsProcessorOutput:
        fb = ForwardBatch.init_new(batch, self)
        self.attn_backend.init_forward_metadata(fb)
        return self.model.forward(fb.input_ids, fb.positions, fb)

    @torch.inference_mode()
    def forward_batch_generation(self, batch: ModelWorkerBatch) -> GenerationBatchResult:
        logits_output = self.forward(batch)
        sampler_output = self.sampler(
            logits_output.next_token_logits, batch.sampling_info,
            return_logprob=batch.return_logprob, top_logprobs_nums=batch.top_logprobs_nums,
        )
        return GenerationBatchResult(logits_output, sampler_output)
