"""Llama-family decoder (Llama 2/3, Mistral, SmolLM, Qwen2 with q/k/v bias), SGLang-style.

Checkpoint names follow transformers; q/k/v and gate/up are fused into one matmul each.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Tuple

import torch
from torch import nn

from sglx.srt.layers.activation import SiluAndMul
from sglx.srt.layers.layernorm import RMSNorm
from sglx.srt.layers.linear import StackedLinear
from sglx.srt.layers.logits_processor import LogitsProcessor, LogitsProcessorOutput
from sglx.srt.layers.radix_attention import RadixAttention
from sglx.srt.layers.rotary_embedding import get_rope, qk_norm_rope
from sglx.srt.model_executor.forward_batch import ForwardBatch
from sglx.srt.model_executor.model_loader.weight_utils import load_named_weights

# checkpoint sub-name -> (fused module attribute, shard name)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaMLP(nn.Module):
    # The activation's output feeds only down_proj: under --quantization fp8 it is emitted quantized.
    fp8_input_pairs = (("act_fn", "down_proj"),)

    def __init__(self, config: Any) -> None:
        super().__init__()
        inter = config.intermediate_size
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = StackedLinear(config.hidden_size, [("gate", inter), ("up", inter)], bias=bias)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    qk_norm = False

    def __init__(self, config: Any, layer_id: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False) or getattr(config, "model_type", "") == "qwen2"
        self.qkv_proj = StackedLinear(
            config.hidden_size, [("q", self.q_size), ("k", self.kv_size), ("v", self.kv_size)], bias=bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=getattr(config, "attention_bias", False))
        self.rotary_emb = get_rope(config, self.head_dim, config.max_position_embeddings)
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", False) else None
        self.attn = RadixAttention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads, layer_id,
            sliding_window_size=window or -1,
        )
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, fb: ForwardBatch,
        out_rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:  # fmt: skip
        """Attention of every token; with `out_rows`, o_proj runs on (and the result holds) those rows only."""
        qkv = self.qkv_proj(hidden_states)
        # Column views of qkv (rows qkv-width apart): every attention backend takes such row-strided q/k/v.
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q, k = qk_norm_rope(positions, q, k, self.q_norm, self.k_norm, self.rotary_emb)
        else:
            q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, fb)
        return self.o_proj(out if out_rows is None else out.index_select(0, out_rows))


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention
    # Each norm's output feeds one linear only: under --quantization fp8 the norm emits it quantized.
    fp8_input_pairs = (("input_layernorm", "self_attn.qkv_proj"), ("post_attention_layernorm", "mlp.gate_up_proj"))

    def __init__(self, config: Any, layer_id: int) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_id)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, fb: ForwardBatch, residual: Optional[torch.Tensor],
        out_rows: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """With `out_rows` (the last layer of a batch that reads only those rows): everything after attention
        runs on those rows only."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, fb, out_rows)
        if out_rows is not None:
            residual = residual.index_select(0, out_rows)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    layer_cls = LlamaDecoderLayer
    # Honours ForwardBatch.out_rows: after the last layer's attention the rows nobody reads are dropped (that
    # layer's k/v, stored for later steps, was computed for every token before).
    supports_output_rows = True

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([self.layer_cls(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden_states, residual = layer(positions, hidden_states, fb, residual, fb.out_rows if i == last else None)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    model_cls = LlamaModel
    supports_output_rows = True  # the trunk drops the rows; the logits processor then takes them all

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_cls(config)
        self.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    @property
    def can_generate(self) -> bool:
        """False after loading a bare-trunk checkpoint without an lm_head: it can only serve embeddings."""
        return self.tie_word_embeddings or self.lm_head is not None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if not self.can_generate:
            raise RuntimeError("this checkpoint has no lm_head: serve it with --is-embedding")
        return self.model.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> LogitsProcessorOutput:
        hidden_states = self.model(input_ids, positions, fb)
        return self.logits_processor(hidden_states, self.lm_head_weight, fb)

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """transformers' *ForCausalLM names; a bare-trunk checkpoint (transformers' *Model, as Qwen3-Embedding
        ships under a *ForCausalLM config) has no "model." prefix and no lm_head: its names are prefixed, and
        without an lm_head the model serves embeddings only (the model loader refuses to serve it for generation)."""
        skip = lambda n: "rotary_emb.inv_freq" in n or (self.tie_word_embeddings and n == "lm_head.weight")
        named = ((n if n.startswith(("model.", "lm_head.")) else f"model.{n}", t) for n, t in weights)
        optional = () if self.tie_word_embeddings else ("lm_head.weight",)
        loaded = load_named_weights(self, ((n, t) for n, t in named if not skip(n)), _route_stacked, optional)
        if optional and "lm_head.weight" not in loaded:
            self.lm_head = None  # drop the uninitialized head: random weights must never be served


def _route_stacked(name: str) -> Optional[Tuple[str, str, str]]:
    parts = name.rsplit(".", 2)  # [module path, sub-module, weight|bias]
    if len(parts) == 3 and parts[1] in STACKED_PARAMS:
        fused, shard = STACKED_PARAMS[parts[1]]
        return f"{parts[0]}.{fused}", shard, parts[2]
    return None


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


EntryClass = [LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM]
