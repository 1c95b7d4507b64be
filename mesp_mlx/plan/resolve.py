"""The run's plan: what a run resolves before step 1, returned as an object the engine executes.

    budget check  the leanest plan's predicted peak against the budget, and its predicted process footprint against the
                  footprint limit; over either, a refusal naming the settings that fit
    speed levers  the fastest combination that fits the room the budget (and the footprint limit) leaves above the
                  leanest peak (speed.py)
    RunPlan       the user's settings with every "auto" resolved (sequence length, LoRA keys, lanes, levers), beside
                  the prediction; the user's config is never written into

`mesp-mlx train` and `mesp-mlx plan` both come here through run/prepare.py, so both plan for the same data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .footprint import release_free_heap
from .lcsb_advice import advice_lines
from .memory import PlanResult, fitting_advice, mlx_room_mb, predict, reserve_generation
from .speed import HEADROOM, LEVERS, LeverCosts, Levers, fastest, given_levers, plan_levers


class OverBudget(ValueError):
    """A run predicted not to fit its budget, refused before anything is written (exit 2 from the CLI)."""

    def __init__(self, message: str, prediction: PlanResult, budget_mb: float | None, advice: str):
        super().__init__(message)
        self.prediction, self.budget_mb, self.advice = prediction, budget_mb, advice


@dataclass(frozen=True)
class RunPlan:
    """What a run executes. `settings` is a copy of the user's TrainConfig with every value the run decides filled
    in; the prediction (the leanest plan by component, the levers' measured costs) is kept beside it."""
    settings: object  # a TrainConfig, resolved
    budget_mb: float | None
    budget_text: str
    seq_len: int  # the longest batch the levers were planned for (at most max_seq_length)
    levers: Levers
    lean: PlanResult | None = None  # None when every lever was given (nothing was probed)
    costs: LeverCosts | None = None
    planned_mb: float | None = None  # the budget the levers were chosen for (the default when none was given)
    given: dict = dataclasses.field(default_factory=dict)  # the levers the user set (the rest were chosen)
    footprint_limit_mb: float | None = None  # the process footprint's limit (the governor's), None: none
    data_mb: float = 0.0  # the tokenized data's host memory (numpy, not MLX: outside the MLX peak)

    @property
    def predicted_step_s(self) -> float | None:
        return self.costs.step_s(self.levers) if self.costs is not None else None

    @property
    def predicted_peak_mb(self) -> float | None:
        return self.lean.peak_mb + self.costs.extra_mb(self.levers) if self.costs is not None else None

    @property
    def predicted_footprint_mb(self) -> float | None:
        """The process footprint with the chosen levers: outside MLX (as measured at planning) + their peak."""
        if self.costs is None or self.lean.outside_mlx_mb is None:
            return None
        return self.lean.outside_mlx_mb + self.predicted_peak_mb

    def lever_note(self) -> str:
        if self.costs is None:
            return "as set"
        if self.budget_mb is None and self.footprint_limit_mb is None:
            under = "the default budget"
        else:
            under = "the budget" if self.planned_mb == self.budget_mb else "the room the footprint limit leaves MLX"
        footprint = f", process footprint {self.predicted_footprint_mb:.1f} MB" \
            if self.predicted_footprint_mb is not None else ""
        return (f"fastest under {under} of {self.planned_mb:.0f} MB: predicted {self.predicted_step_s:.2f} s per "
                f"step, peak {self.predicted_peak_mb:.1f} MB{footprint}")

    def record(self) -> dict:
        """The prediction as adapter_config.json records it, beside the settings it chose."""
        if self.costs is None:
            return {}
        return {"predicted_step_s": self.predicted_step_s, "predicted_peak_mb": self.predicted_peak_mb,
                "predicted_footprint_mb": self.predicted_footprint_mb}


def check_budget(cfg, plan: PlanResult, budget_mb: float | None, budget_text: str, prepare, log) -> None:
    """`plan`, the leanest plan of `cfg`, against the budget (None: none) and its footprint limit; over either,
    OverBudget with the first settings that fit (`prepare` loads the model for each candidate setting)."""
    fits = budget_mb is None or plan.peak_mb <= budget_mb
    if budget_mb is not None:
        log(f"[mesp-mlx] plan: predicted peak {plan.peak_mb:.1f} MB {'within' if fits else 'is over'} {budget_text}")
    footprint = plan.footprint_limit_mb is not None and plan.footprint_mb is not None
    if footprint:
        log(f"[mesp-mlx] plan: predicted process footprint {plan.footprint_mb:.1f} MB ({plan.outside_mlx_mb:.1f} MB "
            f"outside MLX + the peak) {'within' if plan.footprint_fits() else 'is over'} the footprint limit "
            f"({plan.footprint_text})")
    if fits and plan.footprint_fits():
        return
    if not fits:
        what = f"{plan.peak_mb:.1f} MB, over the budget ({budget_text})"
    else:
        what = (f"a process footprint of {plan.footprint_mb:.1f} MB ({plan.outside_mlx_mb:.1f} MB outside MLX + the "
                f"MLX peak), over the footprint limit ({plan.footprint_text})")
    if footprint and plan.outside_mlx_mb >= plan.footprint_limit_mb:
        advice = (f"no setting of the run fits: the process outside MLX ({plan.outside_mlx_mb:.1f} MB: Python, the "
                  "libraries, the tokenizer) is already over the footprint limit")
    else:
        advice = fitting_advice(cfg, budget_mb, prepare)
    raise OverBudget(f"this run is predicted to need {what}:\n"
                     + "\n".join(plan.lines(budget_mb)) + f"\n{advice}\n(--skip-plan runs it anyway; the governor then "
                     "stops it at the first block that goes over)", plan, budget_mb, advice)


def plan_run(settings, prep, method, budget_mb: float | None, budget_text: str, seq_len: int,
             footprint_limit_mb: float | None = None) -> RunPlan:
    """The speed levers of a prepared run: as set, or the fastest the budget (or the default) leaves room for, the
    footprint limit's room for MLX included, planned for its longest batch. Returns the RunPlan whose settings hold
    the chosen levers."""
    fixed = given_levers({k: getattr(settings, k) for k in LEVERS}, len(prep.parts.layers))
    seq_len = min(seq_len, settings.max_seq_length)
    if len(fixed) == len(LEVERS):
        levers, lean, costs, planned = Levers(**fixed), None, None, None
    else:  # the leanest plan's peak and the levers' costs, at the longest batch
        at = dataclasses.replace(settings, max_seq_length=seq_len)
        lean = predict(at, prep)
        room = mlx_room_mb(budget_mb, lean)
        # GRPO: its rows decoded together first (within the levers' headroom), the levers take what is left
        reserve_generation(lean, None if room is None else HEADROOM * room)
        levers, costs, planned = plan_levers(at, prep, method, room, lean)
        release_free_heap()  # the probes' freed blocks in the C heap: not the run's footprint
    resolved = dataclasses.replace(settings, **{k: getattr(levers, k) for k in LEVERS})
    return RunPlan(resolved, budget_mb, budget_text, seq_len, levers, lean, costs, planned, fixed, footprint_limit_mb)


def lcsb_or_mesp(cfg, costs: LeverCosts, room_mb: float, given: dict) -> list[str]:
    """MeSP's and LCSB's (1/4, 1/2 and the run's fraction) predicted step times, each with its own fastest levers in
    the same room, beside the study's held-out gaps (lcsb_advice.py)."""
    every = costs.backward_blocks / (cfg.lcsb_fraction if cfg.method == "lcsb" else 1.0)
    step_s = {}
    for fraction in sorted({1.0, 0.25, 0.5, cfg.lcsb_fraction if cfg.method == "lcsb" else 0.25}):
        c = dataclasses.replace(costs, backward_blocks=fraction * every)
        step_s[fraction] = c.step_s(fastest(c, room_mb, given))
    return advice_lines(cfg, step_s)


def plan_lines(plan: RunPlan) -> list[str]:
    """`mesp-mlx plan`'s report of a resolved run: the leanest plan by component, the levers' costs and choice, and
    MeSP or LCSB."""
    s = plan.settings
    out = [f"plan for {s.method}, seq {plan.seq_len - 1} (the data's longest batch; --max-seq-length "
           f"{s.max_seq_length}), batch {s.batch_size}, stream weights {s.stream_weights}, checkpoints "
           f"{s.checkpoint_storage} ({plan.budget_text}):"]
    data = [(f"  {'data':<15}{plan.data_mb:9.1f} MB   the tokenized examples, in host memory: not in the MLX peak "
             "(in the process outside MLX)")] if plan.data_mb else []
    if plan.lean is None:
        return out + data + [f"  speed levers as set: {plan.levers.flags()} (nothing to choose, nothing probed)"]
    out += plan.lean.lines(plan.budget_mb) + data
    if plan.budget_mb is None and plan.footprint_limit_mb is None:
        note = " (no budget given: a quarter of this machine RAM)"
    else:
        note = " (what the footprint limit leaves MLX)" if plan.planned_mb != plan.budget_mb else ""
    out.append(f"speed levers, the fastest within {HEADROOM:.0%} of {plan.planned_mb:.0f} MB{note}:")
    out += plan.costs.lines(plan.levers)
    footprint = f" (process footprint {plan.predicted_footprint_mb:.1f} MB)" \
        if plan.predicted_footprint_mb is not None else ""
    out.append(f"  predicted peak with them: {plan.predicted_peak_mb:.1f} MB{footprint}   predicted step "
               f"{plan.predicted_step_s:.2f} s   flags: {plan.levers.flags()}")
    if s.method in ("mesp", "lcsb"):
        out += lcsb_or_mesp(s, plan.costs, HEADROOM * plan.planned_mb - plan.lean.peak_mb, plan.given)
    return out
