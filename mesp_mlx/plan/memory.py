"""Before step 1: will this run fit its memory budget, and if not, which settings would?

The step's MLX peak is predicted by component:
    resident  what is in MLX memory before the step: LoRA weights, and the frozen weights unless streamed (measured
              after loading, exactly as the run loads them)
    optimizer state: AdamW/Adam 2x the trainable parameters, SGD with momentum / Muon 1x, plain SGD 0 (arithmetic),
                     + 1x for the accumulation buffers when grad_accumulation_steps > 1, + 1x for gradients held
                     across blocks (--max-grad-norm; an objective's step by rows)
    checkpoints  the block-boundary activations: (blocks + 1) x B x T x d x 4 bytes in memory; two in flight when mmap'd
    working set  the largest of: one block's forward, one block's backward (the method's rule), one vocabulary chunk of
              the loss — each probed once on this model at these shapes (random activations; the block's weights are
              streamed in during the probe when streaming, as in the run)
    peak = resident (frozen weights + LoRA) + optimizer + checkpoints + working set
An objective's step (DPO, ORPO, GRPO) trains half its rows at a time (engine/loop.py, _step_by_rows) after scoring
all of them on a forward without checkpoints: the training components are for half the rows, and
    scoring      one block's plain forward over all the rows + its input and output, or the loss over all of them
GRPO's sampling phase (generation.py) holds the whole model, the KV caches and the logits instead:
    generation   for one row decoded at a time (the leanest); run/prepare.py decodes as many together as fit
and the peak takes the largest of training, scoring and generation above what is resident.
The allocator cache is not part of MLX's peak; the governor caps it separately (10 % of the budget).

A phone counts the whole process (footprint.py), so the process footprint is predicted too:
    footprint = outside MLX + peak, outside MLX = the process footprint minus MLX's active and cached memory, measured
              with the model loaded as the run loads it (Python, the libraries, the tokenizer, the allocators' slack)
and checked against the footprint limit (--footprint-limit, or a phone profile's) beside the budget: a limit leaves
MLX the room `limit - outside MLX`, which the fitting candidates and the speed levers are held to as to a budget.

Over budget, the planner tries settings from the cheapest in speed to the most costly: stream the weights, mmap the
checkpoints, MeSP instead of MeBP, smaller loss chunks, shorter sequences, and MeZO (forward only) as the last
resort; it returns the first that fits. (LCSB saves time, not memory: its working set is MeSP's block.)
Memory the budget leaves above that peak is spent on speed levers (kept contexts, attention probabilities, fp32
weights): speed.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..engine.loss import auto_vocab_chunk, chunked_cross_entropy
from ..methods import method_for
from .footprint import footprint_mb, release_free_heap
from .generation import GenerationCost, generation_cost
from .governor import resolve_footprint_limit

MB = 1024 * 1024


@dataclass
class PlanResult:
    settings: dict
    components_mb: dict = field(default_factory=dict)
    outside_mlx_mb: float | None = None  # the process footprint outside MLX when predicted (None: not measurable)
    footprint_limit_mb: float | None = None  # the run's footprint limit (None: none)
    footprint_text: str = "no footprint limit"
    generation: GenerationCost | None = None  # GRPO: the sampling phase's memory by rows decoded together
    generation_rows: int = 1  # GRPO: the rows decoded together that `generation` in components_mb is for

    @property
    def peak_mb(self) -> float:
        c = self.components_mb
        training = c["checkpoints"] + max(c["block forward"], c["block backward"], c["loss"])
        phases = max(training, c.get("scoring", 0.0), c.get("generation", 0.0))  # an objective's other phases
        return c["frozen weights"] + c["LoRA"] + c["optimizer"] + phases

    @property
    def footprint_mb(self) -> float | None:
        """The predicted process footprint of the step: outside MLX + MLX's peak."""
        return None if self.outside_mlx_mb is None else self.outside_mlx_mb + self.peak_mb

    def footprint_fits(self) -> bool:
        return self.footprint_limit_mb is None or self.footprint_mb is None or \
            self.footprint_mb <= self.footprint_limit_mb

    def fits(self, budget_mb: float | None) -> bool:
        """Within the budget (None: none) and the footprint limit."""
        return (budget_mb is None or self.peak_mb <= budget_mb) and self.footprint_fits()

    def lines(self, budget_mb: float | None = None) -> list[str]:
        out = [f"  {k:<15}{v:9.1f} MB" for k, v in self.components_mb.items()]
        out.append(f"  {'predicted peak':<15}{self.peak_mb:9.1f} MB" +
                   (f"   (budget {budget_mb:.0f} MB: {'fits' if self.peak_mb <= budget_mb else 'OVER'})"
                    if budget_mb else ""))
        if self.footprint_mb is not None:
            out.append(f"  {'process':<15}{self.footprint_mb:9.1f} MB   predicted footprint: "
                       f"{self.outside_mlx_mb:.1f} MB outside MLX + the peak" +
                       (f" (footprint limit {self.footprint_limit_mb:.0f} MB: "
                        f"{'fits' if self.footprint_fits() else 'OVER'})" if self.footprint_limit_mb else ""))
        return out


def outside_mlx_mb() -> float | None:
    """The process footprint now minus what MLX holds (active and cached), in MB; None where none is measured."""
    process = footprint_mb()
    return None if process is None else max(0.0, process - (mx.get_active_memory() + mx.get_cache_memory()) / MB)


def mlx_room_mb(budget_mb: float | None, plan: PlanResult) -> float | None:
    """What MLX may hold: the budget, or less where the footprint limit leaves less beside the rest of the process."""
    if plan.footprint_limit_mb is None or plan.outside_mlx_mb is None:
        return budget_mb
    room = max(0.0, plan.footprint_limit_mb - plan.outside_mlx_mb)
    return room if budget_mb is None else min(budget_mb, room)


class _VocabWindow:
    """The model's parts seen through their first `rows` vocabulary rows (the loss probe needs two chunks, not all)."""

    def __init__(self, parts, rows: int):
        self.parts, self.vocab_size = parts, rows

    def __getattr__(self, name):
        return getattr(self.parts, name)


def _probe(fn) -> float:
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn()
    mx.eval(out)
    peak = mx.get_peak_memory() - base
    del out
    mx.clear_cache()
    return peak / MB


def trained_rows(cfg) -> int:
    """The rows one backward pass holds: an objective's batch (DPO / ORPO / GRPO, cfg.batch_size = all its rows)
    trains half of them at a time when no LoRA dropout draws masks (engine/loop.py, _by_rows); SFT all of them."""
    rows = cfg.batch_size
    if getattr(cfg, "train_mode", "sft") == "sft" or rows < 2 or cfg.lora_parameters.get("dropout", 0.0) > 0:
        return rows
    return rows - rows // 2


def predict(cfg, prep, before_bytes: int = 0) -> PlanResult:
    """Predict the step peak of run `cfg` (a TrainConfig with its sequence length resolved) by component, probing one
    block of `prep`, the model as the run prepares it (run/prepare.py). Everything in MLX memory above `before_bytes`
    (what was active before `prep` was loaded) counts as resident."""
    parts, layers = prep.parts, prep.parts.layers
    if prep.streamer is not None:
        prep.streamer.release_all()
    mx.clear_cache()
    release_free_heap()  # what earlier work left free in the C heap is not the run's
    resident = (mx.get_active_memory() - before_bytes) / MB
    outside_mlx = outside_mlx_mb()
    limit, limit_text = resolve_footprint_limit(getattr(cfg, "device_profile", None),
                                                getattr(cfg, "footprint_limit", None))
    trainable = sum(v.nbytes for _, v in tree_flatten(prep.model.trainable_parameters())) / MB
    own = (cfg.optimizer_config or {}).get(cfg.optimizer) or {}
    # Adam/AdamW: m and v; Muon and SGD with momentum: one buffer; Adafactor: row + column factors (~0); plain SGD: 0
    moments = {"adam": 2, "adamw": 2, "muon": 1, "sgd": 1 if own.get("momentum", 0) else 0,
               "adafactor": 1 if own.get("beta_1") is not None else 0}[cfg.optimizer]
    optimizer = moments * trainable
    # gradient accumulation: one LoRA-sized buffer per block, i.e. the trainable size in all
    optimizer += trainable if getattr(cfg, "grad_accumulation_steps", 1) > 1 else 0.0

    rows, T = cfg.batch_size, cfg.max_seq_length - 1
    B = trained_rows(cfg)
    # gradients held across blocks, one LoRA-sized copy each: --max-grad-norm holds every block's until the last one
    # exists (the global norm), and an objective's step by rows holds the first half's until the second half's add
    optimizer += trainable * ((getattr(cfg, "max_grad_norm", None) is not None) + (B != rows))
    d = parts.inner.norm.weight.shape[0]
    act = 4 * B * T * d / MB  # one boundary activation, fp32
    checkpoints = (len(layers) + 1) * act if cfg.checkpoint_storage == "memory" else 2 * act

    method = method_for(cfg)
    method.set_side_storage(cfg.checkpoint_storage, getattr(cfg, "checkpoint_dir", None))  # as the engine does
    block = layers[-1]
    mx.random.seed(cfg.seed)
    x = mx.random.normal((B, T, d)).astype(parts.dtype)
    g = 1e-3 * mx.random.normal((B, T, d)).astype(parts.dtype)
    mask = parts.block_mask(block, x)
    mx.eval(x, g)
    method.block_forward(block, x, mask)  # the once-per-class check of MeSP happens here, outside the probes
    if prep.streamer is not None:
        prep.streamer.release(len(layers) - 1)
    # probed on one thread, whatever the run's lanes (engine/lanes.py): n lanes hold n working sets of 1/n of the rows
    # each, whose peaks coincide or not by thread timing; the whole batch's working set is their worst case, and it
    # does not depend on timing
    forward = _probe(lambda: method.block_forward(block, x, mask))
    if prep.streamer is not None:
        prep.streamer.release(len(layers) - 1)
    zeroth_order = getattr(method, "zeroth_order", False)
    backward = 0.0 if zeroth_order else _probe(lambda: method.block_backward(block, x, g, mask))
    if zeroth_order:  # forward only: no checkpoints, no optimizer state (MeZO's update is its own)
        checkpoints, optimizer = 0.0, 0.0
    n = B * T
    chunk = cfg.vocab_chunk or auto_vocab_chunk(n, parts.vocab_size, d)
    window = _VocabWindow(parts, min(parts.vocab_size, 2 * chunk))
    targets = mx.array(np.random.default_rng(0).integers(0, window.vocab_size, (B, T)).astype(np.int32))
    normed = parts.final_norm(x)
    mx.eval(normed)
    loss = _probe(lambda: chunked_cross_entropy(window, normed, targets, mx.ones((B, T)), chunk,
                                                need_grad=not zeroth_order)[:2]) + act
    settings = {k: getattr(cfg, k) for k in ("method", "stream_weights", "checkpoint_storage", "vocab_chunk",
                                              "max_seq_length", "batch_size")}
    components = {"frozen weights": resident - trainable, "LoRA": trainable, "optimizer": optimizer,
                  "checkpoints": checkpoints, "block forward": forward, "block backward": backward, "loss": loss}
    if B != rows:  # the objective's scoring forward over all the rows, without checkpoints
        x_all = mx.random.normal((rows, T, d)).astype(parts.dtype)
        mx.eval(x_all)
        plain = _probe(lambda: block(x_all, parts.block_mask(block, x_all))) + 2 * act * rows / B
        components["scoring"] = max(plain, loss * rows / B)  # the loss and its gradient are over all the rows
        del x_all
        if prep.streamer is not None:
            prep.streamer.release(len(layers) - 1)
    generation = None
    if getattr(cfg, "train_mode", "sft") == "grpo":  # B x G sequences of prompt + completion, sampled first
        generation = generation_cost(prep.model, cfg.max_seq_length, parts.vocab_size, prep.streamer)
        components["generation"] = generation.mb(1)
    result = PlanResult(settings, components, outside_mlx, limit, limit_text, generation)
    del prep, block, x, g, normed
    mx.clear_cache()
    release_free_heap()  # the probes' freed blocks: not the run's footprint
    return result


def reserve_generation(plan: PlanResult, room_mb: float | None) -> None:
    """GRPO: as many rows decoded together as the room leaves beside what stays resident, before the speed levers
    spend the rest (on this CPU sampling costs a pass over the weights per decoding step, so its rows matter more
    than the training step's levers). Sets plan.generation_rows and the `generation` component for them."""
    if plan.generation is None:
        return
    c = plan.components_mb
    free = None if room_mb is None else room_mb - c["frozen weights"] - c["LoRA"] - c["optimizer"]
    plan.generation_rows = plan.generation.rows_within(free, plan.settings["batch_size"])
    c["generation"] = plan.generation.mb(plan.generation_rows)


def predict_fresh(cfg, prepare) -> tuple[object, PlanResult]:
    """(the resolved settings, the leanest plan) of `cfg` on a model `prepare(cfg)` loads now (run/prepare.py's
    prepare_model); what MLX held before the load is not counted."""
    mx.clear_cache()
    before = mx.get_active_memory()
    prep = prepare(cfg)
    return prep.settings, predict(prep.settings, prep, before)


def candidates(cfg):
    """Settings to try, cheapest in speed first, each adding to the previous."""
    steps = []
    c = cfg
    if not c.stream_weights:
        c = dataclasses.replace(c, stream_weights=True)
        steps.append(("stream the frozen weights (--stream-weights)", c))
    if c.checkpoint_storage != "mmap":
        c = dataclasses.replace(c, checkpoint_storage="mmap")
        steps.append(("keep checkpoints in mmap'd files (--checkpoint-storage mmap)", c))
    if c.method == "mebp":
        c = dataclasses.replace(c, method="mesp")
        steps.append(("MeSP's backward (--method mesp)", c))
    for chunk in (2048, 512):
        if not c.vocab_chunk or c.vocab_chunk > chunk:
            c = dataclasses.replace(c, vocab_chunk=chunk)
            steps.append((f"smaller loss chunks (--vocab-chunk {chunk})", c))
    full_seq = c
    seq = c.max_seq_length
    while seq > 65:
        seq = (seq - 1) // 2 + 1
        c = dataclasses.replace(c, max_seq_length=seq)
        steps.append((f"shorter sequences (--max-seq-length {seq})", c))
    if cfg.method != "mezo":  # the last resort: forward-only zeroth-order, at the original sequence length
        steps.append(("MeZO, forward only (--method mezo; expect 10-100x more steps)",
                      dataclasses.replace(full_seq, method="mezo")))
    return steps


def best_fitting_plan(cfg, budget_mb: float | None, prepare):
    """(description, config, prediction) of the first candidate that fits the budget (None: none) and the footprint
    limit, or None; `prepare(config)` loads the model as a run with that config would (run/prepare.py's
    prepare_model)."""
    for description, c in candidates(cfg):
        _, p = predict_fresh(c, prepare)
        if p.fits(budget_mb):
            return description, c, p
    return None


def plan_flags(cfg) -> list[str]:
    """The command-line flags that select a candidate's settings."""
    flags = [f"--method {cfg.method}", f"--max-seq-length {cfg.max_seq_length}",
             f"--checkpoint-storage {cfg.checkpoint_storage}"]
    if cfg.stream_weights:
        flags.append("--stream-weights")
    if cfg.vocab_chunk:
        flags.append(f"--vocab-chunk {cfg.vocab_chunk}")
    return flags


def fitting_advice(cfg, budget_mb: float | None, prepare) -> str:
    """One line naming the first plan that fits the budget and the footprint limit and its flags (or saying none
    does)."""
    best = best_fitting_plan(cfg, budget_mb, prepare)
    if best is None:
        return "no plan within reach fits, not even MeZO's forward-only one"
    description, fitting, prediction = best
    footprint = f" (process footprint {prediction.footprint_mb:.1f} MB)" \
        if prediction.footprint_limit_mb is not None and prediction.footprint_mb is not None else ""
    return (f"it fits with {description} (and the steps before it), predicted {prediction.peak_mb:.1f} MB{footprint}: "
            + " ".join(plan_flags(fitting)))
