"""The user's preference pairs for the DPO pass after the fine-tune: the replies they kept (chosen) against the ones
they rejected or edited (rejected), in data/preference.py's rows and validation. A seeded share is held out and
measured by preference accuracy: the share of held-out pairs whose chosen reply has the higher summed log-probability
given the prompt (strictly higher; a tie counts as a miss). Tokens and scored positions are the trainer's
(data/preference.py's load_pairs and pair_batch): prompt tokens then response tokens, only the response's counted."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..data.datasets import DataError, iter_jsonl
from ..data.preference import pair_batch, pair_conversations

MIN_PAIRS = 2  # one to train on, one to measure


def read_pair_rows(path) -> list[dict]:
    """Every row of a pairs file, each checked (DataError with file:line); fewer than MIN_PAIRS refused."""
    rows = []
    for where, rec in iter_jsonl(path):
        pair_conversations(rec, where)
        rows.append(rec)
    if len(rows) < MIN_PAIRS:
        raise DataError(f"{path}: {len(rows)} preference pair(s); --preference-pairs needs at least {MIN_PAIRS} "
                        "(one to train on, one held out to measure)")
    return rows


def held_out_indices(n: int, share: float, seed: int) -> list[int]:
    """The held-out pairs of n: round(share * n), at least 1 and at most n - 1, drawn with the seed."""
    k = min(n - 1, max(1, round(share * n)))
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(n)[:k])


def response_logps(model, batch) -> list[float]:
    """Each row's summed log-probability of its masked targets (the response tokens)."""
    logits = model(batch.inputs).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp, batch.targets[..., None], axis=-1)[..., 0]
    return mx.where(batch.mask, picked, 0.0).sum(axis=1).tolist()


def pair_logps(model, pairs: list, max_seq_length: int, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) summed response log-probabilities of tokenized pairs (chosen, rejected, prompt length)."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        group = pairs[start:start + batch_size]
        scores = response_logps(model, pair_batch(group, max_seq_length))
        chosen += scores[:len(group)]
        rejected += scores[len(group):]
    return np.array(chosen), np.array(rejected)


def preference_accuracy(model, pairs: list, max_seq_length: int) -> dict:
    """{"accuracy": share of pairs with chosen > rejected, "margins": chosen - rejected per pair}."""
    model.eval()
    chosen, rejected = pair_logps(model, pairs, max_seq_length)
    margins = chosen - rejected
    return {"accuracy": float(np.mean(margins > 0)), "margins": [float(m) for m in margins]}
