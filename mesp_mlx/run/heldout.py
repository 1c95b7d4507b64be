"""The held-out loss, as mlx-lm's evaluate computes it, on the engine's streamed forward; GRPO's held-out reward."""

from __future__ import annotations

from ..data.datasets import BatchIterator
from ..data.preference import PairBatches, PreferenceDataset
from ..engine import Batch, BlockEngine
from .rollouts import mean_reward


def evaluate(engine: BlockEngine, model, dataset, batch_size: int, max_seq_length: int, num_batches: int,
             rng=None) -> tuple[float, int]:
    """Mean loss per counted target token over `num_batches` batches of `dataset` (-1: all of it), as mlx-lm's
    evaluate, on the streamed forward without gradients (so no more memory than a training step's forward), dropout
    off. The batches' order is drawn from `rng` (training's stream: mlx-lm's order) or, without one, is fixed.
    Distributed: each rank takes its rows of every batch (uneven shares are exact too) and the losses are summed."""
    if isinstance(dataset, PreferenceDataset):  # --train-mode dpo / orpo: the preference loss per pair
        return evaluate_pairs(engine, model, dataset, batch_size, max_seq_length, num_batches)
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
            item = next(batches)  # mlx-lm's (tokens, lengths), or a Batch under --train-all-turns (cut_batch)
            loss, ntoks = engine.loss_of(item if isinstance(item, Batch) else Batch.from_mlx_lm(*item))
            total, count = total + loss * ntoks, count + ntoks
    finally:
        model.train(was_training)
    return total / max(count, 1), count


def evaluate_pairs(engine: BlockEngine, model, dataset, batch_size: int, max_seq_length: int,
                   num_batches: int) -> tuple[float, int]:
    """Mean preference loss per pair over `num_batches` batches of preference pairs (-1: all), in the fixed order
    mlx-lm-lora evaluates them, on the streamed forward (DPO's reference pass included), dropout off."""
    batches = PairBatches(dataset, min(batch_size, len(dataset)), max_seq_length, shuffle=False)
    n = len(batches.batches) if num_batches == -1 else min(num_batches, len(batches.batches))
    was_training = model.training
    model.eval()
    total = pairs = 0
    try:
        for _ in range(n):
            batch = next(batches)
            loss, _ = engine.loss_of(batch)
            b = batch.inputs.shape[0] // 2
            total, pairs = total + loss * b, pairs + b
    finally:
        model.train(was_training)
    return total / max(pairs, 1), pairs


def evaluate_rewards(run, dataset, num_batches: int) -> tuple[float, int]:
    """GRPO's held-out figure: (mean reward, prompts) of greedy completions of the first num_batches x batch_size
    prompts of `dataset` (-1: all), decoded as many rows together as the plan chose."""
    s, prep, batches = run.settings, run.prep, run.batches
    return mean_reward(prep.model, prep.tokenizer, dataset, batches.rewards, s.max_completion_length,
                       -1 if num_batches == -1 else num_batches * s.batch_size,
                       batches.sampling.rows_at_once or s.batch_size * s.group_size, prep.streamer)
