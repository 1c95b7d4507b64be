"""The measured figures of README.md and docs/, regenerated from the commands that make them.

A doc holds a generated block between two markers:

    <!-- figures:BLOCK -->
    ...written by this script: a line naming the command, the commit and the date, then the figures...
    <!-- /figures:BLOCK -->

Each block renders a snapshot kept in docs/figures/MEASUREMENT/ (the command's output files and meta.json: the
command, the commit it ran at, the date, the machine). So:

    python tools/docs_figures.py                     rewrite every block from the snapshots (seconds; no measuring)
    python tools/docs_figures.py --check             exit 1 if a block differs from its snapshot (the tests run it)
    python tools/docs_figures.py --measure demo,aggregation
                                                     run those measurements' commands, snapshot, rewrite
    python tools/docs_figures.py --list              the measurements, their commands and what they cost here

`make docs-figures` is the last line; `make docs-figures MEASURE=cheap` (or a comma list, or all) the others. A figure
in the docs outside a block says which command and commit it came from and that this script does not regenerate it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
PY = ".venv/bin/python"


@dataclass(frozen=True)
class Measurement:
    command: str  # run from the repository root with bash
    outputs: tuple  # files (relative to the root) copied into the snapshot; "stdout" keeps the printed text
    cost: str  # what it takes on this project's 2-core box
    cheap: bool = False  # part of --measure cheap


MEASUREMENTS = {
    "aggregation": Measurement(f"{PY} tools/federated_aggregation_error.py", ("stdout",), "seconds", cheap=True),
    "distributed": Measurement(f"{PY} tools/bench_distributed.py --shape qwen2.5-0.5b --steps 20", ("stdout",),
                               "1-2 min", cheap=True),
    "plan-advice": Measurement(f"{PY} -m mesp_mlx.cli make-data --out runs/shakespeare --corpus shakespeare && "
                               f"{PY} -m mesp_mlx.cli plan --data runs/shakespeare --method lcsb --lcsb-schedule "
                               "importance --max-seq-length 257 --batch-size 1 --optimizer adamw --learning-rate 1e-5",
                               ("stdout",), "under 1 min", cheap=True),
    "demo": Measurement("make demo", ("stdout", "runs/smollm2_demo/metrics.jsonl", "runs/smollm2_demo/adapter_config.json"),
                        "3 min", cheap=True),
    "bench-speed": Measurement(f"PYTHONPATH=. {PY} tools/bench_speed.py --steps 4 --budgets tightest,1024,2048 "
                               "--skip-4bit", ("tools/out/bench_speed.md", "tools/out/bench_speed.json"), "7-10 min"),
    "bench-family": Measurement(f"{PY} tools/bench.py --fresh --tables 4,g --steps 2 --repeat 2 --only ours",
                                ("tools/out/bench.md", "tools/out/bench.json"), "20-30 min"),
    "personalize": Measurement(f"{PY} tools/personalize_demo.py --seeds 0",
                               ("tools/out/personalize.md", "tools/out/personalize.json"), "35 min (a seed)"),
}


def snapshot_dir(measurement: str) -> Path:
    return FIGURES / measurement


def meta_of(measurement: str) -> dict:
    path = snapshot_dir(measurement) / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def read(measurement: str, name: str) -> str:
    return (snapshot_dir(measurement) / Path(name).name).read_text()


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def measure(name: str) -> None:
    m = MEASUREMENTS[name]
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "mesp_mlx", "tools"))
    print(f"[docs-figures] {name}: {m.command}  ({m.cost})", flush=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    proc = subprocess.run(["bash", "-c", m.command], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"[docs-figures] {name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    out = snapshot_dir(name)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for item in m.outputs:
        if item == "stdout":
            (out / "stdout.txt").write_text(proc.stdout)
        else:
            shutil.copy(ROOT / item, out / Path(item).name)
    gemm = re.search(r"([\d.]+) GFLOP/s", proc.stdout)
    meta = {"command": m.command, "commit": commit + ("+changes" if dirty else ""), "date": started.date().isoformat(),
            "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()),
            "gemm_gflops": float(gemm.group(1)) if gemm else None}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def header(measurement: str) -> str:
    meta = meta_of(measurement)
    return (f"*Measured by `{meta['command']}` at commit {meta['commit']} on {meta['date']} (this project's 2-core "
            f"Linux box, OpenBLAS); `make docs-figures MEASURE={measurement}` measures it again.*")


# ---- renderers: snapshot -> markdown (each returns the block's body, the header line included) ----

def _stdout(measurement: str, start: str | None = None, stop: str | None = None) -> str:
    lines = read(measurement, "stdout.txt").splitlines()
    if start is not None:
        lines = lines[next(i for i, line in enumerate(lines) if line.startswith(start)):]
    if stop is not None:
        lines = lines[:next((i for i, line in enumerate(lines) if line.startswith(stop)), len(lines))]
    return "\n".join(lines).strip()


def render_aggregation() -> str:
    return header("aggregation") + "\n\n" + _stdout("aggregation")


def render_distributed() -> str:
    return header("distributed") + "\n\n```\n" + _stdout("distributed", start="qwen2.5") + "\n```"


def render_plan_advice() -> str:
    return header("plan-advice") + "\n\n```\n" + _stdout("plan-advice", start="plan for") + "\n```"


def render_demo() -> str:
    records = [json.loads(line) for line in read("demo", "metrics.jsonl").splitlines() if line.strip()]
    timed = [r["step_s"] for r in records[1:]] or [records[0]["step_s"]]
    answers = [line for line in read("demo", "stdout.txt").splitlines() if re.match(r"\s+\[(before|after)\] [QA]:", line)]
    config = json.loads(read("demo", "adapter_config.json"))
    levers = ", ".join(f"{k} {config[k]}" for k in ("keep_activations", "keep_attention", "keep_dequantized", "lanes"))
    return (header("demo") + "\n\n"
            f"{len(records)} steps, median {statistics.median(timed):.2f} s per step (step 1 excluded: "
            f"{records[0]['step_s']:.2f} s), MLX peak {max(r['peak_mb'] for r in records):.0f} MB, "
            f"{sum(r['step_s'] for r in records) / 60:.1f} min of training; the plan chose {levers} "
            f"(predicted {config.get('predicted_step_s', float('nan')):.2f} s per step). Its answers:\n\n```\n"
            + "\n".join(answers) + "\n```")


def _bench_rows() -> dict:
    rows = json.loads(read("bench-family", "bench.json"))["rows"]
    return {tuple(json.loads(k)): v for k, v in rows.items()}


BENCH_LABELS = {"mesp": "**MeSP** (leanest plan)", "mebp": "MeBP (Apple's, autodiff per block)",
                "lcsb": "LCSB (1/4 of the blocks per step, MeSP rule)", "mezo": "MeZO (two forward passes)",
                "mesp-fast-2g": "**MeSP, fastest plan under 2 GB**", "mebp-fast-2g": "MeBP, fastest plan under 2 GB",
                "mlx-lm": "`mlx_lm.lora`", "mlx-lm-gc": "`mlx_lm.lora --grad-checkpoint`"}


def _gemm(rows: dict) -> float:
    return statistics.median(r["machine"]["gemm_gflops"] for r in rows.values() if r.get("machine"))


def _step(r: dict) -> str:
    rounds = r.get("round_step_s")
    return f"{r['step_s']:.2f}" + (f" ({min(rounds):.2f}–{max(rounds):.2f})" if rounds and len(rounds) > 1 else "")


def render_readme_bench() -> str:
    rows = _bench_rows()
    t4 = {k[4]: v for k, v in rows.items() if k[0] == "t4"}
    tg = {k[4]: v for k, v in rows.items() if k[0] == "tg"}
    lines = [header("bench-family"), "", "Random-weight 4-bit Qwen2.5-0.5B shape, batch 1, seq 256, LoRA r 8 on all 7 "
             "projections, SGD; the first four rows stream the weights and keep mmap'd checkpoints (nothing kept), the "
             "2 GB rows keep the weights resident with the levers the planner picks. The median of the rounds, with "
             f"their range; fp32 GEMM {_gemm(rows):.0f} GFLOP/s in that run (step times scale with it: compare rows of "
             "one run).", "",
             "| run | MLX peak MB | s / step |", "|---|---|---|"]
    for variant, label in BENCH_LABELS.items():
        if variant in t4:
            lines.append(f"| {label} | {t4[variant]['peak_mb']:.1f} | {_step(t4[variant])} |")
    if "mesp" in t4 and "mebp" in t4:
        m, b = t4["mesp"], t4["mebp"]
        lines += ["", f"MeSP's exact step is {m['step_s'] / b['step_s']:.2f}x MeBP's at {m['peak_mb'] / b['peak_mb']:.2f}x"
                      " its memory."]
    if "mesp" in tg and "mebp" in tg:
        m, b = tg["mesp"], tg["mebp"]
        lines[-1] += (f" On a Gemma3-1B shape (26 blocks, vocabulary 262,144, weights streamed): MeSP "
                      f"{m['peak_mb']:.1f} MB, {m['step_s']:.2f} s against MeBP's {b['peak_mb']:.1f} MB, "
                      f"{b['step_s']:.2f} s ({m['step_s'] / b['step_s']:.2f}x the time).")
    return "\n".join(lines)


def render_bench_family() -> str:
    return header("bench-family") + "\n\n" + read("bench-family", "bench.md").strip()


def render_bench_speed() -> str:
    return header("bench-speed") + "\n\n" + read("bench-speed", "bench_speed.md").strip()


def render_readme_speed() -> str:
    data = json.loads(read("bench-speed", "bench_speed.json"))
    lines = [header("bench-speed"), "", "Real SmolLM2-135M (Hamlet, seq ≤ 256, batch 4, r 8, AdamW); the peer on the "
             "model dequantized to fp32, its fastest CPU setting:", "", "| run | tokens/s | MLX peak MB |",
             "|---|---|---|"]
    for row in data["rows"]:
        if "error" not in row:
            lines.append(f"| {row['name']} | {row['tokens_per_s']:.0f} | {row['peak_mb']:.0f} |")
    return "\n".join(lines)


def render_personalize() -> str:
    results = json.loads(read("personalize", "personalize.json"))["results"]
    policies = list(dict.fromkeys(r["policy"] for r in results))
    means = {p: statistics.mean(r["rouge1_after"] for r in results if r["policy"] == p) for p in policies}
    base = statistics.mean(r["rouge1_before"] for r in results)
    seeds = len({r["seed"] for r in results})
    return (header("personalize") + "\n\n" + read("personalize", "personalize.md").strip() + "\n\n"
            f"Mean ROUGE-1 after fine-tuning over the {seeds} seed(s): "
            + ", ".join(f"{p} {means[p]:.3f}" for p in policies) + f" (the base model: {base:.3f}).")


def render_families() -> str:
    table = json.loads((ROOT / "mesp_mlx" / "models" / "families" / "support.json").read_text())
    tiers = [v["tier"] for v in table.values()]
    hand = ", ".join(sorted(k for k, v in table.items() if v["tier"] == "hand"))
    return (f"*From `mesp_mlx/models/families/support.json`, written by `{PY} tools/family_table.py` (the "
            f"sweep behind [the table](docs/model_families.md)).*\n\n{tiers.count('hand')} model types take MeSP's "
            f"hand rule ({hand}), {tiers.count('generic')} more the exact generic tier, and {tiers.count('refused')} "
            "of mlx-lm's modules are refused with the reason.")


BLOCKS = {  # block id -> (the measurement it renders, renderer)
    "federated-aggregation": ("aggregation", render_aggregation),
    "distributed": ("distributed", render_distributed),
    "plan-advice": ("plan-advice", render_plan_advice),
    "demo": ("demo", render_demo),
    "readme-bench": ("bench-family", render_readme_bench),
    "bench-family": ("bench-family", render_bench_family),
    "readme-speed": ("bench-speed", render_readme_speed),
    "bench-speed": ("bench-speed", render_bench_speed),
    "personalize": ("personalize", render_personalize),
    "families": (None, render_families),
}
MARKER = re.compile(r"(<!-- figures:([\w-]+) -->\n)(.*?)(<!-- /figures:\2 -->)", re.S)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def render_docs(check: bool, paths: list[Path] | None = None) -> list[str]:
    """Rewrite (or, with check, compare) every block; returns the blocks that differ or cannot render."""
    problems = []
    for path in paths if paths is not None else doc_files():
        text = path.read_text()

        def fill(match):
            block = match.group(2)
            if block not in BLOCKS:
                problems.append(f"{path.name}: unknown block {block}")
                return match.group(0)
            measurement, renderer = BLOCKS[block]
            if measurement is not None and not meta_of(measurement):
                problems.append(f"{path.name}: block {block} has no snapshot (--measure {measurement})")
                return match.group(0)
            body = renderer().rstrip() + "\n"
            if body != match.group(3):
                problems.append(f"{path.name}: block {block} differs from its snapshot")
            return match.group(1) + body + match.group(4)

        new = MARKER.sub(fill, text)
        if new != text and not check:
            path.write_text(new)
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", default="", help="comma list of measurements, or cheap, or all")
    ap.add_argument("--check", action="store_true", help="compare the blocks with their snapshots; write nothing")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for name, m in MEASUREMENTS.items():
            print(f"{name:<13}{m.cost:<34}{m.command}")
        return 0
    names = [n for n in args.measure.split(",") if n]
    if names == ["all"]:
        names = list(MEASUREMENTS)
    elif names == ["cheap"]:
        names = [n for n, m in MEASUREMENTS.items() if m.cheap]
    unknown = [n for n in names if n not in MEASUREMENTS]
    if unknown:
        ap.error(f"unknown measurement(s) {unknown} (--list)")
    for name in names:
        measure(name)
    problems = render_docs(args.check)
    if args.check:
        print("\n".join(problems) or "every generated block matches its snapshot")
        return 1 if problems else 0
    print("\n".join(p for p in problems if "differs" not in p) or "docs rewritten from the snapshots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
