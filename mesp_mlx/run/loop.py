"""The run's third stage: the steps. Each step is one engine step (engine/loop.py) on the next batch, then the
held-out loss when due (heldout.py), a metrics record and the progress line; a signal, the budget or a NaN ends the
loop early."""

from __future__ import annotations

import math
import sys
import time

from ..adapters.lora import save_adapters
from ..engine import Batch, NonFiniteError
from ..plan.footprint import footprint_mb
from ..plan.governor import BudgetExceeded
from . import heldout
from .metrics import block_peaks
from .session import Session
from .signals import StopSignals


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


def held_out(session: Session, step: int, log) -> dict:
    """The validation loss after `step` (GRPO: the mean reward of greedy completions) as fields for the metrics
    record."""
    s, run = session.run.settings, session.run
    start = time.perf_counter()
    if s.train_mode == "grpo":
        reward, n = heldout.evaluate_rewards(run, run.splits["valid"], s.val_batches)
        seconds = time.perf_counter() - start
        log(f"[mesp-mlx] step {step}: val reward {reward:.4f} | {n} prompts, greedy | {seconds:.1f} s")
        return {"val_reward": reward, "val_prompts": n, "val_s": seconds}
    try:
        loss, ntoks = heldout.evaluate(session.engine, run.prep.model, run.splits["valid"], s.batch_size, s.max_seq_length,
                               s.val_batches, run.batches.rng)
    except NonFiniteError:
        log(f"[mesp-mlx] WARNING: step {step}: the validation loss is NaN or inf")
        return {"val_loss": None}
    seconds = time.perf_counter() - start
    log(f"[mesp-mlx] step {step}: val loss {loss:.4f} | val ppl {math.exp(min(loss, 50)):.2f} | {ntoks} tokens | "
        f"{seconds:.1f} s")
    return {"val_loss": loss, "val_tokens": ntoks, "val_s": seconds}


def has_validation(session: Session) -> bool:
    valid = session.run.splits.get("valid")
    return bool(session.run.settings.steps_per_eval and valid is not None and len(valid))


def over_budget(session: Session, step: int, error: BudgetExceeded, log) -> str:
    log(f"[mesp-mlx] ERROR: step {step}: {error}; stopped as the device would stop the app. The last saved state "
        f"({session.adapter_file}) is kept; --resume continues it with a larger budget or a leaner plan")
    return "over_budget"


def step_footprint(session: Session) -> float | None:
    """The process footprint of the step (plan/footprint.py): the largest of the governor's samples after each of its
    blocks (and its evaluation's) and one now; None where the platform gives none."""
    return session.governor.footprint.take() if session.governor is not None else footprint_mb()


def as_batch(item) -> Batch:
    """The engine's Batch of what the iterator gave: mlx-lm's (tokens, lengths), or a preference batch as it is."""
    return item if isinstance(item, Batch) else Batch.from_mlx_lm(*item)


def step_record(session: Session, step: int, stats, batch: Batch, evaluation: dict, at_start: dict) -> dict:
    ranks = session.ranks
    record = {"step": step, "loss": stats.loss, "learning_rate": session.lr.of_step(step), "tokens": stats.ntoks,
              "step_s": stats.step_s, "tokens_per_s": stats.ntoks / stats.step_s, "peak_mb": stats.peak_mb,
              "active_mb": stats.active_mb, "footprint_mb": step_footprint(session),
              "phase_peak_mb": stats.phase_peak_mb, "phase_s": stats.phase_s,
              "block_peak_mb": block_peaks(stats.block_peak_mb, len(session.run.prep.parts.layers)),
              "seq_len": int(batch.inputs.shape[1]), "world_size": ranks.size, **stats.extra, **evaluation}
    if ranks.size > 1:  # what this rank sent to all_sum this step, and the seconds it spent there
        record.update({"comm_mb": ranks.bytes_sent / 2**20, "comm_s": ranks.seconds})
    figures = getattr(batch, "figures", None)
    if figures:  # GRPO: the rollout's rewards, its generation seconds and MLX peak (a phase of the step)
        if ranks.size > 1:  # each rank sampled its own prompts: the figures averaged over the ranks
            keys = sorted(figures)
            figures = dict(zip(keys, (v / ranks.size for v in ranks.sum_scalars([figures[k] for k in keys]))))
        record.update(figures)
        record["phase_peak_mb"] = {"generate": figures["generate_peak_mb"], **record["phase_peak_mb"]}
        record["peak_mb"] = max(record["peak_mb"], figures["generate_peak_mb"])
    if step == 1 and at_start:
        record.update({f"{k}_at_start": v for k, v in at_start.items() if k in ("val_loss", "val_reward")})
    return record


def stop_for_signal(session: Session, stop: StopSignals, step: int, log) -> str | None:
    """The status to end with when a signal came during the last step (or before the first), after saving what that
    step did; None to go on. Distributed: a signal that reached any rank stops every rank after the same step."""
    if not session.ranks.any(stop.received is not None):
        return None
    if step > session.first_step:
        if session.saved_step != step - 1:
            session.save(step - 1)
        log(f"[mesp-mlx] interrupted after step {step - 1}: state saved; continue with --resume")
    else:
        log(f"[mesp-mlx] stopped before step {step}: nothing new since the saved state")
    return stop.status or "terminated"


def run_steps(session: Session, stop: StopSignals, log) -> str:
    """Steps first_step..iters; returns the status: done | interrupted | terminated | hangup | nonfinite |
    over_budget. Saves on a stop and every save_every steps (the final save is finish()'s)."""
    s, batches, ranks = session.run.settings, session.run.batches, session.ranks
    progress = Progress(s.iters, silent=not session.writer)
    validate = has_validation(session)
    at_start, first_batch = {}, None
    if validate and session.first_step == 1:
        # mlx-lm draws the first training batch before its first evaluation. Each evaluation draws one permutation
        # from the shared stream; mlx-lm evaluates once per iteration `it` in {1, every steps_per_eval-th, the
        # last}, before that iteration's update, where we evaluate at the start (its it = 1) and after the
        # others' updates: the same draws in the same order (step 1 is not evaluated again unless it is the last)
        try:
            first_batch = next(batches)
            at_start = held_out(session, 0, log)
        except BudgetExceeded as e:
            return over_budget(session, 0, e, log)
    stop.steps_begin()  # from here a first signal lets the running step finish, then the run saves
    for step in range(session.first_step, s.iters + 1):
        status = stop_for_signal(session, stop, step, log)
        if status is not None:
            return status
        ranks.reset_counters()
        try:  # GRPO samples its batch here: the governor checks that phase's peak too
            batch = as_batch(first_batch if first_batch is not None else next(batches))
            first_batch = None
            stats, _ = session.engine.step(batch, step)
            due = validate and (step % s.steps_per_eval == 0 or step == s.iters) and \
                not (step == 1 and at_start and step != s.iters)  # mlx-lm's it = 1 was the start's
            evaluation = held_out(session, step, log) if due else {}  # after this step's update
        except BudgetExceeded as e:
            return over_budget(session, step, e, log)
        except NonFiniteError as e:
            if s.on_nonfinite == "stop":
                log(f"[mesp-mlx] ERROR: {e}; stopping. The last saved adapter ({session.adapter_file}) is kept; "
                    "--on-nonfinite skip would skip such steps instead")
                return "nonfinite"
            log(f"[mesp-mlx] WARNING: {e}; step skipped (blocks above it were already updated this step)")
            continue
        record = step_record(session, step, stats, batch, evaluation, at_start)
        session.metrics.log(record)
        if step % s.steps_per_report == 0 or step == s.iters:
            footprint = f" | footprint {record['footprint_mb']:.0f} MB" if record["footprint_mb"] is not None else ""
            progress.update(step, f"loss {stats.loss:.4f} | {record['tokens_per_s']:.0f} tok/s | {stats.step_s:.2f} s"
                                  f" | peak {stats.peak_mb:.1f} MB | active {stats.active_mb:.1f} MB{footprint}"
                                  + _objective_figures(stats.extra, getattr(batch, "figures", None)))
        if s.save_every and step % s.save_every == 0 and step != s.iters:
            session.save(step)
            if session.writer:
                save_adapters(session.run.prep.model, session.adapter_path / f"{step:07d}_adapters.safetensors")
    return "done"


def _objective_figures(extra: dict, figures: dict | None) -> str:
    """An objective's figures for the progress line (DPO / ORPO: reward margin and accuracy; GRPO: reward, KL)."""
    if figures and "reward_mean" in figures:
        return (f" | reward {figures['reward_mean']:.3f} ± {figures['reward_std']:.3f} | kl {extra.get('kl', 0.0):.4f}"
                f" | generate {figures['generate_s']:.1f} s")
    if "reward_margin" not in extra:
        return ""
    return f" | margin {extra['reward_margin']:.3f} | acc {extra['reward_accuracy']:.2f}"
