"""The fastest plan that fits: which speed levers a run turns on, given the memory the budget leaves.

The planner (planner.py) predicts the leanest plan's peak. The memory between that peak and the budget is spent on
levers, each per block and each measured on this model at this run's shapes (one block probed, in place):

    keep activations  MeSP: a block keeps its forward's context (norm outputs, q/k/v, gate/up, ...) for its backward,
                      which then skips the recompute; costs the context's MB while the step runs
    keep attention    with it, the attention probabilities [B, H, T, T] too: the backward skips recomputing them
    keep dequantized  CPU path: a block keeps an fp32 copy of its 4-bit weights for the whole run: no dequantizing
                      in the forward, the recompute or the input gradients

Predicted step seconds = Σ_blocks (forward + backward of that block under its levers) + the loss, every term timed
on the probe block (blocks of one model share shapes). Levers are given from the top block down (the blocks whose
backward comes first); the search tries every count of each lever and keeps the fastest combination whose extra MB
fits — exhaustive, since it is only arithmetic once the probes are done. A lever never changes results: the kept
tensors are the ones a recompute would produce, bit for bit (tests/test_speed_plan.py).

Without a budget the plan is made for a quarter of the machine's RAM (DEFAULT_SHARE), the room a laptop user can
give one training process; a lever set explicitly (a flag or YAML key) is used as given.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..engine.lanes import Lanes, lane_count
from ..engine.loss import chunked_cross_entropy
from ..io import atomic_write
from ..methods.mesp import MeSP
from ..models.compute import DequantLinear, keep_dequantized

MB = 1024 * 1024
DEFAULT_SHARE = 0.25  # of physical RAM, when no budget is given
HEADROOM = 0.92  # plan to this share of the budget: the planner's memory predictions are within a few %


def default_budget_mb() -> float:
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 * 1024 * MB
    return DEFAULT_SHARE * ram / MB


LEVERS = ("keep_activations", "keep_attention", "keep_dequantized")


def given_levers(values: dict, blocks: int) -> dict:
    """The levers a user set ({name: value}, None = the planner's), with a count of -1 resolved to every block."""
    return {k: (blocks if v == -1 and k != "keep_attention" else v) for k, v in values.items() if v is not None}


@dataclass
class Levers:
    keep_activations: int = 0  # blocks from the top (-1 never appears here: it is resolved to the count)
    keep_attention: bool = False
    keep_dequantized: int = 0

    def flags(self) -> str:
        return (f"--keep-activations {self.keep_activations} --{'' if self.keep_attention else 'no-'}keep-attention "
                f"--keep-dequantized {self.keep_dequantized}")


@dataclass
class LeverCosts:
    """What one block costs under each lever, measured (seconds per step and MB while held)."""
    blocks: int
    backward_blocks: float  # blocks back-propagated per step (all; LCSB: its fraction)
    forward_s: dict  # dense (bool) -> seconds of one block's forward
    backward_s: dict  # (context kept, probabilities kept, dense) -> seconds of one block's backward
    loss_s: float
    context_mb: float
    probs_mb: float
    dense_mb: float
    activations_apply: bool  # the method has a rule that can keep its context (MeSP's hand rule)
    dense_applies: bool  # the dequant compute path
    # working sets (MB above what is resident) of the leanest plan — the planner's probes — and of a block that keeps
    # its context: its forward (the context included) and its backward from it (attention kept or not)
    ws: dict = dataclasses.field(default_factory=dict)

    def step_s(self, lv: Levers) -> float:
        """Predicted seconds of one step under levers `lv`."""
        total = self.loss_s
        share = self.backward_blocks / max(self.blocks, 1)
        for j in range(self.blocks):  # j = 0 is the top block
            ctx, dense = j < lv.keep_activations, j < lv.keep_dequantized
            total += self.forward_s[dense] + share * self.backward_s[(ctx, ctx and lv.keep_attention, dense)]
        return total

    def extra_mb(self, lv: Levers) -> float:
        """MB the levers add to the leanest plan's peak. Kept fp32 weights are resident. k kept contexts of c MB each
        (the top blocks') change the largest working set of the step from max(forward, loss, backward) to the max of
            forward of the top block: (k - 1) c + its forward keeping its context
            loss:                     k c + the loss
            backward of the top block: (k - 1) c + its backward from the kept context
            backward of a lean block:  the leanest plan's backward (every context is freed by then)"""
        held = min(lv.keep_activations, int(np.ceil(self.backward_blocks)))
        dense = lv.keep_dequantized * self.dense_mb
        c = self.context_mb + (self.probs_mb if lv.keep_attention else 0.0)
        ws = self.ws
        if not held:
            return dense
        if not ws:  # no working sets measured: every kept context on top of the leanest peak
            return dense + held * c
        if ("forward kept", lv.keep_attention) not in ws:  # the rule keeps no context (MeSP's generic fallback)
            return dense
        lean = max(ws["forward"], ws["loss"], ws["backward"])
        kept = max(ws["forward"], (held - 1) * c + ws[("forward kept", lv.keep_attention)], ws["loss"] + held * c,
                   (held - 1) * c + ws[("backward kept", lv.keep_attention)],
                   ws["backward"] if held < self.backward_blocks else 0.0)
        return dense + kept - lean

    def lines(self, lv: Levers) -> list[str]:
        """Each lever: its MB and seconds per block, the count chosen, and what that adds and saves in all."""
        lean = Levers()
        out = [f"  {'lever':<18}{'MB/block':>9}{'s saved/block':>15}{'chosen':>9}{'MB':>9}{'s saved':>9}"]
        rows = []
        if self.activations_apply:
            ctx = dataclasses.replace(lean, keep_activations=lv.keep_activations)
            att = dataclasses.replace(ctx, keep_attention=lv.keep_attention)
            one_ctx = self.backward_s[(False, False, False)] - self.backward_s[(True, False, False)]
            one_att = self.backward_s[(True, False, False)] - self.backward_s[(True, True, False)]
            rows.append(("keep activations", self.context_mb, one_ctx, lv.keep_activations,
                         self.extra_mb(ctx), self.step_s(lean) - self.step_s(ctx)))
            rows.append(("keep attention", self.probs_mb, one_att, "yes" if lv.keep_attention else "no",
                         self.extra_mb(att) - self.extra_mb(ctx), self.step_s(ctx) - self.step_s(att)))
        if self.dense_applies:
            dn = dataclasses.replace(lean, keep_dequantized=lv.keep_dequantized)
            one = (self.forward_s[False] - self.forward_s[True] + self.backward_s[(False, False, False)]
                   - self.backward_s[(False, False, True)])
            rows.append(("keep dequantized", self.dense_mb, one, lv.keep_dequantized, self.extra_mb(dn),
                         self.step_s(lean) - self.step_s(dn)))
        for name, mb, s, chosen, total_mb, total_s in rows:
            out.append(f"  {name:<18}{mb:9.1f}{s:15.3f}{chosen!s:>9}{total_mb:9.1f}{total_s:9.2f}")
        out.append(f"  predicted step: {self.step_s(lv):.2f} s (leanest plan {self.step_s(lean):.2f} s)")
        return out


def _timed(fn, repeats: int = 2) -> float:
    """Seconds of fn() evaluated, best of `repeats` after one warm-up run; MLX's cache is emptied before each, as the
    engine empties it after every block (fresh buffers cost page faults: part of a block's time in a real step)."""
    mx.eval(fn())
    best = float("inf")
    for _ in range(repeats):
        mx.clear_cache()
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best


def measure(cfg, prep, method, lean_components: dict | None = None) -> LeverCosts:
    """Probe the last block and the loss of a prepared model at cfg's shapes (batch, seq). lean_components: the
    planner's components of the leanest plan (its working sets), for the levers' memory model."""

    parts, layers = prep.parts, prep.parts.layers
    n = len(layers)
    block = layers[-1]
    method.set_side_storage(cfg.checkpoint_storage, getattr(cfg, "checkpoint_dir", None))  # as the engine does
    B, T = cfg.batch_size, cfg.max_seq_length - 1
    d = parts.inner.norm.weight.shape[0]
    rng = np.random.default_rng(cfg.seed)
    x = mx.array(rng.standard_normal((B, T, d)).astype(np.float32)).astype(parts.dtype)
    g = mx.array(1e-3 * rng.standard_normal((B, T, d)).astype(np.float32)).astype(parts.dtype)
    mask = parts.block_mask(block, x)
    zeroth_order = getattr(method, "zeroth_order", False)
    inner = getattr(method, "inner", method)
    rule = inner if isinstance(inner, MeSP) and not zeroth_order else None
    activations = rule is not None and rule._use_hand_rule(block, x, mask)
    dense_applies = prep.compute_path == "dequant" and any(isinstance(m, DequantLinear) for _, m in block.named_modules())

    lanes = Lanes(lane_count(getattr(cfg, "lanes", None)))  # timed on the run's threads

    def forward(keep=False):
        return lanes.forward(method, block, x, mask, keep=keep)

    ws = {}

    def backward_after(keep: bool, probs: bool) -> tuple[float, float]:
        """Seconds of the backward, with (keep) the context its forward kept; and that context's MB (the bytes of
        the arrays it holds, counted directly). Also records the kept variant's forward and backward working sets."""
        if not keep:
            return _timed(lambda: lanes.backward(method, block, x, g, mask)), 0.0
        rule.keep_attention = probs
        best, held = float("inf"), 0.0
        for _ in range(3):
            mx.clear_cache()
            start_mb = mx.get_active_memory() / MB
            mx.reset_peak_memory()
            mx.eval(forward(keep=True))
            ws[("forward kept", probs)] = mx.get_peak_memory() / MB - start_mb
            held = sum(ctx.nbytes() for key, ctx in rule._kept.items() if key[0] == id(block)) / MB
            mx.clear_cache()
            mx.reset_peak_memory()
            start = time.perf_counter()
            mx.eval(lanes.backward(method, block, x, g, mask))
            best = min(best, time.perf_counter() - start)
            ws[("backward kept", probs)] = mx.get_peak_memory() / MB - start_mb
        rule.keep_attention = False
        return best, held

    saved_attention = rule.keep_attention if rule is not None else False
    forward_s, backward_s = {}, {}
    context_mb = probs_mb = dense_mb = 0.0
    for dense in (False, True) if dense_applies else (False,):
        if dense:
            dense_mb = keep_dequantized(block) / MB
        forward_s[dense] = _timed(forward)
        if zeroth_order:
            backward_s.update({(c, p, dense): 0.0 for c in (False, True) for p in (False, True)})
            continue
        backward_s[(False, False, dense)], _ = backward_after(False, False)
        if activations:
            backward_s[(True, False, dense)], ctx = backward_after(True, False)
            backward_s[(True, True, dense)], both = backward_after(True, True)
            if not dense:
                context_mb, probs_mb = ctx, max(0.0, both - ctx)
        else:
            backward_s[(True, False, dense)] = backward_s[(True, True, dense)] = backward_s[(False, False, dense)]
        if dense:
            keep_dequantized(block, keep=False)
    if rule is not None:
        rule.keep_attention = saved_attention
        rule.release_kept()
    if not dense_applies:
        forward_s[True] = forward_s[False]
        backward_s.update({(c, p, True): backward_s[(c, p, False)] for c, p, _ in list(backward_s)})
    targets = mx.array(rng.integers(0, parts.vocab_size, (B, T)).astype(np.int32))
    normed = parts.final_norm(x)
    mx.eval(normed)
    loss_s = _timed(lambda: chunked_cross_entropy(parts, normed, targets, mx.ones((B, T)), cfg.vocab_chunk,
                                                  need_grad=not zeroth_order)[:2], repeats=1)
    if zeroth_order:  # two forwards (and two losses) per SPSA draw
        samples = getattr(method, "samples", 1)
        forward_s = {k: 2 * samples * v for k, v in forward_s.items()}
        loss_s *= 2 * samples
    fraction = getattr(method, "fraction", 1.0) if cfg.method == "lcsb" else 1.0
    trainable = n if cfg.num_layers in (-1, None) else min(n, cfg.num_layers)
    if prep.streamer is not None:
        prep.streamer.release(n - 1)
    mx.clear_cache()
    if lean_components:
        ws.update({"forward": lean_components["block forward"], "backward": lean_components["block backward"],
                   "loss": lean_components["loss"]})
    return LeverCosts(n, 0.0 if zeroth_order else fraction * trainable, forward_s, backward_s, loss_s, context_mb,
                      probs_mb, dense_mb, activations, dense_applies, ws if lean_components else {})


def fastest(costs: LeverCosts, room_mb: float, fixed: dict | None = None) -> Levers:
    """The levers with the least predicted step time whose extra MB fit in room_mb (ties: the least memory).
    fixed: levers the user set ({name: value}; None: free; -1 counts mean every block)."""
    fixed = given_levers(fixed or {}, costs.blocks)
    n = costs.blocks
    ctx_counts = [fixed["keep_activations"]] if "keep_activations" in fixed else \
        (range(n + 1) if costs.activations_apply and costs.backward_blocks else [0])
    att_values = [fixed["keep_attention"]] if "keep_attention" in fixed else \
        ([False, True] if costs.activations_apply else [False])
    dense_counts = [fixed["keep_dequantized"]] if "keep_dequantized" in fixed else \
        (range(n + 1) if costs.dense_applies else [0])
    best, best_key = Levers(**fixed), None
    for k_ctx in ctx_counts:
        for att in att_values:
            if att and not k_ctx and "keep_attention" not in fixed:
                continue
            for k_dense in dense_counts:
                lv = Levers(k_ctx, att, k_dense)
                mb = costs.extra_mb(lv)
                if mb > room_mb and len(fixed) < 3:
                    continue
                key = (round(costs.step_s(lv), 4), mb)
                if best_key is None or key < best_key:
                    best, best_key = lv, key
    return best


def plan_levers(cfg, prep, method, budget_mb: float | None, lean) -> tuple[Levers, LeverCosts, float]:
    """(levers, their measured costs, the budget planned for) of a prepared run whose leanest plan the planner
    predicted as `lean` (a PlanResult); the levers cfg sets are kept; budget None: the default."""
    planned = budget_mb if budget_mb is not None else default_budget_mb()
    costs = measure(cfg, prep, method, lean.components_mb)
    levers = fastest(costs, HEADROOM * planned - lean.peak_mb, {k: getattr(cfg, k) for k in LEVERS})
    return levers, costs, planned


def sweep(costs: LeverCosts, lean_peak_mb: float, png: str | None = None, title: str = "") -> list[dict]:
    """The fastest plan for budgets from the leanest plan's peak to the one that holds every lever (10 points):
    [{budget_mb, peak_mb, step_s, flags}], drawn as step time against peak MB when png is given."""
    everything = Levers(costs.blocks if costs.activations_apply else 0, costs.activations_apply,
                        costs.blocks if costs.dense_applies else 0)
    top = (lean_peak_mb + costs.extra_mb(everything)) / HEADROOM
    rows = []
    for budget in np.linspace(lean_peak_mb / HEADROOM, max(top, lean_peak_mb / HEADROOM + 1), 10):
        lv = fastest(costs, HEADROOM * budget - lean_peak_mb)
        rows.append({"budget_mb": float(budget), "peak_mb": lean_peak_mb + costs.extra_mb(lv),
                     "step_s": costs.step_s(lv), "flags": lv.flags(), **dataclasses.asdict(lv)})
    if png:

        import matplotlib  # imported when a plot is drawn: slow to import, and the backend is chosen before pyplot

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # after matplotlib.use: see the line above

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["peak_mb"] for r in rows], [r["step_s"] for r in rows], "o-")
        ax.set_xlabel("predicted MLX peak (MB)")
        ax.set_ylabel("predicted step time (s)")
        ax.set_title(title or "memory <-> step time", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=120), suffix=".png", what="the sweep plot")
        plt.close(fig)
    return rows
