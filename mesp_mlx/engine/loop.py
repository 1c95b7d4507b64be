"""The block-wise training step shared by every method (docs/design.md §1).

    forward : h_0 = embed(x); h_{i+1} = block_i(h_i); only the boundary activations h_i are kept (memory or mmap)
    loss    : final norm + chunked cross-entropy -> loss and g_L = dL/dh_L (no [T, vocab] logits)
    backward: blocks in reverse; the method says which blocks get a backward and how (autodiff, hand rule, skip);
              each block's LoRA is stepped by its own optimizer as soon as its gradient exists, then the block's
              tensors are dropped (and, when streaming, its frozen weights released)
    accumulate (grad_accumulation_steps N > 1, mlx-lm's semantics): each block's gradient is added into one
              LoRA-sized buffer per block; on every N-th micro-batch (step % N == 0) the block's optimizer steps with
              buffer / N and the buffer is freed. Steps count micro-batches. After each update the block's new
              parameters are checked: a NaN/inf parameter raises before anything is saved (the update is undone).

Memory is measured per phase and per block: MLX's peak is reset before each and read after, so the step peak is the
max over them and each block's own peak is known (the governor and the metrics use both).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..distributed import Ranks
from .checkpoints import make_checkpoints
from .lanes import Lanes
from .loss import chunked_cross_entropy

MB = 1024 * 1024


class NonFiniteError(FloatingPointError):
    """NaN or inf in the loss or in a block's gradient; raised before that block's update is applied."""

    def __init__(self, step: int, where: str):
        super().__init__(f"step {step}: NaN or inf in {where}")
        self.step, self.where = step, where


def _squared_norm(tree) -> mx.array:
    return sum((mx.sum(v.astype(mx.float32) ** 2) for _, v in tree_flatten(tree)), mx.array(0.0))


@dataclass
class Batch:
    inputs: mx.array  # [B, T] token ids fed to the model
    targets: mx.array  # [B, T] next tokens
    mask: mx.array  # [B, T] 1 where the target counts in the loss

    @staticmethod
    def from_mlx_lm(tokens: mx.array, lengths: mx.array) -> "Batch":
        """mlx-lm's (padded tokens [B, L], (offset, length) per row) -> inputs, targets and loss mask as in default_loss."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        return Batch(inputs, targets, mask)


@dataclass
class StepStats:
    loss: float
    ntoks: int
    step_s: float
    peak_mb: float
    active_mb: float
    phase_peak_mb: dict = field(default_factory=dict)
    phase_s: dict = field(default_factory=dict)  # seconds spent in forward / loss / backward / update
    block_peak_mb: dict = field(default_factory=dict)  # ("forward"|"backward", i) -> MB
    blocks_backpropagated: int = 0
    extra: dict = field(default_factory=dict)  # the objective's own figures (DPO: reward margin and accuracy)


class _PeakMeter:
    """MLX peak per phase: reset before, read after; the step's peak is the max of all phase peaks."""

    def __init__(self):
        self.step_peak = 0
        self.phases: dict = {}
        self.blocks: dict = {}
        self.seconds: dict = {}
        self._last = time.perf_counter()
        mx.reset_peak_memory()

    def mark(self, key, block: bool = False) -> None:
        peak = mx.get_peak_memory()
        self.step_peak = max(self.step_peak, peak)
        phase = key[0] if block else key
        self.phases[phase] = max(self.phases.get(phase, 0), peak)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now
        if block:
            self.blocks[key] = max(self.blocks.get(key, 0), peak)
        mx.reset_peak_memory()

    def absorb(self, stats: "StepStats") -> None:
        """Take in what an inner pass measured (a step by rows: each half's training pass) as if measured here."""
        self.step_peak = max(self.step_peak, int(stats.peak_mb * MB))
        for k, v in stats.phase_peak_mb.items():
            self.phases[k] = max(self.phases.get(k, 0), int(v * MB))
        for k, v in stats.block_peak_mb.items():
            self.blocks[k] = max(self.blocks.get(k, 0), int(v * MB))
        for k, v in stats.phase_s.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v
        self._last = time.perf_counter()


class BlockEngine:
    def __init__(
        self,
        parts,
        method,
        optimizers: list | None = None,
        checkpoint_storage: str = "memory",
        checkpoint_dir: str | None = None,
        streamer=None,
        vocab_chunk: int | None = None,
        clear_cache: str = "block",
        seed: int = 0,
        on_block_done: Callable | None = None,
        accumulation: int = 1,
        learning_rate=None,
        ranks=None,
        keep_activations: int = 0,
        lanes: int = 1,
        objective=None,
        max_grad_norm: float | None = None,
    ):
        self.parts = parts
        # None: SFT's masked mean cross-entropy; else a sequence objective (objectives/: DPO, ORPO, GRPO) whose loss
        # couples the rows of a batch of pairs through per-sequence scores
        self.objective = objective
        # clip by the global norm over every block's LoRA gradient: updates wait until the last block's gradient
        self.max_grad_norm = max_grad_norm
        self.method = method
        self.optimizers = optimizers
        self.checkpoints = make_checkpoints(checkpoint_storage, checkpoint_dir)
        method.set_side_storage(checkpoint_storage, checkpoint_dir)
        self.streamer = streamer
        self.vocab_chunk = vocab_chunk
        if clear_cache not in ("block", "step", "never"):
            raise ValueError(f"clear_cache must be block, step or never, not {clear_cache!r}")
        self.clear_cache = clear_cache
        self.seed = seed
        self.on_block_done = on_block_done  # governor hook: (phase, block index, peak bytes, active bytes)
        self.ranks = ranks if ranks is not None else Ranks()  # data parallelism (distributed.py); size 1: no-ops
        self.accumulation = accumulation
        # the plan's lever: the top `keep_activations` blocks keep their forward's context for their backward (no
        # recompute; same tensors, so the same results); -1 keeps every block's
        self.keep_activations = keep_activations
        # a block's rows split over this many CPU threads (engine/lanes.py): the same plan, run on more cores
        self.lanes = Lanes(lanes)
        self.learning_rate = learning_rate  # optimizers.LearningRate (a schedule) or None (the optimizers' own)
        self.accum: dict[int, dict] = {}  # block -> summed LoRA gradient of this accumulation window
        layers = parts.layers
        trainable = [i for i, l in enumerate(layers) if tree_flatten(l.trainable_parameters())]
        # blocks below the lowest trainable one need no backward at all: nothing there to learn
        self.lowest_trainable = min(trainable) if trainable else len(layers)

    # --- helpers ----------------------------------------------------------------------------------------------------
    def _block_key(self, step: int, i: int, lane: int = 0) -> None:
        # same random stream for a block's forward and its recomputation in backward (LoRA dropout stays exact);
        # each lane of rows its own
        mx.random.seed((self.seed * 1_000_003 + step * 1009 + i + lane * 7_919_993) % (2**31))

    def _seeder(self, step: int, i: int) -> Callable[[int], None]:
        return lambda lane: self._block_key(step, i, lane)

    def _after_loss(self, meter: _PeakMeter) -> None:
        if self.clear_cache != "never":
            mx.clear_cache()
        meter.mark("loss")
        if self.on_block_done is not None:
            self.on_block_done("loss", None, meter.phases["loss"], mx.get_active_memory())

    def _after_block(self, meter: _PeakMeter, phase: str, i: int) -> None:
        if self.clear_cache == "block":
            mx.clear_cache()
        meter.mark((phase, i), block=True)
        if self.on_block_done is not None:
            self.on_block_done(phase, i, meter.blocks[(phase, i)], mx.get_active_memory())

    def _stats(self, loss: float, ntoks: int, start: float, meter: "_PeakMeter", done: int) -> StepStats:
        return StepStats(
            loss=loss,
            ntoks=ntoks,
            step_s=time.perf_counter() - start,
            peak_mb=meter.step_peak / MB,
            active_mb=mx.get_active_memory() / MB,
            phase_peak_mb={k: v / MB for k, v in meter.phases.items()},
            phase_s=meter.seconds,
            block_peak_mb={k: v / MB for k, v in meter.blocks.items()},
            blocks_backpropagated=done,
        )

    def _update(self, i: int, block_grads, step: int, boundary: bool, step_skipped: bool, pending: dict) -> None:
        """Accumulate block i's gradient and, on an accumulation boundary, step its optimizer with the mean; under
        --max-grad-norm the gradient to apply is held in `pending` instead (_apply_clipped steps them all)."""
        grad = self._gradient_to_apply(i, block_grads, boundary, step_skipped)
        if grad is None:
            return
        if self.max_grad_norm is not None:
            pending[i] = grad
        else:
            self._apply(i, grad, step)

    def _gradient_to_apply(self, i: int, block_grads, boundary: bool, step_skipped: bool):
        """What block i's optimizer steps with now: the gradient, the accumulated mean on a boundary, zeros (LCSB
        momentum), or None (no update this step)."""
        layer = self.parts.layers[i]
        if self.accumulation > 1:
            if block_grads is not None:  # mlx-lm: grad = grad + prev_grad
                acc = self.accum.get(i)
                self.accum[i] = block_grads if acc is None else tree_map(lambda x, y: x + y, block_grads, acc)
                mx.eval(self.accum[i])
            if not boundary:
                return None
            acc = self.accum.pop(i, None)
            block_grads = None if acc is None else tree_map(lambda x: x / self.accumulation, acc)
        if block_grads is None:
            if not step_skipped:
                return None
            # LCSB momentum: the optimizer steps with a zero gradient (AdamW momentum, weight decay act)
            block_grads = tree_unflatten([(k, mx.zeros_like(v)) for k, v in tree_flatten(layer.trainable_parameters())])
        return block_grads

    def _apply_clipped(self, pending: dict, step: int) -> float:
        """--max-grad-norm: every block's gradient is held until the last one exists, then all are scaled by
        min(1, max_norm / ||g||) with ||g|| the global norm over all blocks (torch's clip_grad_norm_), then applied.
        Returns ||g|| before clipping."""
        norm = math.sqrt(sum(_squared_norm(g).item() for g in pending.values()))
        scale = min(1.0, self.max_grad_norm / (norm + 1e-6))
        for i in sorted(pending, reverse=True):
            grad = pending[i] if scale == 1.0 else tree_map(lambda x: x * scale, pending[i])
            self._apply(i, grad, step)
        return norm

    def _apply(self, i: int, block_grads, step: int) -> None:
        """Step block i's optimizer with `block_grads` (the schedule's learning rate); undo a non-finite result."""
        layer, opt = self.parts.layers[i], self.optimizers[i]
        lr = self.learning_rate.at_update(step // self.accumulation) if self.learning_rate is not None else None
        if lr is not None:
            opt.learning_rate = lr
        # the update mutates the optimizer's state dicts in place: keep copies of the trees (arrays are immutable)
        before, state_before = layer.trainable_parameters(), tree_map(lambda x: x, opt.state)
        opt.update(layer, block_grads)
        finite = mx.array(True)
        for _, v in tree_flatten(layer.trainable_parameters()):
            finite = mx.logical_and(finite, mx.isfinite(v).all())
        mx.eval(layer.trainable_parameters(), opt.state, finite)
        if not finite.item():  # undo, so what is saved next is never a NaN adapter
            layer.update(before)
            opt.state = state_before
            raise NonFiniteError(step, f"the LoRA parameters of block {i} after its update")

    # --- the step ---------------------------------------------------------------------------------------------------
    def _by_rows(self, batch: Batch) -> bool:
        """An objective's batch trains half its rows at a time (a preference batch: SFT's memory for B pairs; GRPO:
        half the completions) when nothing draws random numbers: a LoRA dropout would draw other masks for half the
        rows than for all of them."""
        if self.objective is None or batch.inputs.shape[0] < 2:
            return False
        return not any(getattr(getattr(m, "dropout", None), "_p_1", 1.0) < 1.0
                       for layer in self.parts.layers for _, m in layer.named_modules() if hasattr(m, "lora_a"))

    def _step_by_rows(self, batch: Batch, step: int, apply_update: bool):
        """An objective's step at half the rows' memory: the loss couples rows only through functions of their token
        log-probabilities, so
            1. the reference and the policy's scores come from streamed forwards without checkpoints,
            2. the objective gives dL/dnormed for every row (one weight per token),
            3. the first half of the rows (a preference batch: the chosen ones), then the second, run the training
               forward and backward from their part of it,
               their block gradients summed (the gradient is additive over rows once the weights are fixed),
            4. each block's optimizer steps once with the sum.
        One more forward than the whole batch at once; the same gradient."""
        start = time.perf_counter()
        meter = _PeakMeter()
        reference = self.objective.reference_scores(self, batch, step) if self.objective.needs_reference else None
        meter.mark("reference")
        normed = self.forward_hidden(batch, step, meter)
        loss, g_normed, ntoks, extra = self.objective.loss_and_grad(self.parts, normed, batch, reference,
                                                                    self.vocab_chunk)
        del normed
        loss, ntoks, share, extra = self._global_objective(loss, ntoks, extra, batch.inputs.shape[0])
        if share != 1.0:  # this rank's part of the global loss's gradient (distributed.py)
            g_normed = g_normed * share
        if not math.isfinite(loss):
            raise NonFiniteError(step, "the loss")
        self._after_loss(meter)
        half = batch.inputs.shape[0] // 2
        total, done = {}, 0
        for rows in (slice(0, half), slice(half, None)):
            part = Batch(batch.inputs[rows], batch.targets[rows], batch.mask[rows])
            stats, grads = self.step(part, step, apply_update=False, top=(loss, ntoks, extra, g_normed[rows]))
            meter.absorb(stats)
            done = max(done, stats.blocks_backpropagated)
            for i, g in grads.items():
                total[i] = g if i not in total else tree_map(lambda x, y: x + y, total[i], g)
            mx.eval(list(total.values()))
            del grads
        del g_normed
        if apply_update:
            step_skipped = getattr(self.method, "skipped", "freeze") == "momentum"
            boundary = step % self.accumulation == 0
            pending = {}
            for i in range(len(self.parts.layers) - 1, self.lowest_trainable - 1, -1):
                self._update(i, total.pop(i, None), step, boundary, step_skipped, pending)
            if pending:
                extra = {**extra, "grad_norm": self._apply_clipped(pending, step)}
            total = {}
        meter.mark("update")
        stats = self._stats(loss, ntoks, start, meter, done)
        stats.extra = extra
        return stats, total

    def forward_hidden(self, batch: Batch, step: int, meter: "_PeakMeter | None" = None,
                       before_block: Callable | None = None, after_block: Callable | None = None) -> mx.array:
        """The streamed forward to the final norm's output (no checkpoints, no gradient): inference's memory. The
        hooks run around each block (MeZO swaps its perturbed LoRA in and the original arrays back)."""
        meter = meter if meter is not None else _PeakMeter()
        h = self.parts.embed(batch.inputs)
        mx.eval(h)
        for i, layer in enumerate(self.parts.layers):
            if before_block is not None:
                before_block(i, layer)
            h = self.lanes.forward(self.method, layer, h, self.parts.block_mask(layer, h), seed=self._seeder(step, i))
            mx.eval(h)
            if after_block is not None:
                after_block(i, layer)
            if self.streamer is not None:
                self.streamer.release(i)
            self._after_block(meter, "forward", i)
        normed = self.parts.final_norm(h)
        mx.eval(normed)
        return normed

    def forward_loss(self, batch: Batch, step: int, meter: "_PeakMeter", before_block: Callable | None = None,
                     after_block: Callable | None = None) -> tuple[float, int]:
        """The streamed forward and the loss value only (no checkpoints, no gradient): inference's memory."""
        normed = self.forward_hidden(batch, step, meter, before_block, after_block)
        if self.objective is not None:  # the objective's own loss (held-out evaluation)
            reference = self.objective.reference_scores(self, batch, step) if self.objective.needs_reference else None
            value, _, ntoks, _ = self.objective.loss_and_grad(self.parts, normed, batch, reference, self.vocab_chunk,
                                                              need_grad=False)
            self._after_loss(meter)
            return value, ntoks
        loss, _, ntoks = chunked_cross_entropy(self.parts, normed, batch.targets, batch.mask, self.vocab_chunk,
                                               need_grad=False, precise=True)
        value, ntoks, _ = self._global_loss(loss, ntoks)
        if not math.isfinite(value):
            raise NonFiniteError(step, "the loss")
        del normed
        self._after_loss(meter)
        return value, ntoks

    def _global_loss(self, loss: float, ntoks: int, weight: float | None = None) -> tuple[float, int, float]:
        """(the global loss, every rank's tokens, this rank's share of the gradient). SFT's loss is a mean over
        tokens: the weight is the rank's token count T_r and the share T_r / T; an objective's is a mean over its own
        units (pairs, completions, tokens: objectives/base.py weight), with the same rule."""
        if self.ranks.size == 1:
            return loss, ntoks, 1.0
        if weight is None:
            weighted, total = self.ranks.sum_scalars([loss * ntoks, float(ntoks)])
            return weighted / max(total, 1.0), int(round(total)), ntoks / max(total, 1.0)
        weighted, total, tokens = self.ranks.sum_scalars([loss * weight, float(weight), float(ntoks)])
        return weighted / max(total, 1.0), int(round(tokens)), weight / max(total, 1.0)

    def _global_objective(self, loss: float, ntoks: int, extra: dict, n_rows: int):
        """An objective's (global loss, tokens, this rank's share, figures averaged over the ranks by weight)."""
        weight = self.objective.weight(n_rows, ntoks)
        value, ntoks, share = self._global_loss(loss, ntoks, weight)
        if self.ranks.size > 1 and extra:
            keys = sorted(extra)
            sums = self.ranks.sum_scalars([extra[k] * share for k in keys])
            extra = dict(zip(keys, sums))
        return value, ntoks, share, extra

    def loss_of(self, batch: Batch) -> tuple[float, int]:
        """(mean loss, counted tokens) of `batch` on the streamed forward, no gradient: inference's memory (held-out
        evaluation). The governor's per-block hook sees it like any other forward."""
        return self.forward_loss(batch, 0, _PeakMeter())

    def step(self, batch: Batch, step: int = 0, apply_update: bool = True, top: tuple | None = None):
        """One training step. Returns (StepStats, grads) where grads is {block index: tree} when not applying updates.
        `top` = (loss, ntoks, extra, dL/dnormed): the loss and its gradient at the top were computed already (a
        preference batch by rows: _step_by_rows), so this pass only runs the forward with checkpoints and backward."""
        start = time.perf_counter()
        meter = _PeakMeter()
        if getattr(self.method, "zeroth_order", False):
            loss, ntoks, grads = self.method.zo_step(self, batch, step, meter, apply_update)
            return self._stats(loss, ntoks, start, meter, 0), grads
        if top is None and self._by_rows(batch):
            return self._step_by_rows(batch, step, apply_update)
        layers = self.parts.layers
        n = len(layers)

        # which blocks get a backward this step (decided first: only those may keep their forward's context)
        trainable = list(range(self.lowest_trainable, n))
        selected = self.method.selected_blocks(step, trainable)
        keep_from = 0 if self.keep_activations < 0 else n - self.keep_activations
        keep = {i for i in (trainable if selected is None else selected) if i >= keep_from}

        # DPO's reference policy (the base model: adapters off), on the streamed forward before the training one
        reference = None
        if top is None and self.objective is not None and self.objective.needs_reference:
            reference = self.objective.reference_scores(self, batch, step)
            meter.mark("reference")

        # forward, keeping block-boundary activations (and the kept blocks' contexts) only
        self.method.release_kept()
        h = self.parts.embed(batch.inputs)
        mx.eval(h)
        self.checkpoints.reserve(n + 1, h.shape)
        self.checkpoints.put(0, h)
        masks = []
        for i, layer in enumerate(layers):
            masks.append(self.parts.block_mask(layer, h))
            h = self.lanes.forward(self.method, layer, h, masks[i], keep=i in keep, seed=self._seeder(step, i))
            mx.eval(h)
            self.checkpoints.put(i + 1, h)
            if self.streamer is not None:
                self.streamer.release(i)
            self._after_block(meter, "forward", i)

        # loss and its gradient at the last boundary
        h_last = self.checkpoints.get(n)
        normed = self.parts.final_norm(h_last)
        extra = {}
        if top is not None:  # global already, and its gradient this rank's share of the global one
            loss_value, ntoks, extra, g_normed = top
            share = 1.0
        elif self.objective is None:
            loss, g_normed, ntoks = chunked_cross_entropy(self.parts, normed, batch.targets, batch.mask,
                                                          self.vocab_chunk, precise=True)
            loss_value, ntoks, share = self._global_loss(loss, ntoks)
        else:
            loss, g_normed, ntoks, extra = self.objective.loss_and_grad(self.parts, normed, batch, reference,
                                                                        self.vocab_chunk)
            loss_value, ntoks, share, extra = self._global_objective(loss, ntoks, extra, batch.inputs.shape[0])
        _, (g,) = mx.vjp(self.parts.final_norm, [h_last], [g_normed])
        mx.eval(g)
        if share != 1.0:  # this rank's part of the global mean's gradient (distributed.py)
            g = g * share
        if not math.isfinite(loss_value):
            raise NonFiniteError(step, "the loss")
        del normed, g_normed, h_last, h
        self.checkpoints.drop(n)
        self._after_loss(meter)

        # reverse pass
        step_skipped = apply_update and getattr(self.method, "skipped", "freeze") == "momentum"
        boundary = step % self.accumulation == 0
        reach_all = selected is None or step_skipped or (apply_update and boundary and self.accum)
        lowest = self.lowest_trainable if reach_all else min(selected, default=n)
        grads, pending = {}, {}
        done = 0
        for i in range(n - 1, lowest - 1, -1):
            block_grads = None
            if selected is not None and i not in selected:
                # identity path: dL/dh_i = dL/dh_{i+1} through the residual (LCSB); no recompute, no weights
                self.checkpoints.drop(i)
            else:
                h_in = self.checkpoints.get(i)
                g, block_grads = self.lanes.backward(self.method, layers[i], h_in, g, masks[i],
                                                     seed=self._seeder(step, i))
                block_grads = self.ranks.sum_tree(block_grads)  # the global batch's gradient: Σ over ranks
                norm2 = _squared_norm(block_grads)  # NaN / inf anywhere make it non-finite: one reduction for both
                mx.eval(g, block_grads, norm2)
                if not math.isfinite(norm2.item()):  # nothing of this block (or any below) is updated
                    raise NonFiniteError(step, f"the LoRA gradient of block {i}")
                self.method.observe(step, i, math.sqrt(norm2.item()))
                del h_in
                self.checkpoints.drop(i)
                done += 1
            if apply_update:
                self._update(i, block_grads, step, boundary, step_skipped, pending)
            elif block_grads is not None:
                grads[i] = block_grads
            if block_grads is not None:
                del block_grads
                if self.streamer is not None:
                    self.streamer.release(i)
                self._after_block(meter, "backward", i)
        if pending:
            extra = {**extra, "grad_norm": self._apply_clipped(pending, step)}
        self.checkpoints.clear()
        self.method.release_kept()
        if self.clear_cache == "step":
            mx.clear_cache()
        meter.mark("update")

        stats = self._stats(loss_value, ntoks, start, meter, done)
        stats.extra = extra
        return stats, grads
