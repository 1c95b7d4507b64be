"""Rows of a safetensors tensor read through a memory map: the embedding / LM head streamed by vocabulary rows.

`mx.load` is lazy but not mmap'd: evaluating any slice of a lazily loaded tensor reads the whole tensor into MLX memory
(77 MB for Qwen2.5-0.5B's 4-bit embedding). Here the file is memory-mapped (clean, file-backed pages the OS can drop)
and only the rows asked for are copied into MLX arrays: the token rows for the embedding lookup, one vocabulary chunk
at a time for the LM head. Safetensors layout: u64 header length, JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian data.
"""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import numpy as np

_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "I32": np.int32,
          "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I64": np.int64}


class MmapTensor:
    def __init__(self, file: str, key: str):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        if key not in header:
            raise KeyError(f"{key} is not in {file}")
        meta = header[key]
        if meta["dtype"] not in _NUMPY:
            raise ValueError(f"{file}: {key} has dtype {meta['dtype']}, which cannot be memory-mapped here")
        self.key, self.shape, self.bf16 = key, tuple(meta["shape"]), meta["dtype"] == "BF16"
        start, stop = meta["data_offsets"]
        self.array = np.memmap(file, dtype=_NUMPY[meta["dtype"]], mode="r", offset=8 + n + start,
                               shape=self.shape) if stop > start else np.zeros(self.shape, _NUMPY[meta["dtype"]])

    def _to_mx(self, values: np.ndarray) -> mx.array:
        out = mx.array(np.ascontiguousarray(values))
        return out.view(mx.bfloat16) if self.bf16 else out

    def rows(self, start: int, stop: int) -> mx.array:
        return self._to_mx(self.array[start:stop])

    def take(self, ids: np.ndarray) -> mx.array:
        return self._to_mx(self.array[ids])


class MmapRows:
    """weight / scales / biases of one (possibly quantized) embedding or head, by rows."""

    def __init__(self, index: dict[str, str], prefix: str):
        self.tensors = {name: MmapTensor(index[f"{prefix}.{name}"], f"{prefix}.{name}")
                      for name in ("weight", "scales", "biases") if f"{prefix}.{name}" in index}
        if "weight" not in self.tensors:
            raise KeyError(f"{prefix}.weight is not in the model files")

    def rows(self, start: int, stop: int) -> dict:
        return {name: t.rows(start, stop) for name, t in self.tensors.items()}

    def take(self, ids: np.ndarray) -> dict:
        return {name: t.take(ids) for name, t in self.tensors.items()}
