"""Hand-written VJPs of the pieces of a dense decoder block (MeSP, docs/design.md §2): RMSNorm (w or 1 + w), SwiGLU / GeGLU
gating, RoPE, softmax attention with GQA and any mlx-lm mask.

Each function takes what its forward saw (or what is cheap to recompute from it) and the output cotangent, and returns
the input cotangent. Frozen tensors (norm weights, W0) never get a gradient. Math is in fp32; results come back in the
activation dtype.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..engine import fastmath


@mx.compile
def _rms_norm_backward(x, w, g, eps):
    # y = w * x * r,  r = (mean(x^2) + eps)^-1/2   =>   dx = r (g w) - x r^3 mean(g w x)
    x = x.astype(mx.float32)
    gw = g.astype(mx.float32) * w.astype(mx.float32)
    r = mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps)
    return r * gw - x * (r * r * r) * mx.mean(gw * x, axis=-1, keepdims=True)


def rms_norm_backward(norm: nn.Module, x: mx.array, g: mx.array, offset: float = 0.0) -> mx.array:
    """Input gradient of an RMSNorm with weight w + offset (mlx's: offset 0; Gemma's: 1 + w); w is frozen."""
    w = norm["weight"] if offset == 0 else norm["weight"].astype(mx.float32) + offset
    return _rms_norm_backward(x, w, g, mx.array(norm.eps, mx.float32)).astype(x.dtype)


def _make_swiglu_backward(sigmoid):
    @mx.compile
    def swiglu_backward(gate, up, g):
        # a = silu(gate) * up, silu(z) = z s(z)  =>  d/dgate = g up s (1 + gate (1 - s)),  d/dup = g silu(gate)
        gate, up, g = gate.astype(mx.float32), up.astype(mx.float32), g.astype(mx.float32)
        s = sigmoid(gate)
        return g * up * s * (1 + gate * (1 - s)), g * gate * s

    return swiglu_backward


_C = math.sqrt(2 / math.pi)


@mx.compile
def _gelu_tanh_arg(z):
    # mlx.nn.gelu_approx's tanh argument, the same ops in the same order: with MLX's tanh on it and _gelu_tanh_gate
    # after, a is bit-identical to nn.gelu_approx(gate) * up (tested), with t kept for the backward
    return _C * (z + 0.044715 * z**3)


@mx.compile
def _gelu_tanh_gate(z, t, up):
    return 0.5 * z * (1 + t) * up


@mx.compile
def _gelu_tanh_gate_backward(gate, up, t, g):
    # a = gelu_tanh(gate) * up, gelu_tanh(z) = z/2 (1 + t), t = tanh(c (z + 0.044715 z^3)), c = sqrt(2/pi)
    # d gelu_tanh / dz = (1 + t)/2 + z/2 (1 - t^2) c (1 + 3 * 0.044715 z^2)   (t from the forward: no tanh here)
    gate, up, t, g = gate.astype(mx.float32), up.astype(mx.float32), t.astype(mx.float32), g.astype(mx.float32)
    dgelu = 0.5 * (1 + t) + 0.5 * gate * (1 - t * t) * _C * (1 + 3 * 0.044715 * gate * gate)
    return g * up * dgelu, g * (0.5 * gate * (1 + t))


# SwiGLU's gating backward, with the sigmoid from fastmath's exp on CPU, MLX's on a GPU
_SWIGLU_BACKWARD = {True: _make_swiglu_backward(fastmath.sigmoid_chain), False: _make_swiglu_backward(mx.sigmoid)}


def swiglu_backward(gate: mx.array, up: mx.array, g: mx.array) -> tuple[mx.array, mx.array]:
    """(dL/dgate, dL/dup) of silu(gate) * up."""
    return gated_backward("silu", gate, up, g)


def gated_backward(activation: str, gate: mx.array, up: mx.array, g: mx.array,
                   state: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """(dL/dgate, dL/dup) of act(gate) * up for act = silu (SwiGLU) or gelu_tanh (Gemma's GeGLU). `state` is what
    gated_forward returned beside a (GELU-tanh's t); without it, it is recomputed here."""
    on = fastmath.enabled()
    if activation == "silu":
        fn, xs = _SWIGLU_BACKWARD[on], (gate, up, g)
    else:
        t = mx.tanh(_gelu_tanh_arg(gate)) if state is None else state
        fn, xs = _gelu_tanh_gate_backward, (gate, up, t, g)
    g_gate, g_up = fastmath.chunked(fn, *xs) if on else fn(*xs)
    return g_gate.astype(gate.dtype), g_up.astype(up.dtype)


def gated_forward(activation: str, gate: mx.array, up: mx.array) -> tuple[mx.array, mx.array | None]:
    """(act(gate) * up, state for gated_backward). SiLU: one compiled chain (fastmath.py, MLX's exp algorithm), no
    state. GELU-tanh: MLX's own tanh (a tanh from exp differs from libm's by ~1e-7, enough to move the tiny Gemma
    model's gradients past the 1e-5 exactness bound), kept as the state: it is most of the gating's cost on CPU
    (~14 ns a value, unvectorised), so the backward reuses it instead of computing it again (2.3 vs 53 ms on Gemma 3
    1B's [256, 6912] gate)."""
    if activation == "silu":
        return fastmath.silu_mul(gate, up), None
    if fastmath.enabled():  # row block by row block: no [T, ffn] temporaries beside a and t
        return fastmath.chunked(_gelu_tanh_pair, gate, up)
    return _gelu_tanh_pair(gate, up)


def _gelu_tanh_pair(gate, up):
    t = mx.tanh(_gelu_tanh_arg(gate))
    return _gelu_tanh_gate(gate, t, up), t


def rope_backward(rope: nn.Module, g: mx.array) -> mx.array:
    """RoPE is a rotation R per position; its VJP is the inverse rotation R^T (the same rope with negated angles)."""
    if type(rope) is nn.RoPE:
        return mx.fast.rope(g, rope.dims, traditional=rope.traditional, base=rope.base, scale=-rope.scale, offset=0)
    # scaled variants (Llama 3, YaRN, ...) carry their own frequencies and factors: the rope is linear, so its
    # transpose is exactly its VJP, which MLX computes as the inverse rotation without saving anything
    _, (out,) = mx.vjp(lambda t: rope(t), [mx.zeros_like(g)], [g])
    return out


def _masked(scores: mx.array, mask, q_start: int) -> mx.array:
    """Apply an mlx-lm attention mask ("causal", boolean keep-mask or additive) to scores [B, h, Lq, Lk]."""
    if mask is None:
        return scores
    low = mx.finfo(scores.dtype).min
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported attention mask {mask!r}")
        lq, lk = scores.shape[-2:]
        rows = mx.arange(lk - lq, lk)[:, None]
        return mx.where(rows >= mx.arange(lk)[None], scores, low)
    if mask.ndim == 4 and mask.shape[1] > 1:
        mask = mask[:, q_start:q_start + scores.shape[1]]
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, low)
    return scores + mask


def _head_chunks(q, k, budget_elems: int):
    """(kv head j, first query head, last query head + 1) covering all heads, each chunk's scores within the budget."""
    B, H, L, _ = q.shape
    hkv = k.shape[1]
    rep = H // hkv
    chunk = max(1, min(rep, budget_elems // max(1, B * L * k.shape[2])))
    for j in range(hkv):
        for h0 in range(j * rep, (j + 1) * rep, chunk):
            yield j, h0, min(h0 + chunk, (j + 1) * rep)


def _probs(qc, kj, scale: float, mask, h0: int):
    # MLX's own softmax: a compiled one from fastmath's exp was 2x faster on CPU, but its 1-ulp differences (another
    # summation order) moved the tiny Gemma model's gradients by 1.4e-5 against mlx-lm's autodiff, past the 1e-5 bound
    return mx.softmax(_masked((qc * scale) @ kj.swapaxes(-1, -2), mask, h0), axis=-1, precise=True)


def attention_forward(q, k, v, scale: float, mask, budget_elems: int = 1 << 21, keep_probs: bool = False):
    """softmax(scale q k^T + mask) v with GQA, head chunk by head chunk (scores of one chunk at a time), evaluated.
    keep_probs: also return each chunk's probabilities (attention_backward then skips recomputing them)."""
    out, probs = [], []
    for j, h0, h1 in _head_chunks(q, k, budget_elems):
        p = _probs(q[:, h0:h1], k[:, j:j + 1], scale, mask, h0)
        out.append(p @ v[:, j:j + 1])
        mx.eval(out[-1])
        if keep_probs:
            probs.append(p)
        del p
    o = mx.concatenate(out, axis=1)
    return (o, probs) if keep_probs else o


def attention_backward(q, k, v, g_out, scale: float, mask, budget_elems: int = 1 << 21, probs: list | None = None):
    """VJP of softmax attention O = softmax(scale q k^T + mask) v with grouped KV heads (GQA).

    q, g_out [B, H, L, D]; k, v [B, Hkv, L, D]. The probabilities are recomputed head-chunk by head-chunk (never all
    [B, H, L, L] at once), so the working set is one chunk of scores within ~budget_elems values:
        dV = sum_heads P^T dO     dP = dO V^T     dS = P * (dP - rowsum(dP * P))
        dQ = scale dS K           dK = scale sum_heads dS^T Q
    Query heads j*rep ... (j+1)*rep - 1 share KV head j, so dK and dV sum over those heads (the GQA head-sum).
    `probs`: the chunks' probabilities kept by attention_forward (same chunks), used instead of recomputing them.
    """
    hkv = k.shape[1]
    dq_parts = []
    dk = [mx.zeros(k[:, :1].shape, mx.float32) for _ in range(hkv)]
    dv = [mx.zeros(v[:, :1].shape, mx.float32) for _ in range(hkv)]
    for c, (j, h0, h1) in enumerate(_head_chunks(q, k, budget_elems)):
        kj, vj = k[:, j:j + 1], v[:, j:j + 1]
        qc, gc = q[:, h0:h1], g_out[:, h0:h1]
        p = _probs(qc, kj, scale, mask, h0) if probs is None else probs[c]
        if probs is not None:
            probs[c] = None  # freed as soon as this chunk is done
        dv[j] = dv[j] + (p.swapaxes(-1, -2) @ gc).sum(axis=1, keepdims=True)
        dp = gc @ vj.swapaxes(-1, -2)
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
        dq_parts.append((ds @ kj) * scale)
        dk[j] = dk[j] + ((ds.swapaxes(-1, -2) @ qc) * scale).sum(axis=1, keepdims=True)
        mx.eval(dq_parts[-1], dk[j], dv[j])
        del p, dp, ds
    dq = mx.concatenate(dq_parts, axis=1).astype(q.dtype)
    return dq, mx.concatenate(dk, axis=1).astype(k.dtype), mx.concatenate(dv, axis=1).astype(v.dtype)
