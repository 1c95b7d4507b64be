"""exp, the sigmoid and SwiGLU's gating as compiled MLX element-wise chains: the CPU path's exp.

Measured on the project's Linux box (mlx 0.32, 2 cores): MLX's CPU exp kernel takes ~12 ns per fp32 value — at
SmolLM2's shape silu(gate) * up costs 26 ms against 9 ms for the gate GEMM, and the loss's exp over [tokens, vocab]
logits is a third of the loss phase. The same computation written as MLX ops and compiled (one fused loop) runs in
~3.5 ns per value. It is MLX's own algorithm, so the values match mx.exp's (identical for ~90 % of inputs, the same
max rel error 2.6e-6 against float64):

    exp(x) = 2^n · 2^f,  y = x · log2(e),  n = round(y),  f = y - n in [-1/2, 1/2]
    2^f    ≈ Cephes' degree-6 polynomial (the one in MLX's CPU exp, from akohlmey/fastermath)
    2^n    = the float whose exponent bits are n + 127; n is read from the low mantissa bits of y + 1.5·2^23 (the add
             rounds y to an integer)
    x < -88 gives 0, x > 88 is clamped (softmax-style and sigmoid inputs never get there), NaN stays NaN.

Only exp-based pieces use it. Softmax attention and GELU-tanh keep MLX's kernels: their compiled versions differ from
MLX's by an ulp here and there (a different summation order, a tanh from exp), which already moves the tiny Gemma
model's gradients past the 1e-5 bound against mlx-lm's autodiff. Each function is used on every plan of a backend, so
results never depend on the plan; on a GPU (`enabled()` false) they are MLX's own kernels.
"""

from __future__ import annotations

import mlx.core as mx

_LOG2E = 1.442695
_ROUND = 12582912.0  # 1.5 * 2^23: y + _ROUND rounds y to an integer kept in the low mantissa bits
_ROUND_BITS = 0x4B400000  # the bit pattern of _ROUND
_P = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
      2.402264791363012e-1, 6.931472028550421e-1, 1.0)  # 2^f on |f| <= 1/2 (Cephes), highest degree first


def _exp(x):
    y = mx.minimum(mx.maximum(x, -88.0), 88.0) * _LOG2E
    t = y + _ROUND
    f = y - (t - _ROUND)  # y - round(y)
    p = _P[0]
    for c in _P[1:]:
        p = p * f + c
    two_n = ((t.view(mx.int32) - _ROUND_BITS + 127) << 23).view(mx.float32)
    out = mx.where(x < -88.0, 0.0, p * two_n)
    return mx.where(x != x, x, out)  # NaN in, NaN out (the engine's non-finite checks rely on it)


def _sigmoid(x):
    return 1.0 / (1.0 + _exp(-x))


def _silu_mul(gate, up):
    return gate * _sigmoid(gate) * up


def _exp_minus(x, m):
    return _exp(x - m)


_exp_c = mx.compile(_exp)
_exp_minus_c = mx.compile(_exp_minus)
_silu_mul_c = mx.compile(_silu_mul)

# the raw chain, for other compiled functions to fuse (vjp.py's SwiGLU backward)
sigmoid_chain = _sigmoid


def enabled() -> bool:
    """The compiled chains on CPU; MLX's own (fast) kernels on a GPU."""
    return mx.default_device() == mx.cpu


CHUNK = 1 << 16  # values per piece: the compiled chain's intermediates stay ~1 MB (measured: MLX's CPU compile
# materialises several [size] temporaries of a chain this long, 5x the output on a [256, 4864] gate)


def chunked(fn, *xs):
    """fn (element-wise, one or more outputs shaped as xs[0]) over blocks of rows of ~CHUNK values, written into
    preallocated outputs: the same values as fn(*xs), with the working set of one block. The inputs share their
    leading axes; a later input may have a last axis of 1 (broadcast along a row, as the loss's row maxima)."""
    shape = xs[0].shape
    rows2d = [x.reshape(-1, x.shape[-1] if x.ndim > 1 else 1) for x in xs]  # 1-D: a column
    n, width = rows2d[0].shape
    rows = max(1, CHUNK // max(width, 1))
    if n <= rows:
        return fn(*xs)
    outs = None
    for a in range(0, n, rows):
        piece = fn(*(x[a:a + rows] for x in rows2d))
        pieces = piece if isinstance(piece, tuple) else (piece,)
        if outs is None:
            outs = [mx.zeros((n, width), p.dtype) for p in pieces]
        for out, p in zip(outs, pieces):
            out[a:a + rows] = p
        mx.eval(outs)
    outs = tuple(o.reshape(shape) for o in outs)
    return outs if len(outs) > 1 else outs[0]


def _fp32(fn, *xs):
    dtype = xs[0].dtype
    out = chunked(fn, *(x.astype(mx.float32) for x in xs))
    return out if dtype == mx.float32 else out.astype(dtype)


def exp(x: mx.array) -> mx.array:
    return _fp32(_exp_c, x) if enabled() else mx.exp(x)


def exp_minus(x: mx.array, m: mx.array) -> mx.array:
    """exp(x - m[:, None]) for x [n, c] (the loss's shifted logits), row block by row block: no [n, c] temporary
    beside the output."""
    return _fp32(_exp_minus_c, x, m[:, None]) if enabled() else mx.exp(x - m[:, None])


def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up (SwiGLU's gating)."""
    if not enabled():
        return gate * mx.sigmoid(gate) * up
    return _fp32(_silu_mul_c, gate, up)
