"""What the pipeline asks of the model itself: text embeddings, replies (evaluation) and paraphrases (self-synthesis).
Generation is mlx-lm's; the embedding is the model's own last hidden state (after the final norm), mean-pooled."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
from mlx_lm.generate import batch_generate
from mlx_lm.sample_utils import make_sampler

from .scores import rouge1, unit

PARAPHRASE_INSTRUCTION = ("Rewrite the following message in other words, keeping its meaning. Reply with the rewritten "
                          "message only.\n\nMessage: {prompt}")


class TextEncoder:
    """Token ids and a unit-length text embedding from the model being personalised."""

    def __init__(self, model, tokenizer, max_tokens: int = 256):
        if not hasattr(model, "model"):
            raise TypeError("text embeddings need an mlx-lm model with a `.model` body (hidden states before the head)")
        self.model, self.tokenizer, self.max_tokens = model, tokenizer, max_tokens

    def tokens(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))[: self.max_tokens]

    def embed(self, ids: list[int]) -> np.ndarray:
        return self.embed_many([ids])[0]

    def embed_many(self, texts_ids: list[list[int]], batch_size: int = 32) -> list[np.ndarray]:
        """Embeddings of many texts, batch by batch of similar lengths. Right padding is exact: attention is causal,
        so a position never sees the padding after it, and the mean is over each text's own positions."""
        order = sorted(range(len(texts_ids)), key=lambda i: len(texts_ids[i]))
        out: list = [None] * len(texts_ids)
        for start in range(0, len(order), batch_size):
            group = order[start:start + batch_size]
            lengths = [max(1, len(texts_ids[i])) for i in group]
            width = max(lengths)
            pad = np.zeros((len(group), width), dtype=np.int32)
            for row, i in enumerate(group):
                pad[row, :len(texts_ids[i])] = texts_ids[i]
            hidden = self.model.model(mx.array(pad)).astype(mx.float32)  # [B, T, d], final norm applied
            valid = mx.array(np.arange(width)[None, :] < np.array(lengths)[:, None], dtype=mx.float32)
            pooled = (hidden * valid[..., None]).sum(axis=1) / valid.sum(axis=1, keepdims=True)
            for row, i in enumerate(group):
                out[i] = unit(np.array(pooled[row])).astype(np.float16)
        return out


def _chat_tokens(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
    return list(tokenizer.encode(prompt))


def generate_batch(model, tokenizer, prompts: list[str], max_tokens: int, sampler=None, batch_size: int = 32
                   ) -> list[str]:
    """Replies to many user prompts at once (mlx-lm's batch_generate: the weights are read once per decoding step for
    the whole batch, which is what makes evaluation and synthesis affordable on a CPU)."""

    if not prompts:
        return []
    model.eval()
    result = batch_generate(model, tokenizer, [_chat_tokens(tokenizer, p) for p in prompts], max_tokens=max_tokens,
                            sampler=sampler, completion_batch_size=batch_size, prefill_batch_size=batch_size)
    return [t.strip() for t in result.texts]


def _clean(text: str) -> str | None:
    """The first line of a paraphrase without a 'Rewritten message:' label or quotes; None when the model talked about
    the task instead of doing it."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    line = re.sub(r"^(rewritten message|paraphrase|message|rewrite)\s*:\s*", "", line, flags=re.IGNORECASE)
    line = line.strip().strip('"“”\'').strip()
    if re.search(r"\b(rewritten|original message|rewrite|paraphrase)\b", line, flags=re.IGNORECASE):
        return None
    return line


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def paraphrase_all(model, tokenizer, prompts: list[str], n: int, seed: int, min_rouge: float = 0.3,
                   temperature: float = 0.8, max_tokens: int = 48, rounds: int = 2) -> list[list[str]]:
    """Up to n distinct paraphrases of each prompt, written by the model: each round asks again for what is still
    missing; a paraphrase is kept when its ROUGE-1 against the prompt is >= min_rouge (the sanity filter: a rewrite
    that shares too few words has drifted off the message) and it is neither the prompt nor one already kept.
    Deterministic for a seed (sampling is seeded per round)."""

    sampler = make_sampler(temp=temperature, top_p=0.95)
    kept: list[list[str]] = [[] for _ in prompts]
    seen = [{_norm(p)} for p in prompts]
    for r in range(rounds):
        asks = [i for i, k in enumerate(kept) for _ in range(n - len(k))]
        if not asks:
            break
        mx.random.seed(seed * 1000 + r)
        texts = generate_batch(model, tokenizer, [PARAPHRASE_INSTRUCTION.format(prompt=prompts[i]) for i in asks],
                               max_tokens, sampler)
        for i, raw in zip(asks, texts):
            text = _clean(raw)
            if not text or len(kept[i]) >= n:
                continue
            key = _norm(text)
            if key and key not in seen[i] and rouge1(text, prompts[i]) >= min_rouge:
                seen[i].add(key)
                kept[i].append(text)
    return kept
