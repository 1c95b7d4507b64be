"""Preference objectives on the block engine: DPO (sigmoid, hinge, IPO) and ORPO, as mlx-lm-lora defines them.

A preference batch holds B pairs as 2B rows: rows 0..B-1 the chosen responses, rows B..2B-1 the rejected ones, each
masked to its response tokens. Both losses couple tokens only through per-sequence scores
    s_r = sum_k log p_k over row r's response tokens      (DPO sigmoid / hinge)
    s_r = mean_k log p_k                                   (DPO IPO, ORPO)
so the engine's chunked pass gives log p_k and its pullback (engine/loss.py), autodiff of the small loss over the
[n] token log-probabilities gives w_k = dL/dlog p_k, and dL/dh is the pullback of w: the blocks' backward (MeSP's hand
rule, MeBP's autodiff, LCSB's subset) is the one SFT uses, with one scalar weight per token.

DPO's reference policy is the base model: the same streamed forward with every LoRA branch scaled to 0 (no second
copy of the weights), run before the step's training forward, at inference's memory.

    DPO  z_i = (s_chosen - s_rejected) - (ref_chosen - ref_rejected)
         sigmoid: -log sigmoid(beta z)   hinge: max(0, 1 - beta z)   ipo: (z - 1/(2 beta))^2
    ORPO per-token log p clipped to [-1000, 0]; c, r the mean log p of chosen and rejected;
         log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r));  loss_i = -c - beta log sigmoid(log_odds)
The loss is the mean over the B pairs.
"""

from __future__ import annotations

import contextlib
import math

import mlx.core as mx
import mlx.nn as nn

from ..engine.loss import chunked_token_logprobs

DPO_LOSSES = ("sigmoid", "hinge", "ipo")


@contextlib.contextmanager
def adapters_off(module):
    """Every LoRA branch under `module` scaled to 0 (the base model's function), restored afterwards."""
    changed = []
    for _, m in module.named_modules():
        if hasattr(m, "lora_a") and hasattr(m, "scale"):
            changed.append((m, m.scale))
            m.scale = 0.0
    try:
        yield
    finally:
        for m, scale in changed:
            m.scale = scale


def _row_scores(logp: mx.array, rows: mx.array, n_rows: int, mean: bool) -> mx.array:
    """Per-row sums (or means) of the token log-probabilities."""
    sums = mx.zeros((n_rows,), dtype=mx.float32).at[rows].add(logp)
    if not mean:
        return sums
    counts = mx.zeros((n_rows,), dtype=mx.float32).at[rows].add(mx.ones_like(logp))
    return sums / mx.maximum(counts, 1.0)


def _log1mexp(x: mx.array) -> mx.array:
    """log(1 - e^x) for x < 0, stable on both sides of -log 2 (mlx-lm-lora's form)."""
    x = mx.minimum(x, -1e-7)
    return mx.where(x > -math.log(2.0), mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


class PreferenceObjective:
    """What the engine asks of a training objective: its reference pass (if any) and its loss with dL/dh."""

    name = "preference"
    needs_reference = False
    mean_scores = False

    def pair_loss(self, scores: mx.array, reference: mx.array | None) -> tuple[mx.array, dict]:
        raise NotImplementedError

    def prepare_logp(self, logp: mx.array) -> mx.array:
        return logp

    def loss_and_grad(self, parts, normed: mx.array, batch, reference: mx.array | None, vocab_chunk: int | None,
                      need_grad: bool = True):
        """(loss value, dL/dnormed or None, counted tokens, metrics) for a batch of 2B rows (chosen, then rejected)."""
        n_rows = normed.shape[0]
        logp, rows, pullback = chunked_token_logprobs(parts, normed, batch.targets, batch.mask, vocab_chunk,
                                                      need_grad)
        metrics: dict = {}

        def total(lp):
            loss, m = self.pair_loss(_row_scores(self.prepare_logp(lp), rows, n_rows, self.mean_scores), reference)
            metrics.update(m)
            return loss

        if not need_grad:
            loss = total(logp)
            mx.eval(loss)
            return loss.item(), None, int(logp.size), _floats(metrics)
        loss, w = mx.value_and_grad(total)(logp)
        mx.eval(loss, w)
        return loss.item(), pullback(w), int(logp.size), _floats(metrics)

    def reference_scores(self, engine, batch, step: int) -> mx.array:
        """The reference policy's per-row scores: the streamed forward with the adapters off (no gradient)."""
        with adapters_off(engine.parts.model):
            normed = engine.forward_hidden(batch, step)
        logp, rows, _ = chunked_token_logprobs(engine.parts, normed, batch.targets, batch.mask, engine.vocab_chunk,
                                               need_grad=False)
        scores = _row_scores(self.prepare_logp(logp), rows, normed.shape[0], self.mean_scores)
        mx.eval(scores)
        return scores


def _floats(metrics: dict) -> dict:
    return {k: float(v.item() if isinstance(v, mx.array) else v) for k, v in metrics.items()}


class DPO(PreferenceObjective):
    name = "dpo"
    needs_reference = True

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid"):
        if loss_type not in DPO_LOSSES:
            raise ValueError(f"DPO loss {loss_type!r}: one of {', '.join(DPO_LOSSES)}")
        self.beta, self.loss_type = beta, loss_type
        self.mean_scores = loss_type == "ipo"

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
