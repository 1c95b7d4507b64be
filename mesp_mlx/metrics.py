"""Per-step records: metrics.jsonl beside the adapters (one JSON object per step) and a PNG of loss and peak memory."""

from __future__ import annotations

import json
from pathlib import Path

from .io import atomic_write


class MetricsLog:
    REQUIRED = ("step", "loss", "tokens", "step_s", "peak_mb", "active_mb")

    def __init__(self, path: str | Path, keep_until: int | None = None):
        """A new log, or (keep_until=S, for a resumed run) the existing one cut back to its steps <= S: a run killed
        after its last save logged steps that the resumed run does again (and a kill may have cut the last line)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        if keep_until is not None and self.path.exists():
            self.records = [r for r in self.read(self.path) if r["step"] <= keep_until]
        lines = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(lines))

    def log(self, record: dict) -> None:
        missing = [k for k in self.REQUIRED if k not in record]
        if missing:
            raise KeyError(f"metrics record lacks {missing}")
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    @staticmethod
    def read(path: str | Path) -> list[dict]:
        records = []
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a kill: everything before it is whole
        return records


def plot_metrics(records: list[dict], out_png: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(steps, [r["loss"] for r in records], marker="o", ms=3)
    ax1.set_ylabel("loss")
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [r["peak_mb"] for r in records], marker="o", ms=3, label="MLX peak (step)")
    ax2.plot(steps, [r["active_mb"] for r in records], marker=".", ms=3, label="MLX active (end of step)")
    ax2.set_ylabel("MB")
    ax2.set_xlabel("step")
    ax2.legend()
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from .io import atomic_write

    atomic_write(out_png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), suffix=".png")
    plt.close(fig)
    return Path(out_png)
