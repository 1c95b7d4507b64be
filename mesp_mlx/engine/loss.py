"""Chunked cross-entropy: the masked mean CE of mlx-lm and its gradient, without ever forming [tokens, vocab] logits.

For the n unmasked positions x [n, d] (final-norm output) with targets t and head W [V, d]:
    loss = (1/n) sum_k ( logsumexp_v(x_k W_v) - x_k W_{t_k} )
    dL/dx_k = (1/n) sum_v ( softmax(x_k W)_v - [v == t_k] ) W_v
One pass walks the vocabulary in row chunks keeping, per position, the running max m, the running sum
s = sum_v exp(l_v - m) and the running a = sum_v exp(l_v - m) W_v, all three rescaled by exp(m_old - m_new) when the
max grows (online softmax, as in flash attention). At the end logsumexp = m + log s and
    dL/dx_k = (a_k / s_k - W_{t_k}) / n
with the target rows W_{t_k} gathered directly. Only one [n, chunk] block of logits and one chunk of W exist at a time,
each chunk of W is read once, and masked positions are never computed at all.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..models.compute import frozen_matmul
from . import fastmath


def auto_vocab_chunk(n_tokens: int, vocab: int, hidden: int, budget_elems: int = 1 << 21) -> int:
    """Largest chunk (multiple of 256) such that both the [n, chunk] logits and the [chunk, d] dequantized head rows
    stay within ~budget_elems fp32 values (8 MB each)."""
    chunk = budget_elems // max(n_tokens, hidden, 1)
    return min(max(256, chunk // 256 * 256), vocab)


def _online_softmax(parts, xs: mx.array, ts: mx.array, chunk: int, need_grad: bool):
    """One pass over the vocabulary for positions xs [n, d] with targets ts [n]: (logsumexp [n], target logit [n],
    the softmax-weighted mean of the head rows sum_v softmax(x W)_v W_v [n, d] or None)."""
    n, d = xs.shape
    V = parts.vocab_size
    run_max = mx.full((n,), -float("inf"))
    run_sum = mx.zeros((n,))
    target_logit = mx.zeros((n,))
    acc = mx.zeros((n, d), dtype=mx.float32) if need_grad else None
    for a in range(0, V, chunk):
        b = min(a + chunk, V)
        base, quant = parts.head_chunk(a, b, mx.float32)
        logits = frozen_matmul(xs, base, quant, True).astype(mx.float32)
        new_max = mx.maximum(run_max, logits.max(axis=1))
        rescale = fastmath.exp(run_max - new_max)  # 0 on the first chunk (run_max = -inf)
        e = fastmath.exp_minus(logits, new_max)  # compiled chain on CPU, row block by row block (fastmath.py)
        run_sum = run_sum * rescale + e.sum(axis=1)
        if need_grad:
            acc = acc * rescale[:, None] + frozen_matmul(e, base, quant, False).astype(mx.float32)
        run_max = new_max
        in_chunk = (ts >= a) & (ts < b)
        local = mx.clip(ts - a, 0, b - a - 1)
        picked = mx.take_along_axis(logits, local[:, None], axis=1)[:, 0]
        target_logit = target_logit + mx.where(in_chunk, picked, 0.0)
        mx.eval(run_max, run_sum, target_logit, *([acc] if need_grad else []))
    lse = run_max + mx.log(run_sum)
    return lse, target_logit, (acc / run_sum[:, None] if need_grad else None)


def _counted(x: mx.array, mask: mx.array):
    """(flat indices of the counted positions as numpy and MLX arrays, their rows of x in fp32)."""
    d = x.shape[-1]
    idx = np.nonzero(np.array(mask.reshape(-1)).astype(bool))[0]
    if len(idx) == 0:
        raise ValueError("the batch has no unmasked target token (is every token masked as prompt?)")
    idx_mx = mx.array(idx.astype(np.int32))
    return idx, idx_mx, x.reshape(-1, d)[idx_mx].astype(mx.float32)


def _scatter(x: mx.array, idx_mx: mx.array, rows: mx.array) -> mx.array:
    """Rows [n, d] placed at the counted positions of a zero [B, T, d] in x's dtype."""
    B, T, d = x.shape
    full = mx.zeros((B * T, d), dtype=mx.float32)
    full[idx_mx] = rows
    return full.reshape(B, T, d).astype(x.dtype)


def chunked_cross_entropy(parts, x: mx.array, targets: mx.array, mask: mx.array, vocab_chunk: int | None = None,
                          need_grad: bool = True, precise: bool = False):
    """Return (loss, dL/dx, ntoks) for x [B, T, d], targets [B, T], mask [B, T] (1 = counted); dL/dx is None when
    need_grad is False (forward-only methods skip pass 2). precise: the loss as a Python float, the per-token losses
    summed in float64 (a mean that does not depend on how the tokens are split: MeZO divides loss differences by 2 eps,
    and a distributed run adds the ranks' sums).

    `parts` supplies head_chunk(a, b, dtype) (the head's vocabulary rows a:b as frozen_matmul operands) and
    head_rows_at(ids, dtype).
    """
    idx, idx_mx, xs = _counted(x, mask)
    n = len(idx)
    ts = targets.reshape(-1)[idx_mx]
    chunk = vocab_chunk or auto_vocab_chunk(n, parts.vocab_size, x.shape[-1])
    lse, target_logit, mean_rows = _online_softmax(parts, xs, ts, chunk, need_grad)
    if precise:
        per_token = lse - target_logit
        mx.eval(per_token)
        loss = float(np.array(per_token).astype(np.float64).sum()) / n
    else:
        loss = (lse - target_logit).sum() / n
        mx.eval(loss)
    if not need_grad:
        return loss, None, n
    gx = (mean_rows - parts.head_rows_at(ts, mx.float32)) / n
    return loss, _scatter(x, idx_mx, gx), n


def chunked_token_logprobs(parts, x: mx.array, targets: mx.array, mask: mx.array, vocab_chunk: int | None = None,
                           need_grad: bool = True):
    """The log-probability of each counted target, log p_k = x_k W_{t_k} - logsumexp_v(x_k W_v), for objectives built
    on per-sequence sums (DPO, ORPO). Returns (logp [n], rows [n] (the flat row of each counted position),
    pullback or None): pullback(w [n]) = dL/dx [B, T, d] for any loss L with dL/dlog p_k = w_k, since
    d log p_k / dx_k = W_{t_k} - sum_v softmax(x_k W)_v W_v."""
    idx, idx_mx, xs = _counted(x, mask)
    ts = targets.reshape(-1)[idx_mx]
    chunk = vocab_chunk or auto_vocab_chunk(len(idx), parts.vocab_size, x.shape[-1])
    lse, target_logit, mean_rows = _online_softmax(parts, xs, ts, chunk, need_grad)
    logp = target_logit - lse
    mx.eval(logp)
    rows = mx.array((idx // x.shape[1]).astype(np.int32))
    if not need_grad:
        return logp, rows, None
    direction = parts.head_rows_at(ts, mx.float32) - mean_rows
    mx.eval(direction)

    def pullback(w: mx.array) -> mx.array:
        return _scatter(x, idx_mx, direction * w[:, None].astype(mx.float32))

    return logp, rows, pullback
