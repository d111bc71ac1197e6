"""Building a model and filling its weights, from GGUF, safetensors, PyTorch .bin, or at random."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional, Tuple

import torch

from sglx.srt.configs.model_config import ModelConfig

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "gguf", "safetensors", "pt", "dummy")


def iterate_weights(model_config: ModelConfig, load_format: str = "auto") -> Iterator[Tuple[str, torch.Tensor]]:
    """(transformers parameter name, CPU tensor) pairs, one at a time; the model's load_weights casts and
    places them, so nothing here holds more than one tensor."""
    path = model_config.model_path
    if load_format not in LOAD_FORMATS or load_format == "dummy":
        raise ValueError(
            f"--load-format for real weights must be one of auto, gguf, safetensors, pt; got {load_format!r}"
        )
    if load_format == "auto":
        load_format = "gguf" if model_config.is_gguf else "hf_dir"
    if load_format == "gguf":
        from sglx.srt.model_executor.model_loader.gguf_loader import iterate_gguf_weights

        return iterate_gguf_weights(path, model_config.num_attention_heads, model_config.num_key_value_heads)
    if not os.path.isdir(path):
        raise ValueError(f"--load-format {load_format} needs a model directory; got {path}")
    from sglx.srt.model_executor.model_loader import safetensors_loader as st

    if load_format == "safetensors":
        return st.iterate_safetensors_weights(path)
    if load_format == "pt":
        return st.iterate_bin_weights(path)
    return st.iterate_hf_dir_weights(path)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def _skip_param_init():
    """Every parameter is overwritten by the loader, so the default random init (seconds for a small model,
    minutes for a large one) is skipped."""
    classes = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)
    saved = [c.reset_parameters for c in classes]
    for c in classes:
        c.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for c, f in zip(classes, saved):
            c.reset_parameters = f


def get_model(
    model_config: ModelConfig, load_format: str, device: str, quantization: Optional[str] = None
) -> torch.nn.Module:
    """The model in eval mode with its weights loaded; with `quantization`, converted in place after loading
    (online quantization of full-precision weights, layers/quantization)."""
    from sglx.srt.layers.quantization import check_device_support
    from sglx.srt.layers.quantization.fp8_checkpoint import fp8_checkpoint_config
    from sglx.srt.models.registry import get_model_class

    if quantization is not None:
        check_device_support(quantization, torch.device(device))  # before minutes of loading, not after

    # An FP8 checkpoint (its config's quantization_config) is loaded into Fp8Linear as stored; dummy weights of
    # such a config are full precision (random), quantized online only if --quantization asks.
    fp8_ckpt = None if load_format == "dummy" else fp8_checkpoint_config(model_config.hf_config)
    if fp8_ckpt is not None and fp8_ckpt.dequantize:
        logger.warning("%s holds block-wise FP8 weights: dequantized to %s as they load (sglx has no block-scaled "
                       "GEMM yet)%s", model_config.model_path, model_config.dtype,
                       "; --quantization fp8 then quantizes them per channel" if quantization == "fp8" else
                       "; add --quantization fp8 to serve them in FP8 again")
    elif fp8_ckpt is not None:
        if quantization not in (None, "fp8"):
            raise ValueError(f"{model_config.model_path} is an FP8 checkpoint: --quantization {quantization} "
                             "cannot apply to it")
        check_device_support("fp8", torch.device(device))
        quantization = None  # already FP8

    model_class = get_model_class(model_config.architecture)
    # Parameters are created directly on the device and in the serving dtype: no fp32 CPU copy first.
    with torch.device(device), _default_dtype(model_config.dtype), _skip_param_init():
        model = model_class(model_config.hf_config)
    if load_format == "dummy":
        from sglx.srt.model_executor.model_loader.dummy_loader import init_dummy_weights

        init_dummy_weights(model)
    elif fp8_ckpt is not None and fp8_ckpt.dequantize:
        from sglx.srt.layers.quantization.fp8_checkpoint import dequantized_weights

        model.load_weights(dequantized_weights(iterate_weights(model_config, load_format), fp8_ckpt))
    elif fp8_ckpt is not None:
        from sglx.srt.layers.quantization.fp8 import fuse_input_quantization
        from sglx.srt.layers.quantization.fp8_checkpoint import fp8_checkpoint_weights, prepare_fp8_model

        n = prepare_fp8_model(model, fp8_ckpt)
        model.load_weights(fp8_checkpoint_weights(iterate_weights(model_config, load_format)))
        logger.info("FP8 checkpoint (%s scales): %d linear layers loaded in e4m3; %d inputs quantized by the "
                    "layer before", fp8_ckpt.scheme, n, fuse_input_quantization(model))
    else:
        model.load_weights(iterate_weights(model_config, load_format))
    if not model_config.is_embedding and not getattr(model, "can_generate", True):
        raise ValueError(f"{model_config.model_path} has no lm_head (a bare-trunk checkpoint, such as an embedding "
                         "model's): serve it with --is-embedding")
    if quantization is not None:
        from sglx.srt.layers.quantization import apply_quantization

        n = apply_quantization(model, quantization)
        logger.info("--quantization %s: %d linear layers converted", quantization, n)
    return model.eval()


__all__ = ["LOAD_FORMATS", "get_model", "iterate_weights"]
