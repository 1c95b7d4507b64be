"""MeZO: zeroth-order SPSA on the trainable tensors, two streamed forward passes per step (docs/design.md §4).

Per step, for each of n draws k (n-SPSA, `--zo-samples`):
    z_k ~ N(0, I) for every trainable tensor, regenerated from a key of (seed, step, k, block) and never stored
    L+ = L(θ + ε z_k),  L- = L(θ - ε z_k),  p_k = (L+ - L-) / (2ε)
then θ <- θ - lr (1/n Σ_k p_k z_k + wd θ), z_k regenerated once more, block by block.
The perturbation never writes θ: before a block runs, its LoRA arrays are swapped for θ + s ε z (made for that block
only), and after it the very same original arrays are put back, so "restore" is exact by construction and the memory
is inference's plus one block's perturbed LoRA. The forward is MeSP's lean staged forward; LoRA dropout, if any, draws
the same masks in both passes (the engine's per-block keys), as SPSA needs. The reported loss is (L+ + L-)/2 of the
first draw, which equals L(θ) up to O(ε²).
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .base import Method
from .mesp import MeSP


class MeZO(Method):
    name = "mezo"
    zeroth_order = True

    def __init__(self, learning_rate: float, eps: float = 1e-3, samples: int = 1, weight_decay: float = 0.0,
                 seed: int = 0):
        if eps <= 0 or samples < 1:
            raise ValueError("--zo-eps must be > 0 and --zo-samples >= 1")
        self.lr, self.eps, self.samples, self.weight_decay, self.seed = learning_rate, eps, samples, weight_decay, seed
        self.inner = MeSP()
        self.learning_rate = None  # optimizers.LearningRate when an lr_schedule is given (the trainer sets it)

    def noise(self, step: int, sample: int, block: int, shapes: list[tuple]) -> list[mx.array]:
        """z for the trainable tensors of one block (in tree_flatten order), from a key of (seed, step, sample, block)."""
        key = mx.random.key((self.seed * 1_000_003 + step * 7919 + sample * 104_729 + block * 31) % (2**31))
        keys = mx.random.split(key, max(2, len(shapes)))
        return [mx.random.normal(shape, key=keys[j]) for j, shape in enumerate(shapes)]

    def prepare(self, block, h, mask) -> None:
        self.inner.prepare(block, h, mask)

    def block_forward(self, block, h, mask, keep: bool = False, lane: int = 0):
        return self.inner.block_forward(block, h, mask)  # forward only: nothing to keep

    def zo_step(self, engine, batch, step: int, meter, apply_update: bool):
        layers = engine.parts.layers
        flats = [tree_flatten(layer.trainable_parameters()) for layer in layers]
        projected, first_loss, ntoks = [], None, 0
        for k in range(self.samples):
            losses = []
            for sign in (1.0, -1.0):
                def before(i, layer, sign=sign, k=k):
                    if flats[i]:
                        z = self.noise(step, k, i, [v.shape for _, v in flats[i]])
                        layer.update(tree_unflatten([(name, v + (sign * self.eps) * zj.astype(v.dtype))
                                                     for (name, v), zj in zip(flats[i], z)]))

                def after(i, layer):
                    if flats[i]:
                        layer.update(tree_unflatten(flats[i]))  # the original arrays themselves: exact

                loss, ntoks = engine.forward_loss(batch, step, meter, before, after)
                losses.append(loss)
            projected.append((losses[0] - losses[1]) / (2 * self.eps))
            if first_loss is None:
                first_loss = (losses[0] + losses[1]) / 2
        grads = {}
        lr = self.lr if self.learning_rate is None else self.learning_rate.of_step(step)
        for i, layer in enumerate(layers):  # g = 1/n Σ_k p_k z_k, regenerated block by block
            if not flats[i]:
                continue
            shapes = [v.shape for _, v in flats[i]]
            g = [mx.zeros(s) for s in shapes]
            for k, p in enumerate(projected):
                g = [gj + (p / self.samples) * zj for gj, zj in zip(g, self.noise(step, k, i, shapes))]
            if apply_update:
                layer.update(tree_unflatten([(name, v - lr * (gj.astype(v.dtype) + self.weight_decay * v))
                                             for (name, v), gj in zip(flats[i], g)]))
                mx.eval(layer.trainable_parameters())
            else:
                grads[i] = tree_unflatten([(name, gj) for (name, _), gj in zip(flats[i], g)])
                mx.eval(grads[i])
        meter.mark("update")
        return first_loss, ntoks, grads
