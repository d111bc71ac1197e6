"""The default model in transformers (fp32, from the same GGUF file): the independent reference of the tests."""

from __future__ import annotations

import os
from typing import Any, Tuple

import torch

from sglx.srt.server_args import default_model_path


def load_default_model() -> Tuple[Any, Any]:
    """(tokenizer, AutoModelForCausalLM in float32, eval mode) of SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return tok, model
