"""A strict reader of a GGUF file's header (GGUF v2/v3), run before MLX parses the file.

MLX's GGUF reader trusts the file: a truncated or corrupted header can crash the process. This module walks the same
structure in Python with every length and offset bounds-checked, so a damaged file is refused with the reason instead.

    header : "GGUF", version u32, tensor count u64, metadata count u64
    kv     : key (u64 length + UTF-8), value type u32, value (scalars, string, or array: item type u32, count u64, items)
    tensors: name, n_dims u32, dims u64[n_dims], type u32, offset u64 (relative to the aligned data section)
"""

from __future__ import annotations

import struct

# ggml tensor types MLX reads, with (elements per block, bytes per block)
TENSOR_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34)}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_DIMS = 4


class GGUFHeaderError(ValueError):
    pass


class _Reader:
    """Reads the header from an open file, never past its end (the tensor data itself is not read)."""

    def __init__(self, f, size: int):
        self.f, self.size, self.pos = f, size, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise GGUFHeaderError(f"truncated or corrupt: {what} at byte {self.pos} runs past the end of the file")
        out = self.f.read(n)
        self.pos += n
        return out

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFHeaderError(f"truncated or corrupt: {what} at byte {self.pos} runs past the end of the file")
        self.f.seek(n, 1)
        self.pos += n

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"the length of {what}")
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFHeaderError(f"{what} at byte {self.pos - n} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY and depth == 0:
            itype, count = self.scalar("<I", what), self.scalar("<Q", what)
            if itype not in _SCALARS and itype != STRING:
                raise GGUFHeaderError(f"{what}: array of unknown type {itype}")
            if itype in _SCALARS:  # one bounds check for the whole array
                self.skip(struct.calcsize(_SCALARS[itype]) * count, what)
                return None
            return [self.string(what) for _ in range(count)]
        raise GGUFHeaderError(f"{what}: unknown value type {vtype}")


def check_gguf(path) -> dict:
    """Validate the file's structure; return {"version", "tensors": {name: (type name, dims)}, "metadata_keys"}."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(0)
        return _check(_Reader(f, size))


def _check(r: _Reader) -> dict:
    if r.take(4, "the magic number") != b"GGUF":
        raise GGUFHeaderError("not a GGUF file (no GGUF magic number)")
    version = r.scalar("<I", "the version")
    if version not in (2, 3):
        raise GGUFHeaderError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = r.scalar("<Q", "the tensor count"), r.scalar("<Q", "the metadata count")
    # every entry takes at least 8 bytes: counts beyond the file's size are corrupt, not merely large
    if n_tensors > r.size // 8 or n_kv > r.size // 8:
        raise GGUFHeaderError(f"corrupt counts ({n_tensors} tensors, {n_kv} metadata entries in {r.size} bytes)")
    alignment, keys = 32, []
    for i in range(n_kv):
        key = r.string(f"metadata key {i}")
        vtype = r.scalar("<I", f"the type of {key!r}")
        value = r.value(vtype, f"metadata {key!r}")
        keys.append(key)
        if key == "general.alignment":
            if not isinstance(value, int) or value <= 0 or value & (value - 1) or value > 2**16:
                raise GGUFHeaderError(f"general.alignment {value!r} is not a power of two")
            alignment = value
    tensors, extents = {}, []
    for i in range(n_tensors):
        name = r.string(f"tensor name {i}")
        n_dims = r.scalar("<I", f"the dims of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFHeaderError(f"tensor {name!r}: {n_dims} dimensions")
        dims = [r.scalar("<Q", f"the dims of {name!r}") for _ in range(n_dims)]
        ttype, offset = r.scalar("<I", f"the type of {name!r}"), r.scalar("<Q", f"the offset of {name!r}")
        if ttype not in TENSOR_TYPES:
            raise GGUFHeaderError(f"tensor {name!r} has ggml type {ttype}; supported tensor types: "
                                  + ", ".join(t[0] for t in TENSOR_TYPES.values()))
        type_name, block, block_bytes = TENSOR_TYPES[ttype]
        count = 1
        for d in dims:
            if d == 0 or d > 2**31:
                raise GGUFHeaderError(f"tensor {name!r}: dimension {d}")
            count *= d
        if count % block or dims[0] % block:
            raise GGUFHeaderError(f"tensor {name!r} ({type_name}): rows of {dims[0]} are not whole blocks of {block}")
        if name in tensors:
            raise GGUFHeaderError(f"tensor {name!r} appears twice")
        tensors[name] = (type_name, dims)
        extents.append((name, offset, count // block * block_bytes))
    start = (r.pos + alignment - 1) // alignment * alignment
    for name, offset, size in extents:
        if offset % alignment or start + offset + size > r.size:
            raise GGUFHeaderError(f"tensor {name!r}: its {size} bytes at offset {offset} are not inside the file")
    return {"version": version, "tensors": tensors, "metadata_keys": keys}
