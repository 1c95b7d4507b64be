"""MeBP's backward rule: autodiff of one block (`mx.vjp` at its checkpointed input), as in Apple's MeBP."""

from __future__ import annotations

import threading

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .base import Method


class MeBP(Method):
    name = "mebp"
    # tracing swaps the traced parameters into the (shared) module: lanes (engine/lanes.py) trace one at a time;
    # the traced graph is evaluated outside the lock, in parallel
    _trace_lock = threading.Lock()

    def block_backward(self, block, h_in, g_out, mask, lane: int = 0):
        flat = tree_flatten(block.trainable_parameters())
        names = [k for k, _ in flat]

        def block_fn(h, *values):
            block.update(tree_unflatten(list(zip(names, values))))
            return block(h, mask)

        with self._trace_lock:
            _, vjps = mx.vjp(block_fn, [h_in, *[v for _, v in flat]], [g_out])
            block.update(tree_unflatten(flat))  # leave the module holding its own arrays, not the traced ones
        return vjps[0], tree_unflatten(list(zip(names, vjps[1:])))
