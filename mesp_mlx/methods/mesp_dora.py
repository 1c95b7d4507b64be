"""MeSP's hand-written VJP of mlx-lm's DoRALinear (docs/design.md §2), used by MeSP's block rule.

    u   = x W0^T + s (xd A) B                    (xd = dropout(x); A [in, r], B [r, out]; W0 frozen, maybe 4-bit)
    n_i = || W0_i + s (A B)^T_i ||               (row norm of the adapted weight, under stop_gradient as in mlx-lm)
    y   = (m / n) * u (+ bias)

The norm needs no [out, in] matrix:
    n_i^2 = ||W0_i||^2 + 2 s sum_r B[r, i] (A^T W0^T)[r, i] + s^2 B_i^T (A^T A) B_i
with ||W0_i||^2 from W0 dequantized a slice of rows at a time and A^T W0^T an [r, out] product.
Given g = dL/dy, with c = m / n (n a constant):
    dm  = sum_tokens g * u / n
    g_u = c * g        -> dA, dB, dxd from LoRA's rule (mesp_lora.lora_branch_grads), dx = g_u W0 + dxd
No gradient is formed for W0, its scales or biases.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.dora import DoRALinear

from ..models.compute import dequantize, frozen_matmul
from .mesp_lora import dropout_active, frozen_operands, lean_matmul, lora_branch_grads, lora_linear_backward


def row_sq_norms(linear: nn.Module, chunk_bytes: int = 4 << 20) -> mx.array:
    """||W0_i||^2 for every output row i, W0 dequantized (fp32) a slice of rows at a time."""
    base, quant = frozen_operands(linear)
    if quant is None:
        w = base[0].astype(mx.float32)
        return (w * w).sum(axis=1)
    group_size, bits, mode, _ = quant
    rows_per = max(1, chunk_bytes // (base[0].shape[1] * 4 * (32 // bits)))
    parts = []
    for a in range(0, base[0].shape[0], rows_per):
        w = dequantize(*(t[a:a + rows_per] for t in base), group_size, bits, mode, mx.float32)
        parts.append((w * w).sum(axis=1))
        mx.eval(parts[-1])
    return mx.concatenate(parts)


def dora_norm(layer) -> mx.array:
    """n = ||W0 + s (A B)^T||_row of a DoRALinear, without forming the [out, in] matrix."""
    a, b, s = layer.lora_a.astype(mx.float32), layer.lora_b.astype(mx.float32), layer.scale
    wa = lean_matmul(a.T, layer.linear, True).astype(mx.float32)  # A^T W0^T: [r, out]
    cross = (b * wa).sum(axis=0)
    quad = (b * ((a.T @ a) @ b)).sum(axis=0)
    return mx.sqrt(mx.maximum(row_sq_norms(layer.linear) + 2 * s * cross + s * s * quad, 0.0))


class DoRAProj:
    """One DoRA projection's forward (as mesp.py's _Proj: input, dropout mask, optionally h = xd A), remembering u and
    the norm its backward needs."""

    def __init__(self, layer, x: mx.array, store_h: bool, output: bool = True):
        self.layer, self.x = layer, x
        self.mask = None
        if dropout_active(layer):
            self.mask = layer.dropout(mx.ones_like(x))  # the same draw as DoRALinear's dropout(x)
        xd = x if self.mask is None else x * self.mask
        h = xd @ layer.lora_a
        self.h = h if store_h else None
        self.norm = dora_norm(layer)
        self.u = lean_matmul(x, layer.linear, True) + (layer.scale * (h @ layer.lora_b)).astype(x.dtype)
        self.y = (layer.m / self.norm).astype(x.dtype) * self.u
        if "bias" in layer.linear:
            self.y = self.y + layer.linear["bias"]

    def backward(self, g: mx.array, grads: dict, name: str) -> mx.array:
        layer = self.layer
        n = self.norm
        g2 = g.reshape(-1, g.shape[-1]).astype(mx.float32)
        grads[f"{name}.m"] = ((g2 * self.u.reshape(-1, g.shape[-1]).astype(mx.float32)).sum(axis=0) / n
                              ).astype(layer.m.dtype)
        g_u = (layer.m / n).astype(g.dtype) * g  # the rest is LoRA's backward with g scaled by m / norm
        return lora_linear_backward(layer, self.x, self.mask, self.h, g_u, grads, name)


def _norm_of(a, b, s: float, base: tuple, quant) -> mx.array:
    """dora_norm's arithmetic on raw operands (W0 dequantized for the product and the row norms)."""

    a32, b32 = a.astype(mx.float32), b.astype(mx.float32)
    wa = frozen_matmul(a32.T, base, quant, True).astype(mx.float32)  # [r, out]
    if quant is None:
        w = base[0].astype(mx.float32)
    else:
        w = dequantize(*base, quant[0], quant[1], quant[2], mx.float32)
    sq = (w * w).sum(axis=1)
    return mx.sqrt(mx.maximum(sq + 2 * s * (b32 * wa).sum(axis=0) + s * s * (b32 * ((a32.T @ a32) @ b32)).sum(axis=0),
                              0.0))


@lru_cache(maxsize=None)
def _dora_fn(scale: float, quant):
    """y = (m / n) (x W0^T + s (xd A) B) for primals (x, xd, A, B, m, *base) with the VJP above (n held constant)."""

    def pre(x, xd, a, b, base):
        y = frozen_matmul(x, base, quant, True)
        return y + (scale * ((xd @ a) @ b)).astype(y.dtype)

    @mx.custom_function
    def dora(x, xd, a, b, m, *base):
        return (m / _norm_of(a, b, scale, base, quant)).astype(x.dtype) * pre(x, xd, a, b, base)

    @dora.vjp
    def dora_vjp(primals, cotangent, output):
        x, xd, a, b, m, *base = primals
        n = _norm_of(a, b, scale, base, quant)
        u = pre(x, xd, a, b, base)
        g2 = cotangent.reshape(-1, cotangent.shape[-1]).astype(mx.float32)
        grad_m = ((g2 * u.reshape(g2.shape).astype(mx.float32)).sum(axis=0) / n).astype(m.dtype)
        g_u = (m / n).astype(cotangent.dtype) * cotangent
        grad_xd, grad_a, grad_b = lora_branch_grads(xd, a, b, g_u, scale)
        grad_x = frozen_matmul(g_u, tuple(base), quant, False).astype(x.dtype)
        frozen = tuple(mx.zeros((1,), dtype=t.dtype) for t in base)  # no gradient formed for W0, scales, biases
        return (grad_x, grad_xd, grad_a, grad_b, grad_m, *frozen)

    return dora


class MeSPDoRALinear(DoRALinear):
    """mlx-lm's DoRALinear with the hand-written backward (the generic tier: blocks without a MeSP block rule)."""

    def __call__(self, x):
        lin = self.linear
        xd = self.dropout(x) if dropout_active(self) else x
        base, quant = frozen_operands(lin)
        y = _dora_fn(float(self.scale), quant)(x, xd, self.lora_a, self.lora_b, self.m, *base)
        return y + lin["bias"] if "bias" in lin else y
