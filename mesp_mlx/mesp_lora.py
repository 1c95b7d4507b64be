"""MeSP's LoRA linear: y = x W0^T + s (x A) B with a hand-written VJP (`mx.custom_function`), REFERENCE §2.

Given g = dL/dy, and h = x A recomputed in the backward (never stored; r << d_in makes that cheap):
    dB  = s h^T g            (summed over batch and sequence)
    g_h = s g B^T            ([..., r])
    dA  = x^T g_h
    dx  = g_h A^T + g W0     (W0 by quantized matmul on the fused path, by a just-in-time dequantized fp32 copy on CPU)
No gradient is formed for W0, its scales or biases. Parameter names and shapes are mlx-lm's LoRALinear's (`linear`,
`lora_a` [in, r], `lora_b` [r, out], `scale`, `dropout`), so adapters are interchangeable and the layer is a drop-in
inside ordinary `nn.value_and_grad` training. With dropout, the LoRA branch sees dropout(x); its input gradient flows
back through the dropout by autodiff.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear

from .models.compute import dequantize


def _base_matmul(x, w, scales, biases, group_size, bits, mode, fused, transpose):
    """x @ W0^T (transpose=True) or x @ W0 (transpose=False) for a quantized W0 [out, in]."""
    if fused:
        return mx.quantized_matmul(x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits,
                                   mode=mode)
    w0 = dequantize(w, scales, biases, group_size, bits, mode, x.dtype)
    return x @ (w0.T if transpose else w0)


@lru_cache(maxsize=None)
def _quantized_lora_fn(scale: float, group_size: int, bits: int, mode: str, fused: bool):
    @mx.custom_function
    def lora(x, xd, a, b, w, scales, biases):
        y = _base_matmul(x, w, scales, biases, group_size, bits, mode, fused, True)
        return y + (scale * ((xd @ a) @ b)).astype(y.dtype)

    @lora.vjp
    def lora_vjp(primals, cotangent, output):
        x, xd, a, b, w, scales, biases = primals
        g = cotangent
        d_in, r = a.shape
        h = (xd @ a).reshape(-1, r)  # recomputed, [N, r]
        g2 = g.reshape(-1, g.shape[-1])
        grad_b = scale * (h.T @ g2)
        g_h = scale * (g2 @ b.T)  # [N, r]
        grad_a = xd.reshape(-1, d_in).T @ g_h
        grad_xd = (g_h @ a.T).reshape(xd.shape)
        grad_x = _base_matmul(g, w, scales, biases, group_size, bits, mode, fused, False).astype(x.dtype)
        zero = mx.zeros((1,))
        return (grad_x, grad_xd, grad_a.astype(a.dtype), grad_b.astype(b.dtype),
                zero.astype(w.dtype), zero.astype(scales.dtype), zero.astype(biases.dtype))

    return lora


@lru_cache(maxsize=None)
def _dense_lora_fn(scale: float):
    @mx.custom_function
    def lora(x, xd, a, b, w):
        return x @ w.T + (scale * ((xd @ a) @ b)).astype(x.dtype)

    @lora.vjp
    def lora_vjp(primals, cotangent, output):
        x, xd, a, b, w = primals
        g = cotangent
        d_in, r = a.shape
        h = (xd @ a).reshape(-1, r)
        g2 = g.reshape(-1, g.shape[-1])
        g_h = scale * (g2 @ b.T)
        return (g @ w.astype(g.dtype), (g_h @ a.T).reshape(xd.shape), (xd.reshape(-1, d_in).T @ g_h).astype(a.dtype),
                (scale * (h.T @ g2)).astype(b.dtype), mx.zeros((1,), dtype=w.dtype))

    return lora


class MeSPLoRALinear(LoRALinear):
    """mlx-lm's LoRALinear with MeSP's hand-written backward. `fused` picks the W0 path (Metal: True, CPU: False)."""

    fused = False

    @staticmethod
    def from_base(linear, r: int = 8, dropout: float = 0.0, scale: float = 20.0):
        layer = LoRALinear.from_base(linear, r=r, dropout=dropout, scale=scale)
        layer.__class__ = MeSPLoRALinear
        return layer

    def __call__(self, x):
        lin = self.linear
        xd = self.dropout(x) if self.dropout._p_1 < 1.0 and self.training else x
        if "bias" in lin:
            bias = lin["bias"]
        else:
            bias = None
        if isinstance(lin, nn.QuantizedLinear):
            fn = _quantized_lora_fn(float(self.scale), lin.group_size, lin.bits, getattr(lin, "mode", "affine"),
                                    self.fused)
            biases = lin["biases"] if "biases" in lin else mx.zeros_like(lin["scales"])
            y = fn(x, xd, self.lora_a, self.lora_b, lin["weight"], lin["scales"], biases)
        else:
            y = _dense_lora_fn(float(self.scale))(x, xd, self.lora_a, self.lora_b, lin["weight"])
        return y if bias is None else y + bias


def to_mesp_lora(model: nn.Module, fused: bool = False) -> int:
    """Switch every mlx-lm LoRALinear in `model` to MeSP's backward in place (same parameters). Returns the count."""
    MeSPLoRALinear.fused = fused
    count = 0

    def visit(_, module):
        nonlocal count
        if type(module) is LoRALinear:
            module.__class__ = MeSPLoRALinear
            count += 1

    model.apply_to_modules(visit)
    return count
