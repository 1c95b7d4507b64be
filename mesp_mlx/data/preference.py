"""Preference pairs for DPO and ORPO in mlx-lm-lora's format, validated line by line, batched as mlx-lm-lora does.

A row is one of
    {"prompt": str, "chosen": str, "rejected": str, "system": str (optional)}      mlx-lm-lora's DPODataset keys
    {"chosen": [messages], "rejected": [messages]}                                  chat form: the same conversation,
                                                                                    differing in the last (assistant) turn
Each response is tokenized with the chat template as mlx-lm-lora does: the whole conversation for the response, the
conversation up to the generation prompt for its prompt length (the loss counts the response tokens only). A tokenizer
without a chat template gets prompt and response tokenized one after the other.

Batches follow mlx-lm-lora's iterate_dpo_batches: pairs sorted by the chosen response's length, cut into batches of
`batch_size`, the batches visited in a fresh permutation each epoch, each padded to its longest response (at most
max_seq_length). A batch is 2B rows: the B chosen responses, then the B rejected ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..engine import Batch
from .datasets import DataError, _rng_json, _rng_state, iter_jsonl

ROLES = ("system", "user", "assistant", "tool")


def _messages(value, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or len(value) < 2:
        raise DataError(f"{where}: {key!r} must be a response string (with 'prompt') or a conversation of at least "
                        "two messages")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key!r} message {j} needs a role ({', '.join(ROLES)}) and string content")
    if value[-1]["role"] != "assistant" or not value[-1]["content"].strip():
        raise DataError(f"{where}: {key!r} must end with a non-empty assistant message")
    return value


def pair_conversations(rec: dict, where: str) -> tuple[list[dict], str, str]:
    """(the prompt's messages, chosen response, rejected response) of one row; DataError naming file:line."""
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    if chosen is None or rejected is None:
        raise DataError(f"{where}: a preference row needs 'chosen' and 'rejected' (got keys {sorted(rec)})")
    if isinstance(chosen, str) or isinstance(rejected, str):
        prompt = rec.get("prompt")
        if not isinstance(prompt, str) or not isinstance(chosen, str) or not isinstance(rejected, str):
            raise DataError(f"{where}: 'prompt', 'chosen' and 'rejected' must all be strings")
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise DataError(f"{where}: empty {key!r} response")
        system = rec.get("system")
        if system is not None and not isinstance(system, str):
            raise DataError(f"{where}: 'system' must be a string")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return messages, chosen, rejected
    chosen, rejected = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(f"{where}: 'chosen' and 'rejected' must share every message but the last")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _tokenize(tokenizer, messages: list[dict], response: str) -> tuple[list[int], int]:
    """(tokens of the conversation with the response, the prompt's length in tokens)."""
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                             add_generation_prompt=False)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(full), len(prompt)
    prompt = tokenizer.encode("\n".join(m["content"] for m in messages))
    return list(prompt) + list(tokenizer.encode(response, add_special_tokens=False)), len(prompt)


class PreferenceDataset:
    """Tokenized pairs: [(chosen tokens, rejected tokens, prompt length)], each as int32 arrays."""

    def __init__(self, pairs: list):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]

    @property
    def nbytes(self) -> int:
        """Host memory of the tokenized pairs (the planner reports it beside the MLX peak)."""
        return sum(c.nbytes + r.nbytes for c, r, _ in self.pairs)


def load_pairs(path, tokenizer) -> PreferenceDataset:
    pairs = []
    for where, rec in iter_jsonl(path):
        messages, chosen, rejected = pair_conversations(rec, where)
        try:
            c, prompt_len = _tokenize(tokenizer, messages, chosen)
            r, _ = _tokenize(tokenizer, messages, rejected)
        except Exception as e:  # noqa: BLE001 - a chat template raises what it likes
            raise DataError(f"{where}: cannot tokenize ({e})") from None
        if len(c) <= prompt_len or len(r) <= prompt_len:
            raise DataError(f"{where}: a response has no token after the prompt")
        pairs.append((np.array(c, dtype=np.int32), np.array(r, dtype=np.int32), prompt_len))
    if not pairs:
        raise DataError(f"{path}: empty (no preference rows)")
    return PreferenceDataset(pairs)


@dataclass
class PairBatch(Batch):
    pair_ids: tuple = ()  # the training pairs' indices (DPO keeps their reference scores: objectives/preference.py)


def pair_batch(pairs: list, max_seq_length: int, pair_ids: tuple = ()) -> PairBatch:
    """2B rows (chosen, then rejected) padded to the longest response (at most max_seq_length); target k (predicting
    token k + 1) counts when prompt length <= k + 1 < the response's length: mlx-lm-lora's mask[:, 1:]."""
    rows = [(c, p) for c, _, p in pairs] + [(r, p) for _, r, p in pairs]
    width = min(max(len(t) for t, _ in rows), max_seq_length)
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width - 1), bool)
    k = np.arange(1, width)  # target k predicts token k
    for j, (t, p) in enumerate(rows):
        n = min(len(t), max_seq_length)
        tokens[j, :n] = t[:n]
        mask[j] = (k >= min(p, n)) & (k < n)
    tokens = mx.array(tokens)
    return PairBatch(tokens[:, :-1], tokens[:, 1:], mx.array(mask), tuple(pair_ids))


class PairBatches:
    """mlx-lm-lora's DPO batch order, its permutations drawn from `rng`; the position can be saved and restored."""

    def __init__(self, dataset: PreferenceDataset, batch_size: int, max_seq_length: int, seed: int = 0, rng=None,
                 shuffle: bool = True, rank: int = 0, world: int = 1):
        if len(dataset) < batch_size:
            raise DataError(f"the preference set has {len(dataset)} pairs, fewer than --batch-size {batch_size}")
        self.dataset, self.batch_size, self.max_seq_length = dataset, batch_size, max_seq_length
        order = sorted(range(len(dataset)), key=lambda i: len(dataset[i][0]))
        self.batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        self.rng = rng if rng is not None else np.random.RandomState(seed)
        self.shuffle = shuffle  # False: the batches in order, without pair ids (held-out evaluation)
        self.rank, self.world = rank, world  # distributed: each rank takes every world-th pair of each batch
        self.epoch, self.index, self.order = -1, 0, None
        self._epoch_state = None

    def longest_batch_length(self) -> int:
        longest = max(max(len(c), len(r)) for c, r, _ in self.dataset.pairs)
        return min(longest, self.max_seq_length)

    def _new_epoch(self) -> None:
        self.epoch += 1
        self._epoch_state = self.rng.get_state()
        self.order = self.rng.permutation(len(self.batches)) if self.shuffle else np.arange(len(self.batches))
        self.index = 0

    def __iter__(self):
        return self

    def next_indices(self) -> list:
        """The dataset indices of the next batch (this rank's share), a new epoch's order drawn when one ends."""
        if self.order is None or self.index >= len(self.order):
            self._new_epoch()
        chosen = self.batches[self.order[self.index]][self.rank::self.world]
        self.index += 1
        return chosen

    def __next__(self) -> Batch:
        chosen = self.next_indices()
        return pair_batch([self.dataset[i] for i in chosen], self.max_seq_length,
                          tuple(int(i) for i in chosen) if self.shuffle else ())

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index,
                "epoch_rng": None if self._epoch_state is None else _rng_json(self._epoch_state)}

    def restore(self, state: dict) -> None:
        if state.get("epoch_rng") is None:
            return
        self.rng.set_state(_rng_state(state["epoch_rng"]))
        self.epoch = int(state["epoch"]) - 1
        self._new_epoch()
        self.index = int(state["index"])
