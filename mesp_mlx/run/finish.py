"""The run's last stage: the final save, the emulation report, the test loss, the plots and the demo's answers."""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx_lm import generate

from ..plan.footprint import SOURCE
from ..plan.governor import BudgetExceeded
from . import heldout
from .metrics import plot_block_memory, plot_metrics
from .prepare import Prepared
from .session import Session
from .signals import StopSignals


@dataclass
class TrainResult:
    adapter_path: Path
    records: list
    answers_before: list
    answers_after: list
    status: str = "done"  # done | interrupted | nonfinite | over_budget
    test_loss: float | None = None


def answer(model, tokenizer, prompt: str, max_tokens: int) -> str:
    text = prompt
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    model.eval()
    out = generate(model, tokenizer, text, max_tokens=max_tokens, verbose=False)
    model.train()
    return out.strip()


def show_answers(prep: Prepared, prompts: list, max_tokens: int, label: str, log) -> list[str]:
    """The model's answers to the demo prompts (before or after training)."""
    answers = []
    for p in prompts:
        a = answer(prep.model, prep.tokenizer, p, max_tokens)
        answers.append(a)
        log(f"  [{label}] Q: {p}\n  [{label}] A: {a}")
    if prep.streamer is not None:
        prep.streamer.release_all()
    mx.clear_cache()
    return answers


def emulation_report(records: list, budget_mb: float | None, budget_text: str, log,
                     footprint_limit_mb: float | None = None) -> None:
    """Budget, MLX peak, headroom and per-phase peaks over the run, the process footprint's peak against its limit,
    and the process's max resident set size beside."""
    peak = max(r["peak_mb"] for r in records)
    phases: dict = {}
    for r in records:
        for k, v in r["phase_peak_mb"].items():
            phases[k] = max(phases.get(k, 0.0), v)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    footprints = [r["footprint_mb"] for r in records if r.get("footprint_mb") is not None]
    footprint = "" if not footprints else f" | process footprint peak {max(footprints):.1f} MB ({SOURCE}" + \
        (f"; limit {footprint_limit_mb:.0f} MB, headroom {footprint_limit_mb - max(footprints):.1f} MB)"
         if footprint_limit_mb is not None else ")")
    budget = f"budget {budget_mb:.0f} MB ({budget_text}) | " if budget_mb is not None else ""
    headroom = f" | headroom {budget_mb - peak:.1f} MB" if budget_mb is not None else ""
    log(f"[mesp-mlx] memory: {budget}MLX peak {peak:.1f} MB{headroom} | phases " +
        ", ".join(f"{k} {v:.1f}" for k, v in phases.items() if v) + footprint +
        f" | process max RSS {rss_mb:.0f} MB (Python, libraries and file pages included)")


def test_loss(session: Session, log) -> tuple[float | None, str]:
    """--test: the loss on test.jsonl after training (the governor's per-block check still applies)."""
    s, test = session.run.settings, session.run.splits.get("test")
    if test is None or not len(test):
        log(f"[mesp-mlx] WARNING: --test: {s.data} has no test.jsonl; nothing to evaluate")
        return None, "done"
    try:
        if s.train_mode == "grpo":  # GRPO's test figure: the mean reward of greedy completions of test.jsonl
            reward, n = heldout.evaluate_rewards(session.run, test, s.test_batches)
            log(f"[mesp-mlx] test reward {reward:.4f} | {n} prompts, greedy")
            return reward, "done"
        loss, ntoks = heldout.evaluate(session.engine, session.run.prep.model, test, s.batch_size, s.max_seq_length,
                                    s.test_batches)
    except BudgetExceeded as e:
        log(f"[mesp-mlx] ERROR: --test: {e}; the test evaluation stopped as the device would stop the app (the "
            f"trained adapters are saved in {session.adapter_file})")
        return None, "over_budget"
    log(f"[mesp-mlx] test loss {loss:.4f} | test ppl {math.exp(min(loss, 50)):.2f} | {ntoks} tokens")
    return loss, "done"


def finish(session: Session, status: str, stop: StopSignals, answers_before: list, log) -> TrainResult:
    """After the loop: report the memory against the budget; when the loop ran to the end, save, evaluate on the test
    set, plot and answer the demo prompts."""
    s, run, records = session.run.settings, session.run, session.metrics.records
    if records and (run.plan.budget_mb is not None or run.plan.footprint_limit_mb is not None):
        emulation_report(records, run.plan.budget_mb, run.plan.budget_text, log, run.plan.footprint_limit_mb)
    if status != "done":
        return TrainResult(session.adapter_path, records, answers_before, [], status)
    session.save(s.iters)
    log(f"[mesp-mlx] saved adapters to {session.adapter_file}")
    if session.ranks.size == 1:
        stop.steps_end()  # nothing left to save: a first signal from here stops at once
    if stop.received is not None:  # a signal during the last step: the run is complete and saved, stop here
        return TrainResult(session.adapter_path, records, answers_before, [], stop.status)
    loss = None
    if s.test:
        loss, status = test_loss(session, log)
    if s.plot and session.writer:
        png = plot_metrics(records, session.adapter_path / "metrics.png", f"{s.method} on {run.prep.path.name}")
        blocks = plot_block_memory(records[-1], session.adapter_path / "memory_blocks.png", run.plan.budget_mb)
        log(f"[mesp-mlx] plots: {png}, {blocks}")
    answers_after = show_answers(run.prep, s.demo_prompts, s.demo_max_tokens, "after", log) \
        if s.demo_prompts and session.writer else []
    return TrainResult(session.adapter_path, records, answers_before, answers_after, status, loss)
