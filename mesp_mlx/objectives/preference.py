"""Preference objectives on the block engine: DPO (sigmoid, hinge, IPO) and ORPO, as mlx-lm-lora defines them.

A preference batch holds B pairs as 2B rows: rows 0..B-1 the chosen responses, rows B..2B-1 the rejected ones, each
masked to its response tokens. Both losses couple tokens only through per-sequence scores
    s_r = sum_k log p_k over row r's response tokens      (DPO sigmoid / hinge)
    s_r = mean_k log p_k                                   (DPO IPO, ORPO)
(objectives/base.py turns that into one weight per token). DPO's reference policy is the base model with the adapters
off.

    DPO  z_i = (s_chosen - s_rejected) - (ref_chosen - ref_rejected)
         sigmoid: -log sigmoid(beta z)   hinge: max(0, 1 - beta z)   ipo: (z - 1/(2 beta))^2
    ORPO per-token log p clipped to [-1000, 0]; c, r the mean log p of chosen and rejected;
         log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r));  loss_i = -c - beta log sigmoid(log_odds)
The loss is the mean over the B pairs.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .base import SequenceObjective, row_scores

DPO_LOSSES = ("sigmoid", "hinge", "ipo")


def _log1mexp(x: mx.array) -> mx.array:
    """log(1 - e^x) for x < 0, stable on both sides of -log 2 (mlx-lm-lora's form)."""
    x = mx.minimum(x, -1e-7)
    return mx.where(x > -math.log(2.0), mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


class PreferenceObjective(SequenceObjective):
    """A loss on per-sequence scores of a batch of 2B rows (chosen, then rejected): pair_loss(scores, reference)."""

    name = "preference"
    mean_scores = False

    def pair_loss(self, scores: mx.array, reference: mx.array | None) -> tuple[mx.array, dict]:
        raise NotImplementedError

    def prepare_logp(self, logp: mx.array) -> mx.array:
        return logp

    def scores(self, logp: mx.array, rows: mx.array, n_rows: int) -> mx.array:
        return row_scores(self.prepare_logp(logp), rows, n_rows, self.mean_scores)

    def loss(self, logp, rows, n_rows, reference, batch):
        return self.pair_loss(self.scores(logp, rows, n_rows), reference)

    def weight(self, n_rows, ntoks):
        return n_rows / 2  # a mean over pairs

    def reference_from(self, logp, rows, n_rows):
        return self.scores(logp, rows, n_rows)


class DPO(PreferenceObjective):
    name = "dpo"
    needs_reference = True

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid"):
        if loss_type not in DPO_LOSSES:
            raise ValueError(f"DPO loss {loss_type!r}: one of {', '.join(DPO_LOSSES)}")
        self.beta, self.loss_type = beta, loss_type
        self.mean_scores = loss_type == "ipo"
        # pair index -> (reference score of its chosen, of its rejected response): the reference policy never
        # changes, and a training pair is always batched with the same pairs (the same padding), so its reference
        # scores are computed once, on the pair's first visit, and reused on every later epoch (8 bytes a pair;
        # saved with the training state, run/session.py)
        self.reference_cache: dict[int, tuple[float, float]] = {}

    def reference_scores(self, engine, batch, step: int) -> mx.array:
        ids = getattr(batch, "pair_ids", ())
        if ids and all(i in self.reference_cache for i in ids):
            return mx.array([self.reference_cache[i][0] for i in ids] + [self.reference_cache[i][1] for i in ids],
                            dtype=mx.float32)
        scores = super().reference_scores(engine, batch, step)
        values = scores.tolist()
        for j, i in enumerate(ids):
            self.reference_cache[i] = (values[j], values[len(ids) + j])
        return scores

    def pair_loss(self, scores, reference):
        B = scores.shape[0] // 2
        chosen, rejected = scores[:B], scores[B:]
        ref_chosen, ref_rejected = reference[:B], reference[B:]
        z = (chosen - rejected) - (ref_chosen - ref_rejected)
        if self.loss_type == "sigmoid":
            losses = -nn.log_sigmoid(self.beta * z)
        elif self.loss_type == "hinge":
            losses = nn.relu(1 - self.beta * z)
        else:
            losses = (z - 1 / (2 * self.beta)) ** 2
        chosen_reward = self.beta * mx.stop_gradient(chosen - ref_chosen)
        rejected_reward = self.beta * mx.stop_gradient(rejected - ref_rejected)
        return losses.mean(), {"reward_margin": (chosen_reward - rejected_reward).mean(),
                               "reward_accuracy": (chosen_reward > rejected_reward).astype(mx.float32).mean(),
                               "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean()}


class ORPO(PreferenceObjective):
    name = "orpo"
    mean_scores = True

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def prepare_logp(self, logp):
        return mx.clip(logp, -1000.0, 0.0)

    def pair_loss(self, scores, reference):
        B = scores.shape[0] // 2
        chosen, rejected = scores[:B], scores[B:]
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        losses = -chosen - self.beta * nn.log_sigmoid(log_odds)
        chosen_reward, rejected_reward = self.beta * mx.stop_gradient(chosen), self.beta * mx.stop_gradient(rejected)
        return losses.mean(), {"reward_margin": (chosen_reward - rejected_reward).mean(),
                               "reward_accuracy": (chosen_reward > rejected_reward).astype(mx.float32).mean(),
                               "log_odds": mx.stop_gradient(log_odds).mean()}
