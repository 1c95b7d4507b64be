"""GRPO's batches: G completions per prompt sampled by the policy being trained, scored, and turned into rows.

Each step draws the next batch of B prompts (mlx-lm-lora's order), samples G completions for each with mlx-lm's
BatchGenerator (the adapters on, dropout off, the sampling seeded by the run's seed and the batch's number, so a
resumed run draws the same completions), rewards them, normalises the rewards within each prompt's group and
returns the B x G rows (prompt + completion, the loss on the completion's tokens, the stop token included as
mlx-lm-lora does) with their advantages. Generation needs every block's weights at once: when the weights are
streamed they are read for the generation and released after it; its seconds and MLX peak go in the batch's figures
(and the governor checks that peak against the budget, as it checks every block's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from ..engine import Batch
from ..objectives.rewards import Rewards, group_advantages

MB = 1024 * 1024


@dataclass
class RolloutBatch(Batch):
    advantages: mx.array | None = None  # [rows] group-normalised advantage of each completion
    old_logp: mx.array | None = None  # the sampling policy's token log-probabilities (None: on-policy)
    figures: dict = field(default_factory=dict)  # rewards, generation seconds and peak: the step's metrics


@dataclass
class Sampling:
    """The run's sampling settings (TrainConfig's GRPO keys) and the rows decoded together."""
    group_size: int
    max_completion_length: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    rows_at_once: int | None = None  # rows decoded together (the plan's choice; None: all)

    @staticmethod
    def of(settings) -> "Sampling":
        return Sampling(settings.group_size, settings.max_completion_length, settings.temperature, settings.top_p,
                        settings.top_k, settings.min_p)


def sample(model, tokenizer, prompts: list, max_tokens: int, sampler=None, rows_at_once: int | None = None
           ) -> list[list[int]]:
    """One completion per prompt (token lists, the stop token kept when one ended it), decoded `rows_at_once` rows
    at a time (None: all together). Each group runs to its end before the next starts: mlx-lm's continuous
    batching would prefill the next rows while the last ones decode, holding two groups' caches at once."""
    rows = min(rows_at_once or len(prompts), len(prompts))
    was_training = model.training
    model.eval()
    try:
        return [c for start in range(0, len(prompts), rows)
                for c in _decode(model, tokenizer, prompts[start:start + rows], max_tokens, sampler)]
    finally:
        model.train(was_training)


def _decode(model, tokenizer, prompts: list, max_tokens: int, sampler) -> list[list[int]]:
    generator = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids], sampler=sampler,
                               completion_batch_size=len(prompts), prefill_batch_size=len(prompts))
    try:
        uids = generator.insert([list(map(int, p)) for p in prompts], [max_tokens] * len(prompts))
        tokens = {uid: [] for uid in uids}
        while responses := generator.next_generated():
            for r in responses:
                tokens[r.uid].append(int(r.token))
    finally:
        generator.close()
    return [tokens[uid] for uid in uids]


def completion_text(tokenizer, ids: list[int]) -> str:
    """The text a reward sees: the completion without its stop token."""
    if ids and ids[-1] in tokenizer.eos_token_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def rollout_rows(prompts: list, completions: list[list[int]]) -> tuple[mx.array, mx.array, mx.array]:
    """(inputs, targets, mask) of prompt + completion rows, right-padded; target k (predicting token k + 1) counts
    when it predicts a completion token."""
    seqs = [np.concatenate([np.asarray(p, np.int32), np.asarray(c, np.int32)]) for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width - 1), bool)
    k = np.arange(1, width)
    for j, (s, p) in enumerate(zip(seqs, prompts)):
        tokens[j, :len(s)] = s
        mask[j] = (k >= len(p)) & (k < len(s))
    tokens = mx.array(tokens)
    return tokens[:, :-1], tokens[:, 1:], mx.array(mask)


class RolloutBatches:
    """The next GRPO batch each step, sampled from the current policy."""

    def __init__(self, prompts, sampling: Sampling, rewards: Rewards, model, tokenizer, streamer=None, seed: int = 0):
        self.prompts, self.sampling, self.rewards = prompts, sampling, rewards
        self.model, self.tokenizer, self.streamer, self.seed = model, tokenizer, streamer, seed
        self.on_generated = None  # the governor: (phase, block, peak bytes, active bytes)
        self.drawn = 0  # batches drawn so far: the sampling seed of the next one

    @property
    def batches(self) -> list:  # --epochs counts these
        return self.prompts.batches

    def longest_batch_length(self) -> int:
        return self.prompts.longest_batch_length() + self.sampling.max_completion_length

    def state(self) -> dict:
        return {**self.prompts.state(), "drawn": self.drawn}

    def restore(self, state: dict) -> None:
        self.prompts.restore(state)
        self.drawn = int(state.get("drawn", 0))

    def __iter__(self):
        return self

    def __next__(self) -> RolloutBatch:
        chosen = next(self.prompts)
        self.drawn += 1
        g = self.sampling.group_size
        index = [i for i, _ in chosen for _ in range(g)]
        prompts = [item[0] for _, item in chosen for _ in range(g)]
        s = self.sampling
        mx.random.seed((self.seed * 1_000_003 + self.drawn * 7_919) % 2**31)
        sampler = make_sampler(s.temperature, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k)
        completions, figures = self._generate(prompts, sampler)
        texts = [completion_text(self.tokenizer, c) for c in completions]
        items = [item for _, item in chosen for _ in range(g)]
        rewards, reward_figures = self.rewards([it[1] for it in items], texts, [it[2] for it in items],
                                               [it[3] for it in items], index)
        advantages = group_advantages(rewards, g)
        inputs, targets, mask = rollout_rows(prompts, completions)
        lengths = np.array([len(c) for c in completions])
        figures.update(reward_figures, reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                       completion_tokens=float(lengths.mean()),
                       hit_max_tokens=float((lengths >= s.max_completion_length).mean()))
        return RolloutBatch(inputs, targets, mask, advantages=mx.array(advantages, dtype=mx.float32), figures=figures)

    def _generate(self, prompts: list, sampler) -> tuple[list, dict]:
        """The completions, and the generation's seconds and MLX peak (checked by the governor)."""
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        completions = sample(self.model, self.tokenizer, prompts, self.sampling.max_completion_length, sampler,
                             self.sampling.rows_at_once)
        seconds, peak = time.perf_counter() - start, mx.get_peak_memory()
        if self.streamer is not None:  # every block's weights were read: back to unevaluated handles
            self.streamer.release_all()
        mx.clear_cache()
        if self.on_generated is not None:
            self.on_generated("generate", None, peak, mx.get_active_memory())
        return completions, {"generate_s": seconds, "generate_peak_mb": peak / MB}


def mean_reward(model, tokenizer, dataset, rewards: Rewards, max_tokens: int, n_prompts: int, batch_size: int,
                streamer=None) -> tuple[float, int]:
    """(mean reward, prompts) of greedy completions of the first `n_prompts` prompts of `dataset` (-1: all): the
    held-out figure GRPO improves."""
    n = len(dataset) if n_prompts == -1 else min(n_prompts, len(dataset))
    total = 0.0
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        completions = sample(model, tokenizer, [it[0] for it in items], max_tokens)
        texts = [completion_text(tokenizer, c) for c in completions]
        scores, _ = rewards([it[1] for it in items], texts, [it[2] for it in items], [it[3] for it in items],
                            list(range(start, start + len(items))))
        total += float(scores.sum())
    if streamer is not None:
        streamer.release_all()
    mx.clear_cache()
    return total / max(n, 1), n
