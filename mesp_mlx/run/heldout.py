"""The held-out loss, as mlx-lm's evaluate computes it, on the engine's streamed forward."""

from __future__ import annotations

from ..data.datasets import BatchIterator
from ..engine import Batch, BlockEngine


def evaluate(engine: BlockEngine, model, dataset, batch_size: int, max_seq_length: int, num_batches: int,
             rng=None) -> tuple[float, int]:
    """Mean loss per counted target token over `num_batches` batches of `dataset` (-1: all of it), as mlx-lm's
    evaluate, on the streamed forward without gradients (so no more memory than a training step's forward), dropout
    off. The batches' order is drawn from `rng` (training's stream: mlx-lm's order) or, without one, is fixed.
    Distributed: each rank takes its rows of every batch (uneven shares are exact too) and the losses are summed."""
    ranks = engine.ranks
    batches = BatchIterator(dataset, min(batch_size, len(dataset)), max_seq_length, seed=0, rng=rng, rank=ranks.rank,
                            world=ranks.size, even=False)
    batches.warned = True  # truncation was announced for the training set already
    n = batches.n_batches if num_batches == -1 else min(num_batches, batches.n_batches)
    was_training = model.training
    model.eval()
    total = count = 0
    try:
        for _ in range(n):
            tokens, lengths = next(batches)
            loss, ntoks = engine.loss_of(Batch.from_mlx_lm(tokens, lengths))
            total, count = total + loss * ntoks, count + ntoks
    finally:
        model.train(was_training)
    return total / max(count, 1), count
