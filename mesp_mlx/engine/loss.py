"""Chunked cross-entropy: the masked mean CE of mlx-lm and its gradient, without ever forming [tokens, vocab] logits.

For the n unmasked positions x [n, d] (final-norm output) with targets t and head W [V, d]:
    loss = (1/n) sum_k ( logsumexp_v(x_k W_v) - x_k W_{t_k} )
    dL/dx_k = (1/n) sum_v ( softmax(x_k W)_v - [v == t_k] ) W_v
Pass 1 walks the vocabulary in row chunks and keeps a running max and sum (online logsumexp); pass 2 walks it again and
accumulates (softmax - onehot) @ W_chunk. Only one [n, chunk] block of logits and one chunk of W exist at a time, and
masked positions are never computed at all.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def auto_vocab_chunk(n_tokens: int, vocab: int, hidden: int, budget_elems: int = 1 << 21) -> int:
    """Largest chunk (multiple of 256) such that both the [n, chunk] logits and the [chunk, d] dequantized head rows
    stay within ~budget_elems fp32 values (8 MB each)."""
    chunk = budget_elems // max(n_tokens, hidden, 1)
    return min(max(256, chunk // 256 * 256), vocab)


def chunked_cross_entropy(parts, x: mx.array, targets: mx.array, mask: mx.array, vocab_chunk: int | None = None):
    """Return (loss, dL/dx, ntoks) for x [B, T, d], targets [B, T], mask [B, T] (1 = counted).

    `parts` supplies head_logits(x, a, b) and head_backprop(g, a, b) over vocabulary rows a:b.
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

    # pass 1: online logsumexp and the target logits
    run_max = mx.full((n,), -float("inf"))
    run_sum = mx.zeros((n,))
    target_logit = mx.zeros((n,))
    for a in range(0, V, chunk):
        b = min(a + chunk, V)
        logits = parts.head_logits(xs, a, b).astype(mx.float32)
        new_max = mx.maximum(run_max, logits.max(axis=1))
        run_sum = run_sum * mx.exp(run_max - new_max) + mx.exp(logits - new_max[:, None]).sum(axis=1)
        run_max = new_max
        in_chunk = (ts >= a) & (ts < b)
        local = mx.clip(ts - a, 0, b - a - 1)
        picked = mx.take_along_axis(logits, local[:, None], axis=1)[:, 0]
        target_logit = target_logit + mx.where(in_chunk, picked, 0.0)
        mx.eval(run_max, run_sum, target_logit)
    lse = run_max + mx.log(run_sum)
    loss = (lse - target_logit).sum() / n
    mx.eval(loss, lse)

    # pass 2: dL/dx = (softmax - onehot) @ W / n
    gx = mx.zeros((n, d), dtype=mx.float32)
    for a in range(0, V, chunk):
        b = min(a + chunk, V)
        logits = parts.head_logits(xs, a, b).astype(mx.float32)
        p = mx.exp(logits - lse[:, None])
        cols = mx.arange(a, b)
        p = p - (cols[None, :] == ts[:, None]).astype(p.dtype)
        gx = gx + parts.head_backprop(p / n, a, b).astype(mx.float32)
        mx.eval(gx)
    g_full = mx.zeros((B * T, d), dtype=mx.float32)
    g_full[idx_mx] = gx
    return loss, g_full.reshape(B, T, d).astype(x.dtype), n
