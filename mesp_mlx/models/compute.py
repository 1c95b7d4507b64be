"""Per-backend compute path for frozen 4-bit weights, and the training dtype.

'fused'  : mlx's QuantizedLinear as it is (quantized_matmul; the right path on Metal).
'dequant': each matrix is dequantized just in time and multiplied with an fp32 GEMM (on CPU quantized_matmul is ~30x
           slower than this). The dequantized copy lives only while its matmul runs.

Modules keep their class identity for isinstance checks and their parameter names, so mlx-lm's LoRA, fuse and save
code sees an ordinary QuantizedLinear.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# what mx.quantize takes (affine): other bits or group sizes raise deep inside a quantize-on-load or a fuse, so the
# flags that choose them are checked against these first
QUANT_BITS, QUANT_GROUP_SIZES = (1, 2, 3, 4, 5, 6, 8), (32, 64, 128)


_LITTLE_ENDIAN = sys.byteorder == "little"


def _affine_unpack(weight, scales, biases, group_size: int, bits: int) -> mx.array:
    """Affine dequantization written as MLX ops: value j of a uint32 word is (word >> bits*j) & (2^bits - 1), then
    q * scale + bias per group. Bit-identical to mx.dequantize (tested); compiled, it runs ~2x faster on CPU. 4 and 8
    bits read the words as little-endian bytes instead (byte k of a word holds values 2k and 2k + 1 at 4 bits): the
    same values, measured 6.9 -> 5.5 ms (4 bits) and 7.3 -> 4.9 ms (8 bits) on a [6912, 1152] matrix."""
    if bits == 8 and _LITTLE_ENDIAN:
        q = weight.view(mx.uint8)
    elif bits == 4 and _LITTLE_ENDIAN:
        octets = weight.view(mx.uint8)
        q = mx.stack([octets & 15, octets >> 4], axis=-1)
    else:
        per_word = 32 // bits
        shifts = mx.array([bits * j for j in range(per_word)], dtype=mx.uint32)
        q = (weight[..., None] >> shifts) & mx.array((1 << bits) - 1, dtype=mx.uint32)
    q = q.reshape(*weight.shape[:-1], -1, group_size).astype(scales.dtype)
    return (q * scales[..., None] + biases[..., None]).reshape(*weight.shape[:-1], weight.shape[-1] * (32 // bits))


_compiled_unpack = mx.compile(_affine_unpack)
FAST_UNPACK = True  # the compiled unpacking on CPU (mx.dequantize's CPU kernel is ~2x slower); False: always mx.dequantize


def dequantize(weight, scales, biases, group_size: int, bits: int, mode: str = "affine", dtype=mx.float32) -> mx.array:
    """Packed weight -> full precision in `dtype` (scales/biases cast first: GGUF stores them in fp16)."""
    scales = scales.astype(dtype)
    biases = None if biases is None else biases.astype(dtype)
    if (FAST_UNPACK and mode == "affine" and bits in (1, 2, 4, 8) and biases is not None
            and mx.default_device() == mx.cpu):
        return _compiled_unpack(weight, scales, biases, group_size, bits)
    return mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits, mode=mode)


def frozen_matmul(x, base: tuple, quant: tuple | None, transpose: bool):
    """x @ W0^T (transpose=True) or x @ W0 (transpose=False) of a frozen matrix given as operands: `base` is (W0,)
    dense or (w, scales, biases) packed; `quant` is None (dense) or (group_size, bits, mode, fused). On the fused path
    no dequantized copy exists; otherwise W0 is dequantized just for this product. No gradient is formed for W0."""
    if quant is None:
        w0 = base[0].astype(x.dtype)
        return x @ (w0.T if transpose else w0)
    group_size, bits, mode, fused = quant
    w, scales, biases = base
    if fused:
        return mx.quantized_matmul(x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits,
                                   mode=mode)
    w0 = dequantize(w, scales, biases, group_size, bits, mode, x.dtype)  # lives only for this product
    return x @ (w0.T if transpose else w0)


def dequantized_weight(module, dtype=mx.float32) -> mx.array:
    """The full-precision weight of a QuantizedLinear / QuantizedEmbedding, in `dtype` (the kept copy if the plan
    keeps one, see keep_dequantized)."""
    kept = kept_dense(module)
    if kept is not None and kept.dtype == dtype:
        return kept
    return dequantize(module["weight"], module["scales"], module["biases"] if "biases" in module else None,
                      module.group_size, module.bits, getattr(module, "mode", "affine"), dtype)


def kept_dense(module) -> mx.array | None:
    """The fp32 copy of a quantized linear's weight that the plan keeps resident (None when it keeps none)."""
    return module.__dict__.get("_kept_dense")


def keep_dequantized(block: nn.Module, keep: bool = True) -> int:
    """Keep (or drop) an fp32 copy of every quantized linear weight of `block` for the rest of the run: the dequant
    path's lever that trades 4 bytes per weight for no dequantization at all (forward, recompute, input gradients).
    The copy is an ordinary attribute, not a parameter: saving, fuse and the optimizer never see it. It is computed by
    the same dequantize as the just-in-time path, so every product is bit-identical. Returns the bytes kept."""
    total = 0
    for _, module in block.named_modules():
        if not isinstance(module, nn.QuantizedLinear):
            continue
        if keep:
            dense = dequantized_weight(module, mx.float32)
            mx.eval(dense)
            module.__dict__["_kept_dense"] = dense
            total += dense.nbytes
        else:
            module.__dict__.pop("_kept_dense", None)
    return total


def keep_dequantized_blocks(layers: list, count: int) -> int:
    """keep_dequantized for the top `count` blocks (-1: all) of a dequant-path model; returns the bytes kept."""
    n = len(layers)
    first = 0 if count < 0 else max(0, n - count)
    return sum(keep_dequantized(layer) for layer in layers[first:])


class DequantLinear(nn.QuantizedLinear):
    """QuantizedLinear computed as x @ dequantize(W)^T (fast on CPU with a good BLAS)."""

    def __call__(self, x):
        y = x @ dequantized_weight(self, x.dtype).T
        if "bias" in self:
            y = y + self["bias"]
        return y


class DequantEmbedding(nn.QuantizedEmbedding):
    """QuantizedEmbedding whose rows come out in the compute dtype (GGUF scales are fp16); the dtype is per instance
    (`cast_float_params` sets it), fp32 unless told otherwise."""

    def __call__(self, x):
        dtype = getattr(self, "compute_dtype", mx.float32)
        return dequantize(self["weight"][x], self["scales"][x], self["biases"][x] if "biases" in self else None,
                          self.group_size, self.bits, getattr(self, "mode", "affine"), dtype)

    def as_linear(self, x):
        return x @ dequantized_weight(self, x.dtype).T


def set_compute_path(model: nn.Module, path: str) -> None:
    """Switch every quantized linear/embedding of `model` to the given compute path ('fused' or 'dequant')."""

    def visit(_, module):
        if path == "dequant":
            if type(module) is nn.QuantizedLinear:
                module.__class__ = DequantLinear
            elif type(module) is nn.QuantizedEmbedding:
                module.__class__ = DequantEmbedding
        else:
            if type(module) is DequantLinear:
                module.__class__ = nn.QuantizedLinear
            elif type(module) is DequantEmbedding:
                module.__class__ = nn.QuantizedEmbedding

    model.apply_to_modules(visit)


def cast_float_params(model: nn.Module, dtype_name: str) -> None:
    """Cast the float parameters that are not part of a quantized matrix (norms, linear biases, unquantized weights).

    'native' keeps what the checkpoint holds. Quantization scales/biases are cast just in time instead (they would double
    in size if stored in fp32).
    """
    if dtype_name == "native":
        return
    dtype = DTYPES[dtype_name]

    def set_embedding_dtype(_, module):
        if isinstance(module, DequantEmbedding):
            module.compute_dtype = dtype

    model.apply_to_modules(set_embedding_dtype)

    def cast(path, x):
        if not isinstance(x, mx.array) or not mx.issubdtype(x.dtype, mx.floating):
            return x
        if path.endswith(".scales") or path.endswith(".biases"):
            return x
        return x.astype(dtype)

    model.update(tree_map_with_path(cast, model.parameters()))


def parameter_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
