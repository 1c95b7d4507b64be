"""Per-step records: metrics.jsonl beside the adapters (one JSON object per step) and a PNG of loss and peak memory."""

from __future__ import annotations

import json
from pathlib import Path

from ..io import WriteError, atomic_write


class MetricsLog:
    REQUIRED = ("step", "loss", "tokens", "step_s", "peak_mb", "active_mb")

    def __init__(self, path: str | Path | None, keep_until: int | None = None):
        """A new log, or (keep_until=S, for a resumed run) the existing one cut back to its steps <= S: a run killed
        after its last save logged steps that the resumed run does again (and a kill may have cut the last line).
        path None: records kept in memory only (a distributed run's ranks other than 0)."""
        self.records: list[dict] = []
        self.path = Path(path) if path is not None else None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until is not None and self.path.exists():
            self.records = [r for r in self.read(self.path) if r["step"] <= keep_until]
        lines = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"), what="the metrics")

    def log(self, record: dict) -> None:
        missing = [k for k in self.REQUIRED if k not in record]
        if missing:
            raise KeyError(f"metrics record lacks {missing}")
        self.records.append(record)
        if self.path is None:
            return
        try:  # an append: a kill or a full disk can cut only this last line, which read() then drops
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        except OSError as e:
            raise WriteError(self.path, "the metrics", e.strerror or str(e)) from None

    @staticmethod
    def read(path: str | Path) -> list[dict]:
        """The step records of a log; a line that is not one (cut by a kill, garbled on disk) is skipped, and every
        whole line before and after it is kept."""
        records = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    records.append(record)
        return records


def plot_metrics(records: list[dict], out_png: str | Path, title: str = "") -> Path:
    import matplotlib  # imported when a plot is drawn: slow to import, and the backend is chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use: see the line above

    steps = [r["step"] for r in records]
    series = objective_series(records)
    fig, axes = plt.subplots(3 if series else 2, 1, figsize=(7, 8.5 if series else 6), sharex=True)
    ax1, ax2 = axes[0], axes[-1]
    if series:  # the objective's own figures between the loss and the memory
        for label, points in series.items():
            axes[1].plot(*zip(*points), marker="o" if "held-out" not in label else "s", ms=3, label=label)
        axes[1].set_ylabel("reward")
        axes[1].legend()
        axes[1].grid(alpha=0.3)
    ax1.plot(steps, [r["loss"] for r in records], marker="o", ms=3, label="train (step batch)")
    val = [(0 if k == "val_loss_at_start" else r["step"], r[k]) for r in records
           for k in ("val_loss_at_start", "val_loss") if r.get(k) is not None]
    if val:
        ax1.plot(*zip(*sorted(val)), marker="s", ms=4, label="validation")
        ax1.legend()
    ax1.set_ylabel("loss")
    ax1.grid(alpha=0.3)
    lrs = [(r["step"], r["learning_rate"]) for r in records if r.get("learning_rate") is not None]
    if lrs:  # the learning rate of every step, on its own axis
        ax_lr = ax1.twinx()
        ax_lr.plot(*zip(*lrs), color="gray", ls="--", lw=1)
        ax_lr.set_ylabel("learning rate (dashed)")
    ax2.plot(steps, [r["peak_mb"] for r in records], marker="o", ms=3, label="MLX peak (step)")
    ax2.plot(steps, [r["active_mb"] for r in records], marker=".", ms=3, label="MLX active (end of step)")
    if any(r.get("footprint_mb") is not None for r in records):  # plan/footprint.py: what a phone counts
        ax2.plot(steps, [r["footprint_mb"] if r.get("footprint_mb") is not None else float("nan") for r in records],
                 marker="^", ms=3, label="process footprint (step)")
    ax2.set_ylabel("MB")
    ax2.set_xlabel("step")
    ax2.legend()
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), suffix=".png", what="a plot")
    plt.close(fig)
    return Path(out_png)


OBJECTIVE_FIGURES = {  # metrics.jsonl key -> its label in the plot (DPO / ORPO, GRPO)
    "reward_margin": "reward margin (chosen - rejected)", "reward_accuracy": "reward accuracy",
    "reward_mean": "reward (sampled completions)", "val_reward": "held-out reward (greedy)",
}


def objective_series(records: list[dict]) -> dict:
    """{label: [(step, value)]} of the figures an objective recorded (none for SFT); the held-out reward before
    step 1 is at step 0."""
    series = {}
    for key, label in OBJECTIVE_FIGURES.items():
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if key == "val_reward" and records and records[0].get("val_reward_at_start") is not None:
            points.insert(0, (0, records[0]["val_reward_at_start"]))
        if points:
            series[label] = points
    return series


def block_peaks(block_peak_mb: dict, n_blocks: int) -> dict:
    """StepStats.block_peak_mb {(phase, i): MB} -> {phase: [MB or None per block]} (JSON-friendly)."""
    out = {}
    for (phase, i), mb in block_peak_mb.items():
        out.setdefault(phase, [None] * n_blocks)[i] = mb
    return out


def plot_block_memory(record: dict, out_png: str | Path, budget_mb: float | None = None, title: str = "") -> Path:
    """MLX peak per block over one step: forward blocks, the loss, backward blocks (in the order they run)."""
    import matplotlib  # imported when a plot is drawn: slow to import, and the backend is chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use: see the line above

    fwd = record["block_peak_mb"].get("forward", [])
    bwd = record["block_peak_mb"].get("backward", [])
    n = len(fwd)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(range(n), fwd, marker="o", ms=3, label="forward, block i")
    ax.plot([n], [record["phase_peak_mb"].get("loss", 0.0)], marker="s", ms=6, ls="", label="loss")
    xs = [n + 1 + (n - 1 - i) for i in range(n) if bwd and bwd[i] is not None]
    ys = [bwd[i] for i in range(n) if bwd and bwd[i] is not None]
    ax.plot(xs, ys, marker="o", ms=3, label="backward, block n-1 ... 0")
    if budget_mb:
        ax.axhline(budget_mb, color="red", ls="--", label=f"budget {budget_mb:.0f} MB")
    ax.set_xlabel("order within the step")
    ax.set_ylabel("MLX peak MB")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"memory per block, step {record['step']}")
    fig.tight_layout()
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), suffix=".png", what="a plot")
    plt.close(fig)
    return Path(out_png)
