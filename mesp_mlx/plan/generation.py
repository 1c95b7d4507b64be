"""GRPO's generation phase in the plan: sampling needs every block's weights at once (read in when streamed), a KV
cache for each row decoded, and the logits of one decoding step. Its MLX memory above what is resident is linear in
the rows decoded together, r:

    generation(r) = fixed + r x per_row
    per_row       = 2 x KV bytes per token x the tokens a row's cache holds (mlx-lm's caches grow in blocks of 256;
                    twice, because when a sampled row stops early mlx-lm's BatchGenerator filters the batch's caches:
                    the kept rows are copied while the old caches still live)
                  + 2 steps x 5 x vocab x 4 bytes (a step's logits, log-probabilities, the sampler's copies and sort;
                    two steps because the generator starts step t + 1 before it reads step t)
    fixed         = one decoding step of one row, probed, less that row's own part
Measured on SmolLM2-135M (CPU path, prompts of 27 tokens + 12 sampled, temperature 0.8, top-p 0.95, top-k 20):
1 / 4 / 14 / 32 rows 140 / 177 / 454 / 896 MB; this model 153 / 226 / 470 / 909 MB.

The KV bytes per token are read off the probe's caches, so any family's attention shape (grouped heads, a hybrid's
fixed-size recurrent state) is counted as it is. The rows decoded together are a lever: all of them when the budget
leaves room, fewer (more decoding steps, as many weight reads) when it does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

MB = 1024 * 1024
CACHE_STEP = 256  # mlx-lm's KVCache.step


@dataclass
class GenerationCost:
    fixed_mb: float
    per_row_mb: float

    def mb(self, rows: int) -> float:
        return self.fixed_mb + rows * self.per_row_mb

    def rows_within(self, room_mb: float | None, rows: int) -> int:
        """The most rows (at most `rows`, at least 1) whose generation fits in `room_mb` (None: all)."""
        if room_mb is None:
            return rows
        return max(1, min(rows, int((room_mb - self.fixed_mb) // max(self.per_row_mb, 1e-9))))


def _kv_arrays(cache):
    for c in cache:
        for name in ("keys", "values"):
            a = getattr(c, name, None)
            if isinstance(a, mx.array) and a.ndim == 4:
                yield a


def generation_cost(model, tokens: int, vocab_size: int, streamer=None) -> GenerationCost:
    """The generation's memory model for sequences of `tokens` (prompt + completion), from one probed step."""
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    cache = make_prompt_cache(model)
    logits = model(mx.zeros((1, 1), dtype=mx.int32), cache=cache)
    mx.eval(logits)
    probe = (mx.get_peak_memory() - base) / MB
    per_token = sum(a.nbytes / a.shape[2] for a in _kv_arrays(cache)) / MB
    del cache, logits
    if streamer is not None:
        streamer.release_all()
    mx.clear_cache()
    logits_mb = vocab_size * 4 / MB
    per_row = 2 * per_token * math.ceil(tokens / CACHE_STEP) * CACHE_STEP + 2 * 5 * logits_mb
    return GenerationCost(max(0.0, probe - per_token * CACHE_STEP - logits_mb), per_row)
