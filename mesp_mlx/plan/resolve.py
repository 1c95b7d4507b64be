"""The run's plan: what a run resolves before step 1, returned as an object the engine executes.

    budget check  the leanest plan's predicted peak against the budget; over it, a refusal naming the settings that fit
    speed levers  the fastest combination that fits the room the budget leaves above the leanest peak (speed.py)
    RunPlan       the user's settings with every "auto" resolved (sequence length, LoRA keys, lanes, levers), beside
                  the prediction; the user's config is never written into

`mesp-mlx train` and `mesp-mlx plan` both come here through run/prepare.py, so both plan for the same data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .lcsb_advice import advice_lines
from .memory import PlanResult, fitting_advice, predict
from .speed import HEADROOM, LEVERS, LeverCosts, Levers, fastest, given_levers, plan_levers


class OverBudget(ValueError):
    """A run predicted not to fit its budget, refused before anything is written (exit 2 from the CLI)."""

    def __init__(self, message: str, prediction: PlanResult, budget_mb: float, advice: str):
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

    @property
    def predicted_step_s(self) -> float | None:
        return self.costs.step_s(self.levers) if self.costs is not None else None

    @property
    def predicted_peak_mb(self) -> float | None:
        return self.lean.peak_mb + self.costs.extra_mb(self.levers) if self.costs is not None else None

    def lever_note(self) -> str:
        if self.costs is None:
            return "as set"
        under = "the budget" if self.budget_mb is not None else "the default budget"
        return (f"fastest under {under} of {self.planned_mb:.0f} MB: predicted {self.predicted_step_s:.2f} s per "
                f"step, peak {self.predicted_peak_mb:.1f} MB")

    def record(self) -> dict:
        """The prediction as adapter_config.json records it, beside the settings it chose."""
        if self.costs is None:
            return {}
        return {"predicted_step_s": self.predicted_step_s, "predicted_peak_mb": self.predicted_peak_mb}


def check_budget(cfg, plan: PlanResult, budget_mb: float, budget_text: str, prepare, log) -> None:
    """`plan`, the leanest plan of `cfg`, against the budget; over it, OverBudget with the first settings that fit
    (`prepare` loads the model for each candidate setting)."""
    fits = plan.peak_mb <= budget_mb
    log(f"[mesp-mlx] plan: predicted peak {plan.peak_mb:.1f} MB {'within' if fits else 'is over'} {budget_text}")
    if fits:
        return
    advice = fitting_advice(cfg, budget_mb, prepare)
    raise OverBudget(f"this run is predicted to need {plan.peak_mb:.1f} MB, over the budget ({budget_text}):\n"
                     + "\n".join(plan.lines(budget_mb)) + f"\n{advice}\n(--skip-plan runs it anyway; the governor then "
                     "stops it at the first block that goes over)", plan, budget_mb, advice)


def plan_run(settings, prep, method, budget_mb: float | None, budget_text: str, seq_len: int) -> RunPlan:
    """The speed levers of a prepared run: as set, or the fastest the budget (or the default) leaves room for,
    planned for its longest batch. Returns the RunPlan whose settings hold the chosen levers."""
    fixed = given_levers({k: getattr(settings, k) for k in LEVERS}, len(prep.parts.layers))
    seq_len = min(seq_len, settings.max_seq_length)
    if len(fixed) == len(LEVERS):
        levers, lean, costs, planned = Levers(**fixed), None, None, None
    else:  # the leanest plan's peak and the levers' costs, at the longest batch
        at = dataclasses.replace(settings, max_seq_length=seq_len)
        lean = predict(at, prep)
        levers, costs, planned = plan_levers(at, prep, method, budget_mb, lean)
    resolved = dataclasses.replace(settings, **{k: getattr(levers, k) for k in LEVERS})
    return RunPlan(resolved, budget_mb, budget_text, seq_len, levers, lean, costs, planned, fixed)


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
    if plan.lean is None:
        return out + [f"  speed levers as set: {plan.levers.flags()} (nothing to choose, nothing probed)"]
    out += plan.lean.lines(plan.budget_mb)
    out.append(f"speed levers, the fastest within {HEADROOM:.0%} of {plan.planned_mb:.0f} MB"
               f"{'' if plan.budget_mb is not None else ' (no budget given: a quarter of this machine RAM)'}:")
    out += plan.costs.lines(plan.levers)
    out.append(f"  predicted peak with them: {plan.predicted_peak_mb:.1f} MB   predicted step "
               f"{plan.predicted_step_s:.2f} s   flags: {plan.levers.flags()}")
    if s.method in ("mesp", "lcsb"):
        out += lcsb_or_mesp(s, plan.costs, HEADROOM * plan.planned_mb - plan.lean.peak_mb, plan.given)
    return out
