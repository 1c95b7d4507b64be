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


def chunked_cross_entropy(parts, x: mx.array, targets: mx.array, mask: mx.array, vocab_chunk: int | None = None,
                          need_grad: bool = True, precise: bool = False):
    """Return (loss, dL/dx, ntoks) for x [B, T, d], targets [B, T], mask [B, T] (1 = counted); dL/dx is None when
    need_grad is False (forward-only methods skip pass 2). precise: the loss as a Python float, the per-token losses
    summed in float64 (a mean that does not depend on how the tokens are split: MeZO divides loss differences by 2 eps,
    and a distributed run adds the ranks' sums).

    `parts` supplies head_chunk(a, b, dtype) (the head's vocabulary rows a:b as frozen_matmul operands) and
    head_rows_at(ids, dtype).
    """
    B, T, d = x.shape
    flat_mask = np.array(mask.reshape(-1)).astype(bool)
    idx = np.nonzero(flat_mask)[0]
    n = len(idx)
    if n == 0:
        raise ValueError("the batch has no unmasked target token (is every token masked as prompt?)")
    idx_mx = mx.array(idx.astype(np.int32))
    xs = x.reshape(-1, d)[idx_mx].astype(mx.float32)
    ts = targets.reshape(-1)[idx_mx]
    V = parts.vocab_size
    chunk = vocab_chunk or auto_vocab_chunk(n, V, d)

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
    if precise:
        per_token = lse - target_logit
        mx.eval(per_token)
        loss = float(np.array(per_token).astype(np.float64).sum()) / n
    else:
        loss = (lse - target_logit).sum() / n
        mx.eval(loss)
    if not need_grad:
        return loss, None, n
    gx = (acc / run_sum[:, None] - parts.head_rows_at(ts, mx.float32)) / n
    g_full = mx.zeros((B * T, d), dtype=mx.float32)
    g_full[idx_mx] = gx
    return loss, g_full.reshape(B, T, d).astype(x.dtype), n
