"""Weights from a GGUF file: dequantized to float32 and renamed to transformers' parameter names.

The tensor directory is read by a small header walker of our own instead of `gguf.GGUFReader`: the reader
builds numpy views for every tokenizer string (about 100k of them for a 49k vocab), which costs seconds we
would pay on every start, while we only need the tensor table. Dequantization is `gguf.quants.dequantize`,
the same routine transformers uses, so the results match its GGUF loading bit for bit.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

_GGUF_MAGIC = b"GGUF"
# Fixed-size GGUF metadata value types (gguf.GGUFValueType) -> byte size; 8 is STRING, 9 is ARRAY.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4

# llama.cpp's names for whole-model tensors and for per-block tensors (blk.N.<name>) -> HF names.
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma has four norms per block, and llama.cpp's ffn_norm is the one *before* the MLP there.
_GEMMA_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_NAMES_BY_ARCH = {"gemma2": _GEMMA_BLOCK_NAMES, "gemma3": _GEMMA_BLOCK_NAMES}
# Tensors llama.cpp stores that transformers recomputes from the config instead.
_SKIPPED = frozenset({"rope_freqs"})
# Architectures whose q/k rows llama.cpp's converter interleaved for its rotary layout.
_ROPE_PERMUTED_ARCHS = frozenset({"llama"})
# Architectures whose RMSNorm computes x * (1 + w): llama.cpp stores w + 1.
_NORM_PLUS_ONE_ARCHS = frozenset({"gemma2", "gemma3"})

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: Tuple[int, ...]  # numpy order: GGUF lists dims fastest-first, numpy slowest-first
    qtype: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFDirectory:
    architecture: str
    alignment: int
    tensors: List[GGUFTensorInfo]


class _Cursor:
    """Little-endian reads over a buffer, advancing a position."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_value(self, vtype: int) -> None:
        if vtype in _SCALAR_SIZES:
            self.pos += _SCALAR_SIZES[vtype]
        elif vtype == _STRING:
            (length,) = self.unpack("Q")
            self.pos += length
        elif vtype == _ARRAY:
            item_type, count = self.unpack("IQ")
            if item_type in _SCALAR_SIZES:
                self.pos += _SCALAR_SIZES[item_type] * count
            else:
                for _ in range(count):
                    self.skip_value(item_type)
        else:
            raise ValueError(f"corrupt GGUF: unknown metadata value type {vtype} at byte {self.pos}")


def read_gguf_directory(path: str) -> GGUFDirectory:
    """The tensor table of a GGUF file, skipping over the metadata except the two keys we need."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        if buf[:4] != _GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        cur.pos = 4
        version, n_tensors, n_kv = cur.unpack("IQQ")
        if version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {version} (big-endian files are not supported)")
        architecture, alignment = "", 32
        for _ in range(n_kv):
            key = cur.string()
            (vtype,) = cur.unpack("I")
            if key == "general.architecture" and vtype == _STRING:
                architecture = cur.string()
            elif key == "general.alignment" and vtype == _UINT32:
                (alignment,) = cur.unpack("I")
            else:
                cur.skip_value(vtype)
        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            (n_dims,) = cur.unpack("I")
            dims = cur.unpack("Q" * n_dims)
            qtype, rel_offset = cur.unpack("IQ")
            raw_infos.append((name, dims, qtype, rel_offset))
        data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, dims, qtype, rel_offset in raw_infos:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        n_elems = int(np.prod(dims, dtype=np.int64))
        tensors.append(
            GGUFTensorInfo(
                name=name,
                shape=tuple(int(d) for d in reversed(dims)),
                qtype=qtype,
                offset=data_start + rel_offset,
                n_bytes=n_elems // block_size * type_size,
            )
        )
    return GGUFDirectory(architecture=architecture, alignment=alignment, tensors=tensors)


def dequantize_tensor(file_bytes: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    """float32 array of `info.shape` (a fresh, writable array)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(info.qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = file_bytes[info.offset : info.offset + info.n_bytes]
    # Rows stay rows; the innermost dim is stored as packed blocks of bytes.
    raw = raw.reshape(*info.shape[:-1], info.shape[-1] // block_size * type_size)
    out = dequantize(raw, qtype)
    if out.dtype != np.float32:
        out = out.astype(np.float32)
    # F32 tensors come back as views of the read-only file mapping.
    return out if out.flags.writeable and out.flags.c_contiguous else np.array(out, dtype=np.float32)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert-time reordering of q/k rows.

    Per head, HF keeps the rotary pairs as two halves, rows (0, d/2), (1, d/2+1), ...; llama.cpp wants the
    pairs adjacent. Its converter views each head's rows as [2, d/2] and transposes them to [d/2, 2], so here
    we view them as [d/2, 2] and transpose back. Works for weights (2-D) and biases (1-D).
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name_for(gguf_name: str, architecture: str) -> Optional[str]:
    """The transformers name of a GGUF tensor; None for tensors transformers has no parameter for."""
    base, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        base, suffix = gguf_name, ""
    tail = "." + suffix if suffix else ""
    if base in _SKIPPED:
        return None
    if base in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[base] + tail
    match = _BLOCK_RE.match(base)
    block_names = _BLOCK_NAMES_BY_ARCH.get(architecture, _BLOCK_NAMES)
    if match and match.group(2) in block_names:
        return f"model.layers.{match.group(1)}.{block_names[match.group(2)]}{tail}"
    raise ValueError(f"GGUF tensor {gguf_name!r} (architecture {architecture}) has no known transformers name")


def iterate_gguf_weights(
    path: str, num_attention_heads: int, num_key_value_heads: int
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yields (hf_name, float32 CPU tensor), one tensor at a time, in file order.

    No lm_head is yielded when the file has no `output` tensor: the model ties it to the embedding."""
    directory = read_gguf_directory(path)
    arch = directory.architecture
    file_bytes = np.memmap(path, dtype=np.uint8, mode="r")
    heads_for = {".attn_q.": num_attention_heads, ".attn_k.": num_key_value_heads}
    for info in directory.tensors:
        hf_name = hf_name_for(info.name, arch)
        if hf_name is None:
            continue
        weights = dequantize_tensor(file_bytes, info)
        if arch in _ROPE_PERMUTED_ARCHS:
            for marker, n_head in heads_for.items():
                if marker in info.name:
                    weights = np.ascontiguousarray(unpermute_rope_rows(weights, n_head))
        if arch in _NORM_PLUS_ONE_ARCHS and info.name.endswith("norm.weight"):
            weights = weights - 1.0
        yield hf_name, torch.from_numpy(weights)

