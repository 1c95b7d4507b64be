"""mlx-lm's optimizers under mlx-lm's names, one per block, and its learning-rate schedule (docs/design.md §9).

    optimizer     : adam (mlx-lm's default) | adamw | sgd | adafactor | muon, built as mlx_lm.lora builds them:
                    cls(learning_rate=lr, **optimizer_config[name])
    lr_schedule   : {name, arguments, warmup, warmup_init} -> mlx_lm.tuner.utils.build_schedule (mlx.optimizers'
                    schedulers, joined after a linear warmup)

Every block has its own optimizer (its state is that block's share of the single optimizer mlx-lm would hold). The
schedule is read by the engine, not by each optimizer: the k-th optimizer step (k = step // grad_accumulation_steps)
of every block uses lr = schedule(k - 1), exactly the value mlx-lm's single optimizer gives its k-th update
(`scheduler(self.step)` before the step counter moves), also for blocks LCSB did not update at every step.
"""

from __future__ import annotations

import inspect

import mlx.core as mx
import mlx.optimizers as optim
from mlx_lm.tuner.utils import build_schedule


class SGD(optim.SGD):
    """mlx's SGD, except that plain SGD (momentum 0) keeps no state: mlx allocates a momentum buffer the size of the
    parameters even when it never reads it (17.6 MB for r=8 LoRA on Qwen2.5-0.5B, 70 MB at r=32)."""

    def init_single(self, parameter, state):
        if self.momentum > 0:
            super().init_single(parameter, state)


OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": SGD, "adafactor": optim.Adafactor, "muon": optim.Muon}


def optimizer_arguments(name: str) -> list[str]:
    """The optimizer_config keys an optimizer takes (its constructor's, learning_rate aside)."""
    params = inspect.signature(OPTIMIZERS[name].__init__).parameters
    return [p for p in params if p not in ("self", "learning_rate")]


def make_optimizer(cfg):
    extra = dict((cfg.optimizer_config or {}).get(cfg.optimizer) or {})
    return OPTIMIZERS[cfg.optimizer](learning_rate=cfg.learning_rate, **extra)


def make_schedule(spec: dict | None):
    """mlx-lm's build_schedule of an lr_schedule mapping (None: a constant learning rate)."""
    if not spec:
        return None

    return build_schedule(spec)


class LearningRate:
    """The learning rate of each optimizer step: the constant, or the schedule at the step's index."""

    def __init__(self, learning_rate: float, schedule_spec: dict | None, accumulation: int = 1):
        self.constant, self.schedule, self.accumulation = learning_rate, make_schedule(schedule_spec), accumulation

    def at_update(self, k: int) -> mx.array | None:
        """lr of optimizer step k (1-based); None when constant (the optimizers keep theirs)."""
        if self.schedule is None:
            return None
        return self.schedule(mx.array(k - 1, mx.uint64))  # mlx-lm's schedule sees its step counter (uint64)

    def of_step(self, step: int) -> float:
        """lr of the optimizer step that micro-batch `step` (1-based) contributes to, for metrics and plots."""
        k = -(-step // self.accumulation)
        lr = self.at_update(k)
        return float(self.constant if lr is None else lr.item())
