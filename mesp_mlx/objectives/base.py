"""What the engine asks of a training objective beyond SFT's masked cross-entropy.

Every objective here couples tokens only through functions of their log-probabilities: the engine's chunked pass
gives log p_k for every counted target token k (engine/loss.py) and the pullback from dL/dlog p_k to dL/dh; autodiff
of the small loss over the [n] token log-probabilities gives w_k = dL/dlog p_k, so the blocks' backward (MeSP's hand
rule, MeBP's autodiff, LCSB's subset) is SFT's with one scalar weight per token.

A reference policy, where one is needed (DPO, GRPO's KL term), is the base model: the same streamed forward with
every LoRA branch scaled to 0 (no second copy of the weights), at inference's memory.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx

from ..engine.loss import chunked_token_logprobs


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


def row_scores(logp: mx.array, rows: mx.array, n_rows: int, mean: bool) -> mx.array:
    """Per-row sums (or means) of the token log-probabilities."""
    sums = mx.zeros((n_rows,), dtype=mx.float32).at[rows].add(logp)
    if not mean:
        return sums
    return sums / mx.maximum(row_counts(rows, n_rows), 1.0)


def row_counts(rows: mx.array, n_rows: int) -> mx.array:
    """Counted tokens per row."""
    return mx.zeros((n_rows,), dtype=mx.float32).at[rows].add(mx.ones(rows.shape, dtype=mx.float32))


def floats(metrics: dict) -> dict:
    return {k: float(v.item() if isinstance(v, mx.array) else v) for k, v in metrics.items()}


class SequenceObjective:
    """A loss over the token log-probabilities of a batch's rows (flat, in the order chunked_token_logprobs gives)."""

    name = "objective"
    needs_reference = False

    def loss(self, logp: mx.array, rows: mx.array, n_rows: int, reference, batch) -> tuple[mx.array, dict]:
        """(scalar loss, metrics) of the counted tokens' log-probabilities `logp`, row `rows[k]` each."""
        raise NotImplementedError

    def weight(self, n_rows: int, ntoks: int) -> float:
        """What the loss is a mean over, counted in a batch of `n_rows` rows with `ntoks` counted tokens: a
        distributed run weights each rank's loss (and its gradient) by it (engine/loop.py, _global_loss)."""
        return float(n_rows)

    def reference_from(self, logp: mx.array, rows: mx.array, n_rows: int):
        """What the loss needs of the reference policy's token log-probabilities (per-row scores, or all of them)."""
        return logp

    def loss_and_grad(self, parts, normed: mx.array, batch, reference, vocab_chunk: int | None,
                      need_grad: bool = True):
        """(loss value, dL/dnormed or None, counted tokens, metrics)."""
        n_rows = normed.shape[0]
        logp, rows, pullback = chunked_token_logprobs(parts, normed, batch.targets, batch.mask, vocab_chunk,
                                                      need_grad)
        metrics: dict = {}

        def total(lp):
            value, m = self.loss(lp, rows, n_rows, reference, batch)
            metrics.update(m)
            return value

        if not need_grad:
            value = total(logp)
            mx.eval(value)
            return value.item(), None, int(logp.size), floats(metrics)
        value, w = mx.value_and_grad(total)(logp)
        mx.eval(value, w)
        return value.item(), pullback(w), int(logp.size), floats(metrics)

    def reference_scores(self, engine, batch, step: int):
        """The reference policy's part of the loss: the streamed forward with the adapters off (no gradient)."""
        with adapters_off(engine.parts.model):
            normed = engine.forward_hidden(batch, step)
        logp, rows, _ = chunked_token_logprobs(engine.parts, normed, batch.targets, batch.mask, engine.vocab_chunk,
                                               need_grad=False)
        reference = self.reference_from(logp, rows, normed.shape[0])
        mx.eval(reference)
        return reference
