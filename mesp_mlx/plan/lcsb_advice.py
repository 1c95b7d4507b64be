"""LCSB or MeSP for this run: the planner's step times beside the held-out losses measured on real text.

LCSB back-propagates a share f of the blocks per step, so a step costs less (how much less depends on the model and
the shapes: the planner times it on this run's probe block), but each step's gradient is partial. Whether the cheaper
steps are worth it is a question of loss per minute, which only a training run answers; `lcsb_study.json` holds the
curves `tools/study_gradients.py` measured (SmolLM2-135M on Shakespeare, held-out loss along the way, MeSP and LCSB
from the same start on the same batches) at several learning rates x LoRA scales.

For a run, the study row nearest its setting is used. With Adam-like optimizers a LoRA update's effect on the layer
output grows with lr x scale (Adam's step in A and B is ~lr whatever the gradient's size, and the scale multiplies
B A x), so rows are matched on log(lr x scale). The comparison at equal minutes then combines the two sources:
LCSB's held-out loss after the study's N steps against MeSP's after N / s steps, where s is this run's predicted
speed-up — the minutes LCSB's N steps take here (MeSP's curve interpolated between its evaluations).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STUDY = Path(__file__).with_name("lcsb_study.json")
NEAR = 3.0  # a study row speaks for a run whose lr x scale is within this factor of its own
ADAM_LIKE = ("adam", "adamw")


@dataclass
class StudyRow:
    """One measured pair: MeSP and one LCSB variant from the same start, at one lr and LoRA scale."""
    lr: float
    scale: float
    optimizer: str
    fraction: float
    schedule: str
    skipped: str
    steps: list  # evaluation steps, 0 first
    mesp: list  # MeSP's held-out loss at those steps
    lcsb: list  # LCSB's
    speedup: float  # MeSP's seconds per step / LCSB's, in the study
    source: str = ""

    @property
    def effective_lr(self) -> float:
        return self.lr * self.scale

    def diverged(self) -> bool:
        """LCSB's held-out loss ended above where it started (or is not finite): it did not train. Ending above MeSP
        while still going down is not divergence: that row's gaps say how far behind it is."""
        return not math.isfinite(self.lcsb[-1]) or self.lcsb[-1] > self.lcsb[0]

    def mesp_at(self, step: float) -> float:
        """MeSP's held-out loss after `step` steps, linear between the evaluations."""
        return float(np.interp(step, self.steps, self.mesp))  # past the last evaluation: the last

    def equal_minutes_gap(self, speedup: float) -> float:
        """LCSB's final held-out loss relative to MeSP's after the minutes LCSB's steps take at `speedup` (fraction:
        +0.05 = LCSB 5 % worse)."""
        at = self.mesp_at(self.steps[-1] / max(speedup, 1e-9))
        return (self.lcsb[-1] - at) / at

    def same_steps_gap(self) -> float:
        return (self.lcsb[-1] - self.mesp[-1]) / self.mesp[-1]


def load_study(path: Path = STUDY) -> list[StudyRow]:
    if not path.is_file():
        return []
    return [StudyRow(**row) for row in json.loads(path.read_text())["rows"]]


def nearest(rows: list[StudyRow], lr: float, scale: float, fraction: float, schedule: str,
            skipped: str = "freeze") -> StudyRow | None:
    """The row of this fraction, schedule and skipped-block state (falling back to what was studied: the cyclic
    schedule, frozen skipped blocks) whose lr x scale is nearest the run's, within a factor NEAR (None: not measured
    near this setting)."""
    def distance(r: StudyRow) -> float:
        return abs(math.log(r.effective_lr) - math.log(lr * scale))

    near = [r for r in rows if distance(r) <= math.log(NEAR)]
    for want in dict.fromkeys([(schedule, skipped), (schedule, "freeze"), ("cyclic", skipped), ("cyclic", "freeze")]):
        same = [r for r in near if abs(r.fraction - fraction) < 1e-9 and (r.schedule, r.skipped) == want]
        if same:
            return min(same, key=distance)
    return None


def advice_lines(cfg, step_s: dict, rows: list[StudyRow] | None = None) -> list[str]:
    """Lines for `mesp-mlx plan`: per LCSB fraction its predicted step time and speed-up over MeSP for this run, the
    study's held-out gap after the same steps and at equal minutes, and a verdict. step_s: {fraction: seconds},
    1.0 = MeSP (every block back-propagated)."""
    rows = load_study() if rows is None else rows
    lr, scale = cfg.learning_rate, float(cfg.lora_parameters.get("scale", 20.0))
    out = [f"LCSB or MeSP for this run (step times: this run's probes; held-out losses: {STUDY.name}, SmolLM2-135M on "
           f"Shakespeare, the row nearest lr x scale = {lr * scale:.0e}):",
           f"  {'method':<30}{'s/step':>8}{'speed-up':>10}   held-out vs MeSP: same steps / equal minutes"]
    out.append(f"  {'mesp':<30}{step_s[1.0]:8.3f}{'1.00x':>10}")
    if cfg.optimizer not in ADAM_LIKE:
        out.append(f"  (the study measured Adam-like optimizers; {cfg.optimizer} is not measured — compare on your data)")
    verdicts = []
    schedule, skipped = (cfg.lcsb_schedule, cfg.lcsb_skipped) if cfg.method == "lcsb" else ("cyclic", "freeze")
    for fraction, seconds in sorted(step_s.items()):
        if fraction == 1.0:
            continue
        speedup = step_s[1.0] / seconds
        row = nearest(rows, lr, scale, fraction, schedule, skipped) if cfg.optimizer in ADAM_LIKE else None
        name = f"lcsb {fraction:g} {row.schedule if row else schedule}" + (" momentum" if row and
                                                                           row.skipped == "momentum" else "")
        if row is None:
            out.append(f"  {name:<30}{seconds:8.3f}{speedup:9.2f}x   not measured at this setting")
            continue
        where = f"(study at lr {row.lr:g}, scale {row.scale:g}, {row.steps[-1]} steps)"
        if row.diverged():
            out.append(f"  {name:<30}{seconds:8.3f}{speedup:9.2f}x   diverged: {row.lcsb[-1]:.3f} vs MeSP "
                       f"{row.mesp[-1]:.3f} {where}")
            verdicts.append((name, False, row))
            continue
        equal = row.equal_minutes_gap(speedup)
        out.append(f"  {name:<30}{seconds:8.3f}{speedup:9.2f}x   {100 * row.same_steps_gap():+.1f} % / "
                   f"{100 * equal:+.1f} % {where}")
        verdicts.append((name, equal < 0, row))
    unstable = next((r for _, _, r in verdicts if r.mesp[-1] > r.mesp[0]), None)
    winners = [name for name, wins, _ in verdicts if wins]
    if unstable is not None:
        out.append(f"  verdict: too hot — at this lr x scale the study's MeSP diverged as well (held-out "
                   f"{unstable.mesp[0]:.3f} -> {unstable.mesp[-1]:.3f}); lower the learning rate or the LoRA scale "
                   "before choosing a method")
    elif winners:
        out.append(f"  verdict: LCSB is worth it here — {', '.join(winners)} ends below MeSP's held-out loss at "
                   "equal minutes (--method lcsb with that fraction)")
    elif verdicts:
        out.append("  verdict: MeSP is the better use of the same minutes — LCSB's cheaper steps do not make up for "
                   "its partial gradients at this setting")
    return out
