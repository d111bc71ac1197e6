"""What the engine needs to know about a model, read once from a HF directory or a GGUF file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

if TYPE_CHECKING:
    from sglx.srt.layers.pooler import StTokenizerConfig

# Architectures that produce embeddings rather than next-token logits, whatever the caller asked for.
EMBEDDING_ARCHITECTURES = frozenset({"BertModel", "RobertaModel", "XLMRobertaModel"})
# Encoders whose position ids start at pad_token_id + 1: pad_token_id + 1 rows of the table are never a token's.
_PAD_OFFSET_POSITIONS = frozenset({"RobertaModel", "XLMRobertaModel"})

# Keys that different model families use for their trained context length, most common first.
_CONTEXT_LEN_KEYS = (
    "max_position_embeddings",
    "max_sequence_length",
    "max_seq_len",
    "seq_length",
    "n_positions",
    "model_max_length",
)

_DTYPE_NAMES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# --kv-cache-dtype values ("auto": the model's dtype).
KV_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16, "float32": torch.float32}


def load_hf_config(model_path: str, trust_remote_code: bool = False) -> Any:
    """The transformers config of a HF directory, or of a GGUF file (built from its metadata)."""
    from transformers import AutoConfig

    if model_path.lower().endswith(".gguf"):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"GGUF file not found: {model_path}")
        dirname, basename = os.path.split(os.path.abspath(model_path))
        return AutoConfig.from_pretrained(dirname, gguf_file=basename)
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise FileNotFoundError(f"{model_path} is neither a .gguf file nor a directory with config.json")
    return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def resolve_architecture(hf_config: Any) -> str:
    """The model class name: the config's `architectures`, else what transformers maps the model_type to
    (GGUF-derived configs carry only model_type). Encoders resolve to their base model; decoders to their
    causal-LM class even with --is-embedding: the model runner pools the causal LM's trunk (`.model`)."""
    archs = getattr(hf_config, "architectures", None)
    if archs:
        return archs[0]
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_MAPPING_NAMES,
    )

    model_type = hf_config.model_type
    if MODEL_MAPPING_NAMES.get(model_type) in EMBEDDING_ARCHITECTURES:
        return MODEL_MAPPING_NAMES[model_type]
    for table in (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES):
        if model_type in table:
            return table[model_type]
    raise ValueError(f"Cannot tell the architecture of model_type {model_type!r}: config has no `architectures`")


def check_dtype_name(flag: str, name: str, table: Dict[str, torch.dtype]) -> None:
    """`auto` or a key of `table` (_DTYPE_NAMES, KV_DTYPES), else a ValueError naming the choices."""
    if name != "auto" and name not in table:
        raise ValueError(f"{flag} must be auto or one of {', '.join(sorted(table))}; got {name!r}")


def resolve_dtype(dtype: str, hf_config: Any, device: str) -> torch.dtype:
    check_dtype_name("--dtype", dtype, _DTYPE_NAMES)
    if dtype != "auto":
        return _DTYPE_NAMES[dtype]
    # CPU: bf16 matmuls are slow there and parity with fp32 references matters more.
    if not device.startswith("cuda"):
        return torch.float32
    config_dtype = getattr(hf_config, "dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = _DTYPE_NAMES.get(config_dtype)
    return config_dtype if config_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def derive_context_len(text_config: Any, architecture: str = "") -> int:
    for key in _CONTEXT_LEN_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            if architecture in _PAD_OFFSET_POSITIONS and key == "max_position_embeddings":
                value -= int(getattr(text_config, "pad_token_id", 1) or 0) + 1  # RoBERTa: 514 -> 512
            return value
    return 2048  # the config names no limit at all; a conservative guess beats failing


@dataclass(frozen=True)
class ModelConfig:
    model_path: str
    hf_config: Any
    architecture: str
    dtype: torch.dtype
    context_len: int
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    is_gguf: bool
    is_embedding: bool
    # An embedding model's sentence_*_config.json (max_seq_length, do_lower_case), read once here.
    st_tokenizer: Optional["StTokenizerConfig"] = None

    @property
    def is_encoder_only(self) -> bool:
        """Bidirectional encoders (BERT): every token sees every other, so a request must run in one piece
        (no prefix cache, no chunked prefill)."""
        return self.architecture in EMBEDDING_ARCHITECTURES

    @property
    def hf_text_config(self) -> Any:
        """The language-model part of the config (the whole config for text-only models)."""
        return _text_config(self.hf_config)

    @staticmethod
    def from_path(
        model_path: str,
        *,
        dtype: str = "auto",
        context_length: Optional[int] = None,
        is_embedding: bool = False,
        device: str = "cpu",
        trust_remote_code: bool = False,
    ) -> "ModelConfig":
        hf_config = load_hf_config(model_path, trust_remote_code)
        architecture = resolve_architecture(hf_config)
        text = _text_config(hf_config)
        num_heads = int(text.num_attention_heads)
        num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        derived = derive_context_len(text, architecture)
        is_embedding = is_embedding or architecture in EMBEDDING_ARCHITECTURES
        st = _sentence_transformers_tokenizer(model_path) if is_embedding else None
        st_limit = st.max_seq_length if st is not None else None
        if architecture in EMBEDDING_ARCHITECTURES and context_length is not None and context_length > derived:
            raise ValueError(f"--context-length {context_length} is longer than {architecture}'s learned position "
                             f"table allows ({derived} tokens)")
        return ModelConfig(
            model_path=model_path,
            hf_config=hf_config,
            architecture=architecture,
            dtype=resolve_dtype(dtype, hf_config, device),
            context_len=context_length if context_length is not None else min(derived, st_limit or derived),
            vocab_size=int(text.vocab_size),
            hidden_size=int(text.hidden_size),
            num_hidden_layers=int(text.num_hidden_layers),
            num_attention_heads=num_heads,
            num_key_value_heads=int(num_kv_heads),
            head_dim=int(head_dim),
            is_gguf=model_path.lower().endswith(".gguf"),
            is_embedding=is_embedding,
            st_tokenizer=st,
        )


def _sentence_transformers_tokenizer(model_path: str) -> Optional["StTokenizerConfig"]:
    """An embedding model's sentence-transformers tokenizer settings, if it has them (see layers/pooler.py)."""
    if not os.path.isdir(model_path):
        return None
    from sglx.srt.layers.pooler import read_sentence_transformers_tokenizer_config

    return read_sentence_transformers_tokenizer_config(model_path)


def _text_config(hf_config: Any) -> Any:
    get = getattr(hf_config, "get_text_config", None)
    return get() if get is not None else hf_config
