"""From per-token hidden states to one embedding per request: last / cls / mean pooling, optional L2 norm.

The pooling of a model comes from its sentence-transformers files when it has them (modules.json names a
Pooling module, whose `1_Pooling/config.json`-style file says which mode, and maybe a Normalize module);
otherwise decoders pool their last token and encoders their first ([CLS]) token, both normalized.
`--pooling` and `--no-normalize` override whatever the model says.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from sglx.srt.model_executor.forward_batch import ForwardBatch

ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"


class PoolingType(str, Enum):
    LAST = "last"
    CLS = "cls"
    MEAN = "mean"


# sentence-transformers' `pooling_mode_*` keys (and v3's `pooling_mode` string) -> ours.
_ST_MODES: Dict[str, PoolingType] = {
    "cls_token": PoolingType.CLS,
    "cls": PoolingType.CLS,
    "mean_tokens": PoolingType.MEAN,
    "mean": PoolingType.MEAN,
    "lasttoken": PoolingType.LAST,
}


@dataclass(frozen=True)
class PoolingConfig:
    pooling: PoolingType
    normalize: bool


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _st_pooling_mode(config: Dict[str, Any]) -> PoolingType:
    """The single pooling mode a sentence-transformers Pooling config turns on."""
    if isinstance(config.get("pooling_mode"), str):
        on = [config["pooling_mode"]]
    else:
        on = [k[len("pooling_mode_"):] for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
    if len(on) != 1 or on[0] not in _ST_MODES:
        raise ValueError(
            f"sentence-transformers pooling {on} is not supported (only cls, mean, lasttoken); "
            "pass --pooling {last,cls,mean}"
        )
    return _ST_MODES[on[0]]


# The files sentence-transformers' Transformer module reads its max_seq_length and do_lower_case from.
_ST_TOKENIZER_FILES = tuple(f"sentence_{m}_config.json" for m in
                            ("bert", "roberta", "distilbert", "camembert", "albert", "xlm-roberta", "xlnet"))


@dataclass(frozen=True)
class StTokenizerConfig:
    max_seq_length: Optional[int]  # sentence-transformers truncates inputs here (MiniLM: 256 of BERT's 512)
    do_lower_case: bool  # lowercase the text before tokenizing


def read_sentence_transformers_tokenizer_config(model_dir: str) -> Optional[StTokenizerConfig]:
    """The model's sentence_*_config.json, or None when it has none. sglx takes max_seq_length as the
    embedding context length (as vLLM does), so an input sentence-transformers would cut is cut (truncate) or
    refused the same way, instead of embedding tokens the model was never trained to see together."""
    for name in _ST_TOKENIZER_FILES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            conf = _read_json(path)
            limit = conf.get("max_seq_length")
            return StTokenizerConfig(limit if isinstance(limit, int) and limit > 0 else None,
                                     bool(conf.get("do_lower_case", False)))
    return None


def read_sentence_transformers_pooling(model_dir: str, override: Optional[PoolingType] = None) -> Optional[PoolingConfig]:
    """Pooling and normalization as the model's modules.json says (the pooling file is not read when
    `override` replaces it), or None when the model has no such file or no Pooling module."""
    modules_path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(modules_path):
        return None
    modules: List[Dict[str, Any]] = _read_json(modules_path)
    pooling_modules = [m for m in modules if m.get("type") == ST_POOLING]
    if not pooling_modules:
        return None
    pooling = override or _st_pooling_mode(
        _read_json(os.path.join(model_dir, pooling_modules[0].get("path", ""), "config.json"))
    )
    return PoolingConfig(pooling, normalize=any(m.get("type") == ST_NORMALIZE for m in modules))


def resolve_pooling_config(
    model_path: str, is_causal: bool, pooling: Optional[str] = None, no_normalize: bool = False
) -> PoolingConfig:
    """The model's own pooling (sentence-transformers files, else the family default), then the overrides."""
    override = PoolingType(pooling) if pooling is not None else None
    own = read_sentence_transformers_pooling(model_path, override) if os.path.isdir(model_path) else None
    if own is None:
        own = PoolingConfig(PoolingType.LAST if is_causal else PoolingType.CLS, normalize=True)
    return PoolingConfig(override or own.pooling, normalize=own.normalize and not no_normalize)


class Pooler(nn.Module):
    """Pools the new tokens of each request of an extend batch. Every token of a request must be in the batch
    for cls/mean (the scheduler guarantees it: no prefix cache, no chunking for those); last pooling only needs
    the last one."""

    def __init__(self, config: PoolingConfig) -> None:
        super().__init__()
        self.config = config

    def rows(self, fb: "ForwardBatch") -> Optional[torch.Tensor]:
        """The one row per request that last / cls pooling reads (ForwardBatch.out_rows), None for mean."""
        if self.config.pooling == PoolingType.LAST:
            return fb.last_token_rows()
        return fb.extend_start_loc if self.config.pooling == PoolingType.CLS else None

    def forward(self, hidden_states: torch.Tensor, fb: "ForwardBatch") -> torch.Tensor:
        """hidden_states [num_tokens, hidden] (or [batch_size, hidden], the rows of `fb.out_rows` when the model
        kept only those) -> [batch_size, hidden] float32."""
        h = hidden_states.float()
        starts, lens = fb.extend_start_loc, fb.extend_seq_lens
        kind = self.config.pooling
        if fb.out_rows is not None:
            fb.check_out_rows(h)
            pooled = h
        elif kind == PoolingType.LAST:
            pooled = h[starts + lens - 1]
        elif kind == PoolingType.CLS:
            pooled = h[starts]
        else:
            owner = torch.repeat_interleave(torch.arange(fb.batch_size, device=h.device), lens)
            sums = torch.zeros(fb.batch_size, h.shape[-1], dtype=h.dtype, device=h.device).index_add_(0, owner, h)
            pooled = sums / lens.clamp(min=1).to(h.dtype)[:, None]
        return F.normalize(pooled, p=2, dim=-1) if self.config.normalize else pooled
