"""Where block-boundary activations h_0..h_L live between the forward and the reverse pass.

memory: MLX arrays (counted in MLX's peak).
mmap  : one file-backed numpy memmap per step shape; a checkpoint is copied in after its block's forward and read back
        just before that block's backward, so only one or two of them are in MLX memory at a time (MeBP's
        memory-mapped activation checkpoints; the OS pages them out under pressure).
"""

from __future__ import annotations

import os
import tempfile

import mlx.core as mx
import numpy as np


def _scratch_memmap(directory: str, prefix: str, shape: tuple, dtype) -> tuple[str, np.memmap]:
    """(path, memmap) of a new file-backed array in `directory`; the caller removes the file."""
    os.makedirs(directory, exist_ok=True)
    fd, file = tempfile.mkstemp(prefix=prefix, suffix=".bin", dir=directory)
    os.close(fd)
    return file, np.memmap(file, dtype=dtype, mode="w+", shape=shape)


class MemoryCheckpoints:
    kind = "memory"

    def __init__(self):
        self._store: dict[int, mx.array] = {}

    def reserve(self, count: int, shape: tuple) -> None:
        pass

    def put(self, i: int, h: mx.array) -> None:
        self._store[i] = h

    def get(self, i: int) -> mx.array:
        return self._store[i]

    def drop(self, i: int) -> None:
        self._store.pop(i, None)

    def clear(self) -> None:
        self._store.clear()


class MmapCheckpoints:
    kind = "mmap"

    def __init__(self, directory: str | None = None):
        self._dir = directory or tempfile.gettempdir()
        self._file = None
        self._mm = None
        self._shape = None
        self._dtype = None

    def _ensure(self, count: int, shape: tuple, dtype) -> None:
        if self._mm is not None and self._shape == (count, *shape) and self._dtype == dtype:
            return
        self.close()
        self._shape, self._dtype = (count, *shape), dtype
        self._file, self._mm = _scratch_memmap(self._dir, "mesp-ckpt-", self._shape, dtype)

    def reserve(self, count: int, shape: tuple) -> None:
        self._ensure(count, tuple(shape), np.dtype(np.float32))

    def put(self, i: int, h: mx.array) -> None:
        if self._mm is None:
            raise RuntimeError("reserve() before put()")
        # stored as fp32 (bf16 has no numpy dtype); restored to the activation's own dtype on get()
        self._mm[i] = np.array(h.astype(mx.float32))
        self._src_dtype = h.dtype

    def get(self, i: int) -> mx.array:
        return mx.array(self._mm[i]).astype(self._src_dtype)

    def drop(self, i: int) -> None:
        pass

    def clear(self) -> None:
        pass

    def close(self) -> None:
        if self._mm is not None:
            del self._mm
            self._mm = None
        if self._file and os.path.exists(self._file):
            os.remove(self._file)
        self._file = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class MmapSide:
    """Activations a method keeps beside the boundary checkpoints, one file-backed memmap per key (MeSP: a block's
    attention output, mid-block residual and post-MLP norm input, keyed by block and lane): outside MLX memory, as
    mmap'd checkpoints are. An entry is valid from its put() until invalidate() (the engine's release_kept at each
    step's start and end), so a backward never reads another step's forward."""

    def __init__(self, directory: str | None = None):
        self._dir = directory or tempfile.gettempdir()
        self._maps: dict = {}  # key -> (file, memmap)
        self._valid: dict = {}  # key -> the activation's dtype

    def put(self, key, x: mx.array) -> None:
        shape = tuple(x.shape)
        entry = self._maps.get(key)
        if entry is None or entry[1].shape != shape:
            self._remove(key)
            entry = self._maps[key] = _scratch_memmap(self._dir, "mesp-side-", shape, np.float32)
        entry[1][...] = np.asarray(x.astype(mx.float32))
        self._valid[key] = x.dtype

    def get(self, key) -> mx.array | None:
        """The activation put under `key` in this step (its own dtype), or None."""
        if key not in self._valid:
            return None
        return mx.array(self._maps[key][1]).astype(self._valid[key])

    def invalidate(self) -> None:
        self._valid.clear()

    def _remove(self, key) -> None:
        entry = self._maps.pop(key, None)
        self._valid.pop(key, None)
        if entry is not None:
            file, mm = entry
            del entry, mm  # the memmap closes with its last reference
            if os.path.exists(file):
                os.remove(file)

    def close(self) -> None:
        for key in list(self._maps):
            self._remove(key)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def make_checkpoints(kind: str, directory: str | None = None):
    if kind == "memory":
        return MemoryCheckpoints()
    if kind == "mmap":
        return MmapCheckpoints(directory)
    raise ValueError(f"unknown checkpoint storage {kind!r} (memory, mmap)")
