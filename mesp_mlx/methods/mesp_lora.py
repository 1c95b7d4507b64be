"""MeSP's LoRA linear: y = x W0^T + s (x A) B with a hand-written VJP (`mx.custom_function`), docs/design.md §2.

Given g = dL/dy, and h = x A recomputed in the backward (never stored; r << d_in makes that cheap):
    dB  = s h^T g            (summed over batch and sequence)
    g_h = s g B^T            ([..., r])
    dA  = x^T g_h
    dx  = g_h A^T + g W0     (W0 by quantized matmul on the fused path, by a just-in-time dequantized fp32 copy on CPU)
No gradient is formed for W0, its scales or biases. Parameter names and shapes are mlx-lm's LoRALinear's (`linear`,
`lora_a` [in, r], `lora_b` [r, out], `scale`, `dropout`), so adapters are interchangeable and the layer is a drop-in
inside ordinary `nn.value_and_grad` training. With dropout, the LoRA branch sees dropout(x); its input gradient flows
back through the dropout by autodiff.

The same two functions, `lora_branch_grads` and `frozen_input_grad`, are MeSP's block rule's LoRA backward.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear

from ..models.compute import DequantLinear, dequantize, frozen_matmul, kept_dense


def frozen_operands(linear: nn.Module) -> tuple[tuple, tuple | None]:
    """(base, quant) of a frozen linear: base is (W0,) dense or (w, scales, biases) packed; quant is None (dense) or
    (group_size, bits, mode, fused) where fused follows the module's compute path (DequantLinear = dequantize). A
    DequantLinear whose fp32 weight the plan keeps (compute.keep_dequantized) is dense."""
    if isinstance(linear, nn.QuantizedLinear):
        kept = kept_dense(linear) if isinstance(linear, DequantLinear) else None
        if kept is not None:
            return (kept,), None
        quant = (linear.group_size, linear.bits, getattr(linear, "mode", "affine"),
                 not isinstance(linear, DequantLinear))
        biases = linear["biases"] if "biases" in linear else mx.zeros_like(linear["scales"])
        return (linear["weight"], linear["scales"], biases), quant
    return (linear["weight"],), None


LEAN_CHUNK = 4 << 20  # bytes of dequantized weight a lean product holds at a time
SLICE_ALIGN = 128  # slices start at multiples of this many rows when they are that wide: every group size (32, 64,
# 128) divides it, so the same boundaries can cut a packed matrix's columns too (methods/mlp_slices.py)


def lean_slices(linear: nn.Module, chunk_bytes: int | None = None) -> list[tuple[int, int]]:
    """[a, b) row slices of a frozen linear's weight [out, in] as lean_matmul multiplies them: ~chunk_bytes of fp32
    each for a just-in-time dequantized matrix, one slice for any other."""
    out_dim = linear["weight"].shape[0]
    if not isinstance(linear, DequantLinear):
        return [(0, out_dim)]
    in_dim = linear["scales"].shape[-1] * linear.group_size
    step = max(1, (chunk_bytes or LEAN_CHUNK) // (in_dim * 4))
    if step >= SLICE_ALIGN:
        step -= step % SLICE_ALIGN
    return [(a, min(a + step, out_dim)) for a in range(0, out_dim, step)]


def dense_rows(linear: nn.Module, a: int, b: int, dtype=mx.float32) -> mx.array:
    """Rows [a, b) of a frozen (quantized or dense) linear's weight in full precision (the kept fp32 copy when the
    plan keeps one): what lean_matmul multiplies for its slice [a, b), and the sliced MLP backward too."""
    base, quant = frozen_operands(linear)
    rows = tuple(t[a:b] for t in base)
    if quant is None:
        return rows[0].astype(dtype)
    group_size, bits, mode, _ = quant
    return dequantize(*rows, group_size, bits, mode, dtype)


def dense_cols(linear: nn.Module, a: int, b: int, dtype=mx.float32) -> mx.array:
    """Columns [a, b) of a frozen linear's weight [out, in] in full precision; a and b on quantization-group
    boundaries (a packed row holds its groups one after the other)."""
    base, quant = frozen_operands(linear)
    if quant is None:
        return base[0][:, a:b].astype(dtype)
    group_size, bits, mode, _ = quant
    w, scales, biases = base
    # contiguous copies of the packed columns first (small): the dequantization then runs ~1.4x faster
    cols = (w[:, a * bits // 32:b * bits // 32], scales[:, a // group_size:b // group_size],
            biases[:, a // group_size:b // group_size])
    return dequantize(*(mx.contiguous(t) for t in cols), group_size, bits, mode, dtype)


def lean_matmul(x, linear: nn.Module, transpose: bool, chunk_bytes: int | None = None, finish=None) -> mx.array:
    """x @ W0^T (transpose=True) or x @ W0 of a frozen linear, evaluated now, never holding more than ~chunk_bytes of
    dequantized W0. A quantized W0 [out, in] is dequantized in slices r of its rows:
        x @ W0^T = concat_r (x @ W0[r]^T)          g @ W0 = sum_r g[:, r] @ W0[r]
    (row slices are contiguous in the packed layout and keep every product wide). The slices depend only on the
    quantized layout: when the plan keeps W0 dequantized (compute.keep_dequantized) the very same slices of the kept
    copy are multiplied and summed in the same order, so results are bit-identical whichever plan runs.
    Unquantized weights and the fused path run as one product. (MLX would otherwise dequantize every independent
    matrix of a lazy graph before the first product.) finish(piece, a, b): applied to each output slice [a, b) of
    x @ W0^T before it is evaluated (a projection adds its bias and LoRA branch slice by slice, see mesp._Proj)."""
    finish = finish or (lambda y, a, b: y)
    if isinstance(linear, nn.QuantizedLinear) and not isinstance(linear, DequantLinear):  # fused: no copy at all
        base, quant = frozen_operands(linear)
        y = frozen_matmul(x, base, quant, transpose)
        y = finish(y, 0, y.shape[-1]) if transpose else y
        mx.eval(y)
        return y
    if not isinstance(linear, nn.QuantizedLinear):
        y = frozen_matmul(x, (linear["weight"],), None, transpose)
        y = finish(y, 0, y.shape[-1]) if transpose else y
        mx.eval(y)
        return y
    pieces, acc = [], None
    for a, b in lean_slices(linear, chunk_bytes):
        w0 = dense_rows(linear, a, b, x.dtype)  # from the kept fp32 copy when the plan keeps one
        if transpose:
            pieces.append(finish(x @ w0.T, a, b))
            mx.eval(pieces[-1])
        else:
            part = x[..., a:b] @ w0
            acc = part if acc is None else acc + part
            mx.eval(acc)
        del w0
    if not transpose:
        return acc
    return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=-1)


def frozen_input_grad(linear: nn.Module, g: mx.array, lean: bool = False) -> mx.array:
    """dL/dx = g W0 of a frozen linear y = x W0^T (+ bias); `lean` dequantizes W0 slice by slice (evaluates now)."""
    if lean:
        return lean_matmul(g, linear, False)
    base, quant = frozen_operands(linear)
    return frozen_matmul(g, base, quant, False)


def lora_branch_grads(xd, a, b, g, scale: float, h=None):
    """Through z = s (xd A) B: return (dL/dxd, dA, dB). h = xd A is recomputed unless given."""
    d_in, r = a.shape
    h = (xd @ a).reshape(-1, r) if h is None else h.reshape(-1, r)
    g2 = g.reshape(-1, g.shape[-1])
    grad_b = scale * (h.T @ g2)
    g_h = scale * (g2 @ b.T)  # [N, r]
    grad_a = xd.reshape(-1, d_in).T @ g_h
    grad_xd = (g_h @ a.T).reshape(xd.shape)
    return grad_xd, grad_a.astype(a.dtype), grad_b.astype(b.dtype)


def lora_linear_backward(layer, x: mx.array, mask, h, g: mx.array, grads: dict, name: str) -> mx.array:
    """dL/dx of a LoRA linear y = x W0^T + s (dropout(x) A) B given g = dL/dy, writing name.lora_a / name.lora_b into
    `grads`; `mask` is the dropout mask (scaled) or None, h = xd A if kept. W0 is dequantized slice by slice."""
    xd = x if mask is None else x * mask
    g_xd, grads[f"{name}.lora_a"], grads[f"{name}.lora_b"] = lora_branch_grads(xd, layer.lora_a, layer.lora_b, g,
                                                                               layer.scale, h)
    if mask is not None:
        g_xd = g_xd * mask
    return frozen_input_grad(layer.linear, g, lean=True) + g_xd


@lru_cache(maxsize=None)
def _lora_fn(scale: float, quant: tuple | None):
    """y = base(x) + s (xd A) B for primals (x, xd, A, B, *base) with MeSP's VJP; one function per (scale, quant)."""

    @mx.custom_function
    def lora(x, xd, a, b, *base):
        y = frozen_matmul(x, base, quant, True)
        return y + (scale * ((xd @ a) @ b)).astype(y.dtype)

    @lora.vjp
    def lora_vjp(primals, cotangent, output):
        x, xd, a, b, *base = primals
        grad_xd, grad_a, grad_b = lora_branch_grads(xd, a, b, cotangent, scale)
        grad_x = frozen_matmul(cotangent, base, quant, False).astype(x.dtype)
        grad_xd = grad_xd.astype(xd.dtype)  # fp32 LoRA under an fp16 / bf16 x: a cotangent has its primal's dtype
        frozen = tuple(mx.zeros((1,), dtype=t.dtype) for t in base)  # no gradient formed for W0, scales, biases
        return (grad_x, grad_xd, grad_a, grad_b, *frozen)

    return lora


def dropout_active(layer: LoRALinear) -> bool:
    return layer.dropout._p_1 < 1.0 and layer.training


class MeSPLoRALinear(LoRALinear):
    """mlx-lm's LoRALinear with MeSP's hand-written backward (W0 path from the base's compute path)."""

    def __call__(self, x):
        lin = self.linear
        xd = self.dropout(x) if dropout_active(self) else x
        base, quant = frozen_operands(lin)
        y = _lora_fn(float(self.scale), quant)(x, xd, self.lora_a, self.lora_b, *base)
        return y + lin["bias"] if "bias" in lin else y
