"""GRPO's objective on the block engine, as mlx-lm-lora 5.x defines it (its grpo_loss / _grpo_objective).

A GRPO batch holds G sampled completions for each of B prompts (B x G rows, prompt + completion, masked to the
completion's tokens, the stop token included). Each row r carries its group-normalised advantage
    A_r = (reward_r - mean of its group) / (std of its group + 1e-4)
and for each counted token k of row r, with log p_k the policy's, log q_k the reference's (adapters off) and
log p_old,k the sampling policy's (= log p_k, without its gradient, when each rollout is trained on once):
    ratio_k = exp(log p_k - log p_old,k)            ("sequence" level: exp of the row's mean of those differences)
    loss_k  = -min(ratio_k A_r, clip(ratio_k, 1 - eps, 1 + eps_high) A_r) + beta KL_k
    KL_k    = exp(d) - d - 1, d = min(log q_k - log p_k, 20)     (Schulman's k3 estimator, as mlx-lm-lora bounds it)
and the loss is the mean over rows of each row's mean (grpo), the sum over all tokens / their count (bnpo), or the
sum / (rows x max completion length) (dr_grpo). Every term is a function of token log-probabilities, so the engine
trains it like SFT with one weight per token (objectives/base.py).
"""

from __future__ import annotations

import mlx.core as mx

from .base import SequenceObjective, row_counts, row_scores

GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo")
IMPORTANCE_LEVELS = ("token", "sequence")
MAX_KL_LOG_RATIO = 20.0  # exp() overflow guard on the KL estimator (mlx-lm-lora's bound)


class GRPO(SequenceObjective):
    name = "grpo"

    def __init__(self, beta: float = 0.1, epsilon: float = 1e-4, epsilon_high: float | None = None,
                 loss_type: str = "grpo", importance_sampling_level: str = "token", max_completion_length: int = 256):
        if loss_type not in GRPO_LOSSES:
            raise ValueError(f"GRPO loss {loss_type!r}: one of {', '.join(GRPO_LOSSES)}")
        if importance_sampling_level not in IMPORTANCE_LEVELS:
            raise ValueError(f"importance sampling level {importance_sampling_level!r}: token or sequence")
        self.beta, self.epsilon = beta, epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.loss_type, self.level, self.max_completion_length = loss_type, importance_sampling_level, \
            max_completion_length
        self.needs_reference = beta != 0  # beta 0: no KL term, no reference pass

    def weight(self, n_rows, ntoks):
        return float(ntoks) if self.loss_type == "bnpo" else float(n_rows)  # bnpo: a mean over tokens

    def loss(self, logp, rows, n_rows, reference, batch):
        old = batch.old_logp if getattr(batch, "old_logp", None) is not None else mx.stop_gradient(logp)
        log_ratio = logp - old
        if self.level == "sequence":
            log_ratio = row_scores(log_ratio, rows, n_rows, mean=True)[rows]
        ratio = mx.exp(log_ratio)
        clipped = mx.clip(ratio, 1 - self.epsilon, 1 + self.epsilon_high)
        advantage = mx.stop_gradient(batch.advantages.astype(mx.float32))[rows]
        per_token = -mx.minimum(ratio * advantage, clipped * advantage)
        if reference is not None:
            delta = mx.stop_gradient(reference) - logp
            bounded = mx.minimum(delta, MAX_KL_LOG_RATIO)
            kl = mx.maximum(mx.expm1(bounded) - bounded, 0)
            per_token = per_token + self.beta * kl
        else:
            delta = kl = mx.zeros_like(logp)
        counts = row_counts(rows, n_rows)
        total = mx.maximum(counts.sum(), 1.0)
        row_loss = mx.zeros((n_rows,), dtype=mx.float32).at[rows].add(per_token)
        if self.loss_type == "grpo":
            value = (row_loss / mx.maximum(counts, 1.0)).mean()
        elif self.loss_type == "bnpo":
            value = row_loss.sum() / total
        else:
            value = row_loss.sum() / (n_rows * self.max_completion_length)
        low = (ratio < 1 - self.epsilon) & (advantage < 0)
        high = (ratio > 1 + self.epsilon_high) & (advantage > 0)
        kl_rows = row_scores(mx.stop_gradient(kl), rows, n_rows, mean=True)
        return value, {"kl": kl_rows.mean(),
                       "clip_fraction": ((low | high).astype(mx.float32).sum() / total),
                       "clip_low": low.astype(mx.float32).sum() / total,
                       "clip_high": high.astype(mx.float32).sum() / total,
                       "kl_clipped": (mx.stop_gradient(delta) > MAX_KL_LOG_RATIO).astype(mx.float32).sum() / total}
