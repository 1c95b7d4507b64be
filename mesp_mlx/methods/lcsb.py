"""LCSB: a backward through only a subset of blocks per step (docs/design.md §5), MeSP's rule inside the selected ones.

The forward is the full model's, so the loss is exact. In the reverse pass a skipped block passes the gradient along
its residual identity path, dL/dh_i = dL/dh_{i+1}: no recomputation, no weight loading, no update. The selected
blocks' gradients are therefore not the exact full gradient (the skipped blocks' Jacobians are replaced by I): LCSB is
block-coordinate descent on the LoRA parameters.

Schedules over the trainable blocks, split into K = round(1 / fraction) contiguous groups:
    cyclic     : group (step mod K) at step `step` — every block within K steps
    random     : ceil(fraction * N) blocks drawn from a key of (seed, step)
    importance : ceil(fraction * N) blocks: first any block not updated for 2K steps (so none starves), then the
                 largest running mean of their gradient norm (a block never measured counts as the largest). The
                 bound is 2K, not K: with K the starving blocks alone fill every step and the schedule is cyclic
Skipped blocks' optimizer state: `freeze` (default: not stepped, AdamW's moments wait) or `momentum` (stepped with a
zero gradient, so AdamW's momentum and weight decay keep moving them, as the paper discusses). Both are sensible;
freeze is the cheaper and the one that makes "only the selected blocks change" true.
"""

from __future__ import annotations

import math

import numpy as np

from .base import Method
from .mesp import MeSP


class LCSB(Method):
    name = "lcsb"

    def __init__(self, fraction: float = 0.25, schedule: str = "cyclic", skipped: str = "freeze", seed: int = 0,
                 inner: Method | None = None):
        if not 0 < fraction <= 1:
            raise ValueError(f"--lcsb-fraction must be in (0, 1], not {fraction}")
        if schedule not in ("cyclic", "random", "importance"):
            raise ValueError(f"--lcsb-schedule must be cyclic, random or importance, not {schedule!r}")
        if skipped not in ("freeze", "momentum"):
            raise ValueError(f"--lcsb-skipped must be freeze or momentum, not {skipped!r}")
        self.fraction, self.schedule, self.skipped, self.seed = fraction, schedule, skipped, seed
        self.inner = inner or MeSP()
        self.importance: dict[int, float] = {}
        self.last_update: dict[int, int] = {}

    # --- which blocks -----------------------------------------------------------------------------------------------
    def groups(self, blocks: list[int]) -> list[list[int]]:
        k = max(1, min(len(blocks), round(1 / self.fraction)))
        bounds = np.linspace(0, len(blocks), k + 1).round().astype(int)
        return [blocks[bounds[g]:bounds[g + 1]] for g in range(k)]

    def selected_blocks(self, step: int, blocks: list[int]) -> set[int] | None:
        if not blocks:
            return set()
        if self.schedule == "cyclic":
            groups = self.groups(blocks)
            return set(groups[step % len(groups)])
        m = max(1, math.ceil(self.fraction * len(blocks)))
        if self.schedule == "random":
            rng = np.random.default_rng([self.seed, step])
            return {int(b) for b in rng.choice(blocks, size=m, replace=False)}
        bound = 2 * len(self.groups(blocks))
        starving = [b for b in blocks if step - self.last_update.get(b, -10**9) >= bound]
        ranked = sorted(blocks, key=lambda b: -self.importance.get(b, float("inf")))
        chosen = (starving + [b for b in ranked if b not in starving])[:m]
        return set(chosen)

    # --- the rule inside a selected block ---------------------------------------------------------------------------
    def prepare(self, block, h, mask) -> None:
        self.inner.prepare(block, h, mask)

    def block_forward(self, block, h, mask, keep: bool = False, lane: int = 0):
        return self.inner.block_forward(block, h, mask, keep, lane)

    def set_side_storage(self, kind: str, directory: str | None = None) -> None:
        self.inner.set_side_storage(kind, directory)

    def release_kept(self) -> None:
        self.inner.release_kept()

    def block_backward(self, block, h_in, g_out, mask, lane: int = 0):
        return self.inner.block_backward(block, h_in, g_out, mask, lane)

    def observe(self, step: int, block: int, grad_norm: float) -> None:
        """The engine reports each computed block's gradient norm (used by the importance schedule)."""
        old = self.importance.get(block)
        self.importance[block] = grad_norm if old is None else 0.9 * old + 0.1 * grad_norm
        self.last_update[block] = step

    def state_dict(self) -> dict:
        return {"importance": {str(k): v for k, v in self.importance.items()},
                "last_update": {str(k): v for k, v in self.last_update.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.importance = {int(k): float(v) for k, v in state.get("importance", {}).items()}
        self.last_update = {int(k): int(v) for k, v in state.get("last_update", {}).items()}
