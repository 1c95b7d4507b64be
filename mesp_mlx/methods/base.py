"""What a method is to the engine: a block selector and a backward rule (MeZO, later, a forward-only estimator)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class Method:
    name = "base"

    def selected_blocks(self, step: int, blocks: list[int]) -> set[int] | None:
        """Which of the trainable `blocks` get a backward at this step; None means all of them."""
        return None

    def observe(self, step: int, block: int, grad_norm: float) -> None:
        """Told the gradient norm of every block it back-propagated (schedules that learn from it override this)."""

    def state_dict(self) -> dict:
        """What a resumed run needs to continue this method exactly (schedule positions, seeds); JSON-serialisable."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def prepare(self, block: nn.Module, h: mx.array, mask) -> None:
        """Called on the engine's thread before a block's rows are split over lanes (engine/lanes.py): whatever the
        method does once per block class (checks that switch the module's compute path) happens here, never in a lane."""

    def block_forward(self, block: nn.Module, h: mx.array, mask, keep: bool = False, lane: int = 0) -> mx.array:
        """The forward through one block (the module's own by default). keep: the engine will back-propagate this
        block in this step and the plan has room to keep what its backward needs (methods that can, do), under the
        key of this `lane` (the rows' slice, engine/lanes.py)."""
        return block(h, mask)

    def set_side_storage(self, kind: str, directory: str | None = None) -> None:
        """Told by the engine where its checkpoints live ('memory' or 'mmap', in `directory`): a method that keeps
        activations beside them between a block's forward and its backward keeps them there too."""

    def release_kept(self) -> None:
        """Drop whatever block_forward kept and no backward used (end of a step, or a step that stopped early)."""

    def block_backward(self, block: nn.Module, h_in: mx.array, g_out: mx.array, mask,
                       lane: int = 0) -> tuple[mx.array, dict]:
        """Return (dL/dh_in, gradient tree of the block's trainable parameters) given dL/dh_out."""
        raise NotImplementedError
