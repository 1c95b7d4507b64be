"""GRPO's prompts in mlx-lm-lora's format, validated line by line, batched as mlx-lm-lora does.

A row is {"prompt": str, "answer": str, "system": str (optional), "type": anything (optional)}: the prompt the policy
completes and the answer its rewards check against (the answer is never shown to the model). The prompt is tokenized
with the chat template (system turn if given, the user's prompt, the generation prompt); a tokenizer without one gets
the prompt's text. Unlike mlx-lm-lora, no system prompt is added where a row has none.

Batches follow mlx-lm-lora's iterate_grpo_batches: prompts sorted by length, cut into batches of `batch_size`,
visited in a fresh permutation each epoch. A prompt longer than max_seq_length keeps its last max_seq_length tokens
(the generation prompt stays; mlx-lm-lora keeps the first ones).
"""

from __future__ import annotations

import numpy as np

from .datasets import DataError, iter_jsonl
from .preference import PairBatches


def _prompt_tokens(tokenizer, prompt: str, system: str | None) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return list(tokenizer.encode(prompt))


class PromptDataset:
    """[(prompt tokens int32, prompt text, answer text, type)] of one split."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes + len(p) + len(a) for t, p, a, _ in self.items)


def load_prompts(path, tokenizer) -> PromptDataset:
    items = []
    for where, rec in iter_jsonl(path):
        prompt, answer, system = rec.get("prompt"), rec.get("answer"), rec.get("system")
        if prompt is None or answer is None:
            raise DataError(f"{where}: a GRPO row needs 'prompt' and 'answer' (got keys {sorted(rec)})")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            raise DataError(f"{where}: 'answer' must be a string (or a number)")
        if system is not None and not isinstance(system, str):
            raise DataError(f"{where}: 'system' must be a string")
        try:
            tokens = _prompt_tokens(tokenizer, prompt, system)
        except Exception as e:  # noqa: BLE001 - a chat template raises what it likes
            raise DataError(f"{where}: cannot tokenize ({e})") from None
        items.append((np.array(tokens, dtype=np.int32), prompt, str(answer), rec.get("type")))
    if not items:
        raise DataError(f"{path}: empty (no GRPO prompts)")
    return PromptDataset(items)


class PromptBatches(PairBatches):
    """mlx-lm-lora's GRPO batch order; a batch is the list of its (dataset index, item) pairs (distributed: this
    rank's every world-th prompt, whose G completions it samples)."""

    def longest_batch_length(self) -> int:
        return min(max(len(t) for t, _, _, _ in self.dataset.items), self.max_seq_length)

    def __next__(self) -> list:
        return [(i, self._clipped(self.dataset[i])) for i in self.next_indices()]

    def _clipped(self, item):
        tokens, prompt, answer, kind = item
        return tokens[-self.max_seq_length:], prompt, answer, kind
