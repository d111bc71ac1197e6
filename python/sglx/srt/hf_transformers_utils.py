"""Tokenizer loading and the generation facts that live next to it (stop tokens, chat template)."""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Set, Union

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def get_tokenizer(tokenizer_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A fast tokenizer from a HF directory, or the one embedded in a GGUF file's metadata."""
    if tokenizer_path.lower().endswith(".gguf"):
        if not os.path.isfile(tokenizer_path):
            raise FileNotFoundError(f"GGUF file not found: {tokenizer_path}")
        dirname, basename = os.path.split(os.path.abspath(tokenizer_path))
        return AutoTokenizer.from_pretrained(dirname, gguf_file=basename)
    return AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)


def _as_ids(value: Union[None, int, Iterable[int]]) -> Set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _model_dir(tokenizer: Any, hf_config: Any) -> Optional[str]:
    """The directory the model came from, when there is one on disk (GGUF: the file's directory)."""
    for candidate in (getattr(tokenizer, "name_or_path", None), getattr(hf_config, "_name_or_path", None)):
        if isinstance(candidate, str) and candidate:
            if os.path.isfile(candidate):
                candidate = os.path.dirname(candidate)
            if os.path.isdir(candidate):
                return candidate
    return None


def _generation_config_eos(model_dir: Optional[str]) -> Set[int]:
    if model_dir is None or not os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        return set()
    from transformers import GenerationConfig

    return _as_ids(GenerationConfig.from_pretrained(model_dir).eos_token_id)


def get_eos_token_ids(tokenizer: Any, hf_config: Any) -> Set[int]:
    """Every token id that ends generation: chat models often stop on a turn marker that only the config
    or generation_config.json names, besides the tokenizer's own eos."""
    ids = _as_ids(getattr(tokenizer, "eos_token_id", None)) if tokenizer is not None else set()
    ids |= _as_ids(getattr(hf_config, "eos_token_id", None))
    get_text = getattr(hf_config, "get_text_config", None)
    if get_text is not None:
        ids |= _as_ids(getattr(get_text(), "eos_token_id", None))
    ids |= _generation_config_eos(_model_dir(tokenizer, hf_config))
    return ids


def get_chat_template(tokenizer: Any) -> Optional[str]:
    """The tokenizer's Jinja chat template; with several named templates, the default one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


__all__ = ["get_tokenizer", "get_eos_token_ids", "get_chat_template"]
