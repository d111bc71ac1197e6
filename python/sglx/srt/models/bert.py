"""BERT encoders for embedding serving: BertModel (e.g. all-MiniLM-L6-v2), RobertaModel and XLMRobertaModel
(e.g. all-distilroberta-v1, multilingual-e5, bge-m3).

Bidirectional attention through RadixAttention(is_causal=False), absolute position and token-type
embeddings, post-LN layers. Module names follow transformers so checkpoints load by name; only query/key/value
are fused into one matmul. `forward` returns the last hidden states [num_tokens, hidden] (transformers'
`last_hidden_state`); pooling happens in the model runner. BERT's own `pooler` (dense + tanh on [CLS]) is not
used by sentence embeddings, so its weights are skipped. RoBERTa differs only in its position ids (counted
from pad_token_id + 1, over non-pad tokens), its checkpoint prefix and a one-row token-type table.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sglx.srt.layers.linear import StackedLinear
from sglx.srt.layers.radix_attention import RadixAttention
from sglx.srt.model_executor.forward_batch import ForwardBatch
from sglx.srt.model_executor.model_loader.weight_utils import load_named_weights

_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # erf form, as transformers' "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# Checkpoint tensors that are not part of the encoder we serve.
_SKIPPED_PREFIXES = ("pooler.", "cls.", "lm_head.", "embeddings.position_ids")
_QKV = {"query": "q", "key": "k", "value": "v"}


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))


class BertSelfAttention(nn.Module):
    def __init__(self, config: Any, layer_id: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        size = self.num_heads * self.head_dim
        self.qkv_proj = StackedLinear(config.hidden_size, [("q", size), ("k", size), ("v", size)], bias=True)
        self.attn = RadixAttention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_heads, layer_id, is_causal=False
        )

    def forward(self, hidden_states: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        # Row-strided column views of qkv: every backend reads the strides (as LlamaAttention passes them).
        q, k, v = self.qkv_proj(hidden_states).chunk(3, dim=-1)
        return self.attn(q, k, v, fb)


class BertDenseLayerNorm(nn.Module):
    """dense -> add the residual -> LayerNorm (transformers' BertSelfOutput / BertOutput)."""

    def __init__(self, in_features: int, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: Any, layer_id: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, layer_id)  # transformers' name: attention.self.*
        self.output = BertDenseLayerNorm(config.hidden_size, config)

    def forward(self, hidden_states: torch.Tensor, fb: ForwardBatch, out_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """With `out_rows`, everything after attention (dense, residual, LayerNorm) runs on those rows only."""
        context = self.self(hidden_states, fb)
        if out_rows is not None:
            context, hidden_states = context.index_select(0, out_rows), hidden_states.index_select(0, out_rows)
        return self.output(context, hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BERT hidden_act {config.hidden_act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int) -> None:
        super().__init__()
        self.attention = BertAttention(config, layer_id)
        self.intermediate = BertIntermediate(config)
        self.output = BertDenseLayerNorm(config.intermediate_size, config)

    def forward(self, hidden_states: torch.Tensor, fb: ForwardBatch, out_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        attn = self.attention(hidden_states, fb, out_rows)
        return self.output(self.intermediate(attn), attn)


class BertEncoder(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config, i) for i in range(config.num_hidden_layers)])


class BertModel(nn.Module):
    # The model runner pools `forward`'s output directly (a causal LM is pooled through its `.model` trunk).
    forward_returns_hidden_states = True
    # Honours ForwardBatch.out_rows: the last layer keeps only the pooled rows after its attention.
    supports_output_rows = True

    def __init__(self, config: Any) -> None:
        super().__init__()
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"BERT position_embedding_type {config.position_embedding_type!r} is not supported")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    # A checkpoint's tensors may carry the task model's prefix (BertFor*, RobertaFor*).
    checkpoint_prefix = "bert."

    def position_ids(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return positions

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        token_type_ids = fb.token_type_ids if fb.token_type_ids is not None else torch.zeros_like(input_ids)
        hidden_states = self.embeddings(input_ids, self.position_ids(input_ids, positions), token_type_ids)
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            hidden_states = layer(hidden_states, fb, fb.out_rows if i == last else None)
        return hidden_states

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        prefix = self.checkpoint_prefix

        def strip(name: str) -> str:
            return name[len(prefix):] if name.startswith(prefix) else name

        named = ((strip(n), t) for n, t in weights)
        load_named_weights(self, ((n, t) for n, t in named if not n.startswith(_SKIPPED_PREFIXES)), _route_qkv)


def _route_qkv(name: str) -> Optional[Tuple[str, str, str]]:
    parts = name.rsplit(".", 2)  # [module path, query|key|value, weight|bias]
    if len(parts) == 3 and parts[1] in _QKV and parts[0].endswith("attention.self"):
        return f"{parts[0]}.qkv_proj", _QKV[parts[1]], parts[2]
    return None


class RobertaModel(BertModel):
    """transformers' position ids for RoBERTa: pad_token_id + the count of non-pad tokens so far in the
    sequence (a pad token itself gets pad_token_id). Encoders always run whole requests (no cached prefix), so
    a token's sequence starts `positions` tokens before it in the flat batch."""

    checkpoint_prefix = "roberta."

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.padding_idx = int(config.pad_token_id)

    def position_ids(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        real = (input_ids != self.padding_idx).long()
        counts = F.pad(torch.cumsum(real, 0), (1, 0))  # counts[i] = real tokens among the first i
        idx = torch.arange(1, input_ids.shape[0] + 1, device=input_ids.device)
        return (counts[idx] - counts[idx - 1 - positions]) * real + self.padding_idx


class XLMRobertaModel(RobertaModel):
    pass


EntryClass = [BertModel, RobertaModel, XLMRobertaModel]
