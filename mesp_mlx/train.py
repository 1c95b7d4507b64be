"""A training run: config -> model -> LoRA -> data -> engine steps -> adapters, metrics, plot (ARCHITECTURE's flow)."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from . import backend
from .config import ConfigError, TrainConfig
from .data import BatchIterator, DataError, load_splits
from .engine import Batch, BlockEngine, NonFiniteError, WeightStreamer
from .engine.lanes import lane_count
from .governor import BudgetExceeded, Governor, resolve_budget
from .io import check_free_space, check_writable, remove_stale_temp_files
from .lock import FolderLock
from .mesp_lora import to_mesp_lora
from .lora import apply_lora, cast_lora, load_adapter_weights, save_adapters, write_adapter_config
from .methods import method_for
from .optimizers import LearningRate, make_optimizer
from .metrics import MetricsLog, block_peaks, plot_block_memory, plot_metrics
from .distributed import Ranks
from .state import STATE_FILE, load_state, save_state, saved_setting, shared_settings
from .models import ModelParts, cast_float_params, context_length, family_lora_parameters, load_model, set_compute_path
from .models.compute import keep_dequantized_blocks


@dataclass
class Prepared:
    model: object
    tokenizer: object
    config: dict
    path: Path
    parts: ModelParts
    compute_path: str
    streamer: WeightStreamer | None
    n_trainable: int


def prepare_model(cfg: TrainConfig) -> Prepared:
    """Load, pick the compute path and dtype, set up streaming, wrap with LoRA, resume an adapter if asked."""
    loaded = load_model(cfg.model, cfg.quantize_bits, cfg.quantize_group_size, lazy=True)
    model = loaded.model
    path = backend.compute_path(cfg.compute_path)
    set_compute_path(model, path)
    cast_float_params(model, backend.default_dtype() if cfg.dtype == "auto" else cfg.dtype)
    context = context_length(loaded.config)
    if cfg.max_seq_length is None:  # the default follows the model; only an explicit longer value is refused
        cfg.max_seq_length = min(2048, context) if context else 2048
    elif context and cfg.max_seq_length > context:
        raise ConfigError(f"--max-seq-length {cfg.max_seq_length} exceeds the model's context of {context} tokens")
    streamer = None
    if cfg.stream_weights:
        streamer = WeightStreamer(loaded.path, model, model.layers)
        streamer.release_all()
    cfg.lora_parameters = family_lora_parameters(model, cfg.lora_parameters)  # the family's keys unless given
    n_trainable = apply_lora(model, cfg.num_layers, cfg.lora_parameters, dora=cfg.fine_tune_type == "dora")
    cast_lora(model, mx.float32)
    if cfg.method == "mesp":
        to_mesp_lora(model)  # blocks the hand rule cannot take still get MeSP's LoRA VJPs under the fallback
    if cfg.resume_adapter_file:
        load_adapter_weights(model, cfg.resume_adapter_file)
    if streamer is None:
        mx.eval(model.parameters())
    else:
        mx.eval(model.trainable_parameters())
    parts = ModelParts(model, path, streamer)
    return Prepared(model, loaded.tokenizer, loaded.config, loaded.path, parts, path, streamer, n_trainable)


def answer(model, tokenizer, prompt: str, max_tokens: int) -> str:
    from mlx_lm import generate

    text = prompt
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    model.eval()
    out = generate(model, tokenizer, text, max_tokens=max_tokens, verbose=False)
    model.train()
    return out.strip()


def _show_answers(prep: Prepared, cfg: TrainConfig, label: str, log) -> list[str]:
    answers = []
    for p in cfg.demo_prompts:
        a = answer(prep.model, prep.tokenizer, p, cfg.demo_max_tokens)
        answers.append(a)
        log(f"  [{label}] Q: {p}\n  [{label}] A: {a}")
    if prep.streamer is not None:
        prep.streamer.release_all()
    mx.clear_cache()
    return answers


class Progress:
    def __init__(self, total: int, stream=None, silent: bool = False):
        self.total, self.stream, self.silent = total, stream or sys.stdout, silent
        self.tty = self.stream.isatty()

    def update(self, step: int, text: str) -> None:
        if self.silent:
            return
        width = 24
        done = int(width * step / self.total)
        line = f"[{'#' * done}{'.' * (width - done)}] {step}/{self.total} {text}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


@dataclass
class TrainResult:
    adapter_path: Path
    records: list
    answers_before: list
    answers_after: list
    status: str = "done"  # done | interrupted | nonfinite | over_budget
    test_loss: float | None = None


def evaluate(engine: BlockEngine, model, dataset, batch_size: int, max_seq_length: int, num_batches: int,
             rng=None) -> tuple[float, int]:
    """Mean loss per counted target token over `num_batches` batches of `dataset` (-1: all of it), as mlx-lm's
    evaluate, on the streamed forward without gradients (so no more memory than a training step's forward), dropout
    off. The batches' order is drawn from `rng` (training's stream: mlx-lm's order) or, without one, is fixed.
    Distributed: each rank takes its rows of every batch (uneven shares are exact too) and the losses are summed."""
    ranks = engine.ranks
    batches = BatchIterator(dataset, min(batch_size, len(dataset)), max_seq_length, seed=0, rng=rng, rank=ranks.rank,
                            world=ranks.size, even=False)
    batches.warned = True  # truncation was announced for the training set already
    n = batches.n_batches if num_batches == -1 else min(num_batches, batches.n_batches)
    was_training = model.training
    model.eval()
    total = count = 0
    try:
        for _ in range(n):
            tokens, lengths = next(batches)
            loss, ntoks = engine.loss_of(Batch.from_mlx_lm(tokens, lengths))
            total, count = total + loss * ntoks, count + ntoks
    finally:
        model.train(was_training)
    return total / max(count, 1), count


def train(cfg: TrainConfig, log=print) -> TrainResult:
    cfg.validate()
    ranks = Ranks.from_environment()  # size 1 unless started by mlx.launch (distributed.py)
    if cfg.batch_size % ranks.size:
        raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by the {ranks.size} "
                          "ranks of this run")
    if not ranks.is_writer:  # rank 0 alone writes and reports
        log = _silent
    adapter_path = Path(cfg.adapter_path)
    lock = None
    if ranks.is_writer:
        check_writable(adapter_path)
        lock = FolderLock(adapter_path, log).acquire()  # one run per adapter folder (refused: FolderLocked, exit 75)
    stop = StopSignals(log)
    try:
        removed = remove_stale_temp_files(adapter_path) if ranks.is_writer else []
        if removed:
            log(f"[mesp-mlx] note: removed {len(removed)} temp file(s) that an interrupted save left in {adapter_path}")
        return _train(cfg, adapter_path, stop, log, ranks)
    finally:
        stop.restore()
        if lock is not None:
            lock.release()


def _silent(*args, **kwargs) -> None:
    pass


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM (kill, logout, service managers, `timeout`, a phone's OS) and SIGHUP (the terminal went
    away): the first one lets the current step finish, then the run saves its adapters and state and ends with status
    130 / 143 / 129 (128 + the signal's number); a second one stops at once (SIGINT: KeyboardInterrupt; SIGTERM and
    SIGHUP: the signal's default action), leaving the last saved state."""

    STATUS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "hangup"}
    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}

    def __init__(self, log=print):
        self.log = log
        self.received: int | None = None
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.STATUS:
                self.old[sig] = signal.signal(sig, self._handle)

    @property
    def status(self) -> str | None:
        return self.STATUS.get(self.received) if self.received is not None else None

    def _handle(self, signum, frame):
        if self.received is not None:  # the second signal: stop now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        self.log(f"\n[mesp-mlx] {self.NAMES[signum]}: finishing this step, then saving (a second one stops without "
                 "saving)")

    def restore(self) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        self.old = {}


def _train(cfg: TrainConfig, adapter_path: Path, stop: StopSignals, log, ranks: Ranks) -> TrainResult:
    writer = ranks.is_writer
    if cfg.lanes is None and cfg.resume:  # the interrupted run's lanes: the continuation stays bit-exact
        cfg.lanes = saved_setting(adapter_path, "lanes")
    cfg.lanes = lane_count(cfg.lanes)
    budget_mb, budget_text = resolve_budget(cfg.device_profile, cfg.budget_mb)
    if budget_mb is not None and not cfg.skip_plan:  # the budget is each rank's: it holds batch / ranks rows
        check_plan(dataclasses.replace(cfg, batch_size=cfg.batch_size // ranks.size), budget_mb, budget_text, log)
    mx.random.seed(cfg.seed)
    prep = prepare_model(cfg)
    splits = load_splits(cfg.data, prep.tokenizer, cfg.mask_prompt)
    for name in ("valid", "test") if ranks.size > 1 else ():
        if splits.get(name) is not None and 0 < len(splits[name]) < ranks.size:
            raise DataError(f"{cfg.data}/{name}.jsonl: {len(splits[name])} examples cannot be split over "
                            f"{ranks.size} ranks (each rank evaluates its share)")
    # one numpy stream for the training and validation batches' order, as mlx_lm.lora's np.random.seed(seed)
    batches = BatchIterator(splits["train"], cfg.batch_size, cfg.max_seq_length, cfg.seed, rank=ranks.rank,
                            world=ranks.size)
    log(f"[mesp-mlx] model {prep.path} | {len(prep.parts.layers)} blocks | method {cfg.method} | ranks {ranks.size} | "
        f"compute {prep.compute_path} | LoRA params {prep.n_trainable / 1e6:.3f} M | stream weights {cfg.stream_weights} | "
        f"checkpoints {cfg.checkpoint_storage} | lanes {cfg.lanes} | BLAS {backend.blas_in_use().split(',')[0] or 'n/a'}")

    answers_before = _show_answers(prep, cfg, "before", log) if cfg.demo_prompts and writer else []
    prep.model.train()

    method = method_for(cfg)
    optimizers = [make_optimizer(cfg) for _ in prep.parts.layers]
    lr = LearningRate(cfg.learning_rate, cfg.lr_schedule, cfg.grad_accumulation_steps)
    if cfg.method == "mezo":
        method.learning_rate = lr  # MeZO's own SGD update follows the schedule too
    governor = Governor(budget_mb) if budget_mb is not None else None
    levers = choose_levers(cfg, prep, method, budget_mb, log if writer else _silent,
                           seq_len=batches.longest_batch_length())
    if prep.compute_path == "dequant" and levers.keep_dequantized:
        keep_dequantized_blocks(prep.parts.layers, levers.keep_dequantized)
    engine = BlockEngine(prep.parts, method, optimizers, cfg.checkpoint_storage, cfg.checkpoint_dir,
                         prep.streamer, cfg.vocab_chunk, cfg.clear_cache, cfg.seed, on_block_done=governor,
                         accumulation=cfg.grad_accumulation_steps, learning_rate=lr, ranks=ranks,
                         keep_activations=levers.keep_activations, lanes=cfg.lanes)
    if writer:
        check_free_space(adapter_path, _state_bytes(prep.model), "the training state")  # before anything is written
    adapter_file = adapter_path / "adapters.safetensors"
    settings = {**shared_settings(cfg), "lanes": cfg.lanes}  # lanes: recorded for --resume, not compared
    first_step = 1
    if cfg.resume:
        restored = load_state(adapter_path, prep.model, optimizers, settings, _shared_state(adapter_path, ranks))
        batches.restore(restored["data"])
        method.load_state_dict(restored["method"])
        engine.accum = restored["accum"]
        first_step = restored["step"] + 1
        log(f"[mesp-mlx] resuming {adapter_path} after step {restored['step']}")
    elif writer and (adapter_path / STATE_FILE).exists():
        log(f"[mesp-mlx] note: starting a new run over the one saved in {adapter_path} (--resume continues it)")
    if writer:
        write_adapter_config(adapter_path, cfg.num_layers if cfg.num_layers != -1 else len(prep.parts.layers),
                             cfg.lora_parameters, extra=_config_record(cfg, prep), fine_tune_type=cfg.fine_tune_type)
    metrics = MetricsLog(adapter_path / "metrics.jsonl" if writer else None,
                         keep_until=first_step - 1 if cfg.resume else None)
    progress = Progress(cfg.iters, silent=not writer)
    valid = splits["valid"] if cfg.steps_per_eval and splits.get("valid") is not None and len(splits["valid"]) else None

    def held_out(step: int) -> dict:
        start = time.perf_counter()
        try:
            loss, ntoks = evaluate(engine, prep.model, valid, cfg.batch_size, cfg.max_seq_length, cfg.val_batches,
                                   batches.rng)
        except NonFiniteError:
            log(f"[mesp-mlx] WARNING: step {step}: the validation loss is NaN or inf")
            return {"val_loss": None}
        seconds = time.perf_counter() - start
        log(f"[mesp-mlx] step {step}: val loss {loss:.4f} | val ppl {math.exp(min(loss, 50)):.2f} | "
            f"{ntoks} tokens | {seconds:.1f} s")
        return {"val_loss": loss, "val_tokens": ntoks, "val_s": seconds}

    saved_at = {"step": first_step - 1}

    def save(step: int) -> None:
        if writer:  # every rank holds the same adapters and optimizer states: rank 0 saves them
            save_adapters(prep.model, adapter_file)
            save_state(adapter_path, prep.model, optimizers, step, batches.state(), method.state_dict(), settings,
                       engine.accum)
        saved_at["step"] = step

    status = "done"

    def over_budget(step: int, error: BudgetExceeded) -> str:
        log(f"[mesp-mlx] ERROR: step {step}: {error}; stopped as the device would stop the app. The last saved "
            f"state ({adapter_file}) is kept; --resume continues it with a larger budget or a leaner plan")
        return "over_budget"

    at_start = {}
    first_batch = None
    try:
        if valid is not None and first_step == 1:
            # mlx-lm draws the first training batch before its first evaluation. Each evaluation draws one permutation
            # from the shared stream; mlx-lm evaluates once per iteration `it` in {1, every steps_per_eval-th, the
            # last}, before that iteration's update, where we evaluate at the start (its it = 1) and after the
            # others' updates: the same draws in the same order (step 1 is not evaluated again unless it is the last)
            first_batch = next(batches)
            try:
                at_start = held_out(0)
            except BudgetExceeded as e:
                status = over_budget(0, e)
        for step in range(first_step, cfg.iters + 1) if status == "done" else ():
            if ranks.any(stop.received is not None):  # a signal came during the last step (or before the first);
                # distributed: a signal that reached any rank stops every rank after the same step
                if step > first_step:
                    if saved_at["step"] != step - 1:
                        save(step - 1)
                    log(f"[mesp-mlx] interrupted after step {step - 1}: state saved; continue with --resume")
                else:
                    log(f"[mesp-mlx] stopped before step {step}: nothing new since the saved state")
                status = stop.status or "terminated"
                break
            tokens, lengths = first_batch if first_batch is not None else next(batches)
            first_batch = None
            ranks.reset_counters()
            try:
                stats, _ = engine.step(Batch.from_mlx_lm(tokens, lengths), step)
                due = valid is not None and (step % cfg.steps_per_eval == 0 or step == cfg.iters) and \
                    not (step == 1 and at_start and step != cfg.iters)  # mlx-lm's it = 1 was the start's
                evaluation = held_out(step) if due else {}  # after this step's update
            except BudgetExceeded as e:
                status = over_budget(step, e)
                break
            except NonFiniteError as e:
                if cfg.on_nonfinite == "stop":
                    log(f"[mesp-mlx] ERROR: {e}; stopping. The last saved adapter ({adapter_file}) is kept; "
                        "--on-nonfinite skip would skip such steps instead")
                    status = "nonfinite"
                    break
                log(f"[mesp-mlx] WARNING: {e}; step skipped (blocks above it were already updated this step)")
                continue
            record = {"step": step, "loss": stats.loss, "learning_rate": lr.of_step(step), "tokens": stats.ntoks,
                      "step_s": stats.step_s,
                      "tokens_per_s": stats.ntoks / stats.step_s, "peak_mb": stats.peak_mb,
                      "active_mb": stats.active_mb, "phase_peak_mb": stats.phase_peak_mb, "phase_s": stats.phase_s,
                      "block_peak_mb": block_peaks(stats.block_peak_mb, len(prep.parts.layers)),
                      "seq_len": int(tokens.shape[1] - 1), "world_size": ranks.size, **evaluation}
            if ranks.size > 1:  # what this rank sent to all_sum this step, and the seconds it spent there
                record.update({"comm_mb": ranks.bytes_sent / 2**20, "comm_s": ranks.seconds})
            if step == 1 and at_start:
                record["val_loss_at_start"] = at_start["val_loss"]
            metrics.log(record)
            if step % cfg.steps_per_report == 0 or step == cfg.iters:
                progress.update(step, f"loss {stats.loss:.4f} | {record['tokens_per_s']:.0f} tok/s | "
                                      f"{stats.step_s:.2f} s | peak {stats.peak_mb:.1f} MB | "
                                      f"active {stats.active_mb:.1f} MB")
            if cfg.save_every and step % cfg.save_every == 0 and step != cfg.iters:
                save(step)
                if writer:
                    save_adapters(prep.model, adapter_path / f"{step:07d}_adapters.safetensors")
    finally:
        if governor is not None:
            governor.close()
    if governor is not None and metrics.records:
        _emulation_report(metrics.records, budget_mb, budget_text, log)
    if status != "done":
        return TrainResult(adapter_path, metrics.records, answers_before, [], status)
    save(cfg.iters)
    log(f"[mesp-mlx] saved adapters to {adapter_file}")
    if stop.received is not None:  # a signal during the last step: the run is complete and saved, stop here
        return TrainResult(adapter_path, metrics.records, answers_before, [], stop.status)
    test_loss = None
    if cfg.test:
        if splits.get("test") is None or not len(splits["test"]):
            log(f"[mesp-mlx] WARNING: --test: {cfg.data} has no test.jsonl; nothing to evaluate")
        else:
            try:  # the governor's per-block check still applies (the engine keeps its hook)
                test_loss, ntoks = evaluate(engine, prep.model, splits["test"], cfg.batch_size, cfg.max_seq_length,
                                            cfg.test_batches)
                log(f"[mesp-mlx] test loss {test_loss:.4f} | test ppl {math.exp(min(test_loss, 50)):.2f} | "
                    f"{ntoks} tokens")
            except BudgetExceeded as e:
                log(f"[mesp-mlx] ERROR: --test: {e}; the test evaluation stopped as the device would stop the app "
                    f"(the trained adapters are saved in {adapter_file})")
                status = "over_budget"
    if cfg.plot and writer:
        png = plot_metrics(metrics.records, adapter_path / "metrics.png", f"{cfg.method} on {prep.path.name}")
        blocks = plot_block_memory(metrics.records[-1], adapter_path / "memory_blocks.png", budget_mb)
        log(f"[mesp-mlx] plots: {png}, {blocks}")
    answers_after = _show_answers(prep, cfg, "after", log) if cfg.demo_prompts and writer else []
    return TrainResult(adapter_path, metrics.records, answers_before, answers_after, status, test_loss)


def choose_levers(cfg: TrainConfig, prep: Prepared, method, budget_mb: float | None, log, seq_len: int | None = None):
    """The speed levers of this run: as set, or the fastest combination the budget (or the default) leaves room for,
    planned for its longest batch (seq_len, at most max_seq_length). Also sets the method's keep_attention and records
    the choice in cfg (adapter_config.json)."""
    from .planner import predict
    from .speed_plan import LEVERS, Levers, given_levers, plan_levers

    fixed = given_levers({k: getattr(cfg, k) for k in LEVERS}, len(prep.parts.layers))
    if len(fixed) == len(LEVERS):
        levers = Levers(**fixed)
        note = "as set"
    else:  # the leanest plan's peak and the levers' costs, at the longest batch
        at = dataclasses.replace(cfg, max_seq_length=min(seq_len or cfg.max_seq_length, cfg.max_seq_length))
        base = predict(at, prep)
        levers, costs, planned = plan_levers(at, prep, method, budget_mb, base)
        cfg.predicted_step_s = costs.step_s(levers)
        cfg.predicted_peak_mb = base.peak_mb + costs.extra_mb(levers)
        note = (f"fastest under {'the budget' if budget_mb is not None else 'the default budget'} of {planned:.0f} MB: "
                f"predicted {cfg.predicted_step_s:.2f} s per step, peak {cfg.predicted_peak_mb:.1f} MB")
    inner = getattr(method, "inner", method)
    if hasattr(inner, "keep_attention"):
        inner.keep_attention = levers.keep_attention
    for k in LEVERS:
        setattr(cfg, k, getattr(levers, k))
    log(f"[mesp-mlx] speed levers ({note}): {levers.flags()}")
    return levers


def check_plan(cfg: TrainConfig, budget_mb: float, budget_text: str, log) -> None:
    """Refuse, before anything is written, a run predicted not to fit; name the settings that would."""
    from .planner import fitting_advice, predict

    plan = predict(cfg)
    log(f"[mesp-mlx] plan: predicted peak {plan.peak_mb:.1f} MB within {budget_text}" if plan.peak_mb <= budget_mb
        else f"[mesp-mlx] plan: predicted peak {plan.peak_mb:.1f} MB is over {budget_text}")
    if plan.peak_mb <= budget_mb:
        return
    raise ConfigError(f"this run is predicted to need {plan.peak_mb:.1f} MB, over the budget ({budget_text}):\n"
                      + "\n".join(plan.lines(budget_mb)) + f"\n{fitting_advice(cfg, budget_mb)}\n(--skip-plan runs "
                      "it anyway; the governor then stops it at the first block that goes over)")


def _emulation_report(records: list, budget_mb: float, budget_text: str, log) -> None:
    """Budget, MLX peak, headroom and per-phase peaks over the run, with the process's resident set size beside."""
    import resource

    peak = max(r["peak_mb"] for r in records)
    phases: dict = {}
    for r in records:
        for k, v in r["phase_peak_mb"].items():
            phases[k] = max(phases.get(k, 0.0), v)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    log(f"[mesp-mlx] memory: budget {budget_mb:.0f} MB ({budget_text}) | MLX peak {peak:.1f} MB | headroom "
        f"{budget_mb - peak:.1f} MB | phases " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items() if v) +
        f" | process max RSS {rss_mb:.0f} MB (Python, libraries and file pages included)")


def _shared_state(adapter_path: Path, ranks: Ranks):
    """The saved state for --resume: read by rank 0 and sent to the others (the folder may exist on rank 0 only)."""
    from .state import ResumeError, read_state

    if ranks.size == 1:
        return None
    tensors, meta, error = {}, {}, None
    if ranks.is_writer:
        try:
            tensors, meta = read_state(adapter_path)
        except ResumeError as e:
            error = str(e)
    shared = ranks.broadcast_json({"error": error, "meta": meta})
    if shared["error"]:
        raise ResumeError(shared["error"])
    return ranks.broadcast_arrays(tensors), shared["meta"]


def _state_bytes(model) -> int:
    """A generous size of one state save: the adapters twice (adapters file + state) and up to two optimizer moments."""
    from mlx.utils import tree_flatten

    return 4 * sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters())) + 2**20


def _config_record(cfg: TrainConfig, prep: Prepared) -> dict:
    """What mlx-lm's adapter_config.json holds (its lora.py dumps its args) plus our engine's settings."""
    rec = dataclasses.asdict(cfg)
    rec["model"] = str(prep.path)
    rec.pop("demo_prompts", None)
    for key in ("predicted_step_s", "predicted_peak_mb"):  # the speed plan's prediction, beside what it chose
        if hasattr(cfg, key):
            rec[key] = getattr(cfg, key)
    return rec
