"""Training speed of `mesp-mlx train` beside `mlx_lm lora`, re-measured in one invocation on the real SmolLM2-135M.

    PYTHONPATH=. .venv/bin/python tools/bench_speed.py [--steps 5] [--budgets tightest,1024,2048] \\
        [--only ours|mlx-lm] [--skip-4bit] [--out tools/out/bench_speed.md]

Setting (every row): the embedded SmolLM2-135M-Instruct (Q4_1 GGUF imported to an mlx-lm folder, 4-bit group 32, 8-bit
embedding: what `mesp-mlx train` uses without --model), Hamlet passages (`mesp-mlx make-data --corpus shakespeare
--plays hamlet`), max_seq_length 256, batch 4, seed 0, LoRA rank 8 scale 20 dropout 0 on all 7 projections of every
block (one YAML's lora_parameters for both trainers), AdamW lr 1e-4, iters = steps + 1: the first step is a warm-up
(MLX's compile, caches) and is not counted.

Rows:
  mesp-mlx train, tightest      --keep-activations 0 --no-keep-attention --keep-dequantized 0 (the leanest plan)
  mesp-mlx train, budget N MB   --budget-mb N (the planner picks the fastest levers that fit)
  mlx_lm lora, 4-bit            the same 4-bit folder (mlx-lm's CPU quantized matmul: slow; --skip-4bit leaves it out)
  mlx_lm lora, fp32             the model dequantized once by `python -m mlx_lm convert --dequantize --dtype float32`
  mlx_lm lora, fp32 + grad ckpt the same with --grad-checkpoint
mlx-lm runs through tools/mlx_lm_peer.py (its own CLI and loop; each report printed as JSON), reporting every step
(--steps-per-report 1, its first report skipped); its evaluation cannot be switched off, so it gets --val-batches 1
--steps-per-eval 100000 (mlx-lm times it apart from the steps). Ours runs with --steps-per-eval 0 (no evaluation).

Measured per row, over the timed steps: tokens/s (timed tokens / timed seconds), seconds per step (mean), MLX peak MB
(MiB; ours: the largest per-step peak in metrics.jsonl; mlx-lm: mx.get_peak_memory() at its last report, a peak since
its process started), and the achieved GFLOP/s of this FLOP model, an ESTIMATE that ignores the attention scores
(QK^T, PV), the norms, the LoRA matmuls, dequantization and padding:

    FLOP per trained token = 2 P (forward) + 2 P (input gradients) [+ 2 P where the forward is recomputed]
                             + 2 V d (the head's logits) + 2 V d (their gradient)
    P = the dense parameter count of the decoder blocks' linears, read from config.json:
        layers * (d * h*hd (q) + 2 * d * kv*hd (k, v) + h*hd * d (o) + 3 * d * ffn (gate, up, down))
    recomputed: ours, the share of blocks not kept (keep_activations in the run's adapter_config.json),
                mlx_lm lora --grad-checkpoint
    (SmolLM2-135M: P = 106.2 M, V d = 28.3 M: 4P + 4Vd = 538 MFLOP per token, 750 MFLOP with the recompute)

Beside it, "÷ GEMM" divides that by MLX's fp32 GEMM rate measured in this process (backend.measure_gemm_gflops(), at
the start and at the end; the mean is used), and the ratios of each of our rows to mlx-lm fp32 (plain and with grad
checkpointing): tokens/s ours ÷ theirs and peak ours ÷ theirs. Every run is a subprocess of this one with the same
environment (the venv's MLX, its BLAS checked not to be the slow reference build).

Writes the markdown table to --out and bench_speed.json beside it; the models, the data, each run's adapters and log go
to --work (default tools/out/bench_speed/). Not a test: a full run takes tens of minutes on 2 CPU cores (mlx-lm 4-bit
about 10x slower per step than the others).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesp_mlx import backend  # noqa: E402

KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj"]
LORA_YAML = f"""lora_parameters:
  rank: 8
  scale: 20.0
  dropout: 0.0
  keys: [{", ".join(KEYS)}]
"""
SEQ, BATCH, LR, SEED = 256, 4, 1e-4, 0
MIB = 2**20
# every run: this process's environment, with this checkout first on the path (its mesp_mlx, not an installed one)
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# --- setup: model folders, data, the flags this build has ----------------------------------------------------------

def prepare(work: Path) -> tuple[Path, Path, Path]:
    """The 4-bit folder (the embedded GGUF imported), its fp32 copy (mlx-lm's own dequantize), the Hamlet data."""
    from mesp_mlx.models.gguf_import import import_gguf
    from mesp_mlx.models.load import embedded_gguf

    model4, model32, data = work / "SmolLM2-135M-4bit", work / "SmolLM2-135M-fp32", work / "data"
    if not (model4 / "config.json").is_file():
        import_gguf(embedded_gguf(), model4)
    if not (model32 / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(model4), "--mlx-path", str(model32),
                        "--dequantize", "--dtype", "float32"], check=True, env=ENV)
    if not (data / "train.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "mesp_mlx.cli", "make-data", "--out", str(data), "--corpus",
                        "shakespeare", "--plays", "hamlet"], check=True, env=ENV)
    return model4, model32, data


def flop_model(model: Path) -> dict:
    c = json.loads((model / "config.json").read_text())
    d, layers, ffn, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    hd = c.get("head_dim") or d // heads
    p_blocks = layers * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * ffn)
    return {"P_blocks": p_blocks, "V": vocab, "d": d, "layers": layers,
            "flop_per_token": 4 * p_blocks + 4 * vocab * d, "flop_per_token_recompute": 6 * p_blocks + 4 * vocab * d}


# --- one run: a subprocess whose output goes to a log file ---------------------------------------------------------

def run_logged(cmd: list[str], log: Path) -> tuple[int, float]:
    print(f"$ {' '.join(cmd)}\n  (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=ENV).returncode
    wall = time.perf_counter() - start
    if rc:
        print(log.read_text()[-2000:])
    print(f"  exit {rc}, {wall:.0f} s", flush=True)
    return rc, wall


def summarize(name: str, kind: str, cmd: list[str], steps: list[tuple[int, float]], peak_mb: float,
              recompute: float, recompute_note: str, flops: dict, wall: float) -> dict:
    """steps: (tokens, seconds) of each timed step."""
    tokens, seconds = sum(t for t, _ in steps), sum(s for _, s in steps)
    # recompute: the share of blocks whose forward was recomputed (0..1)
    per_token = flops["flop_per_token"] + recompute * (flops["flop_per_token_recompute"] - flops["flop_per_token"])
    tps = tokens / seconds
    return {"name": name, "kind": kind, "command": " ".join(cmd), "timed_steps": len(steps), "tokens_per_step":
            tokens / len(steps), "tokens_per_s": tps, "step_s": seconds / len(steps), "peak_mb": peak_mb,
            "recompute": recompute, "recompute_note": recompute_note, "flop_per_token": per_token,
            "gflops": per_token * tps / 1e9, "wall_s": wall}


def failed(name: str, kind: str, cmd: list[str], why: str) -> dict:
    return {"name": name, "kind": kind, "command": " ".join(cmd), "error": why}


def run_ours(name: str, extra: list[str], model: Path, data: Path, lora_yaml: Path, work: Path, iters: int,
             flops: dict) -> dict:
    adapters = work / "runs" / name.replace(" ", "_")
    cmd = [sys.executable, "-m", "mesp_mlx.cli", "train", "-c", str(lora_yaml), "--model", str(model), "--data",
           str(data), "--max-seq-length", str(SEQ), "--batch-size", str(BATCH), "--optimizer", "adamw",
           "--learning-rate", str(LR), "--num-layers", "-1", "--iters", str(iters), "--seed", str(SEED),
           "--steps-per-eval", "0", "--steps-per-report", "1", "--no-plot", "--adapter-path", str(adapters), *extra]
    rc, wall = run_logged(cmd, work / "logs" / f"{adapters.name}.log")
    metrics = adapters / "metrics.jsonl"
    if rc or not metrics.is_file():
        return failed(name, "ours", cmd, f"exit {rc} (log: {work / 'logs' / adapters.name}.log)")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    timed = [r for r in records if r["step"] > 1]
    if not timed:
        return failed(name, "ours", cmd, "no timed step in metrics.jsonl")
    recompute, note = our_recompute(adapters)
    return summarize(name, "ours", cmd, [(r["tokens"], r["step_s"]) for r in timed], max(r["peak_mb"] for r in timed),
                     recompute, note, flops, wall)


def our_recompute(adapters: Path) -> tuple[float, str]:
    """The share of blocks whose forward the run recomputed in its backward: 1 - keep_activations / blocks, from the
    adapter_config.json the run wrote (the planner's choice is recorded there)."""
    config = json.loads((adapters / "adapter_config.json").read_text())
    kept, blocks = config["keep_activations"], config["num_layers"]
    return 1.0 - kept / blocks, f"keep_activations={kept} of {blocks} blocks"


def run_mlx_lm(name: str, model: Path, extra: list[str], data: Path, lora_yaml: Path, work: Path, iters: int,
               flops: dict, recompute: float) -> dict:
    adapters = work / "runs" / name.replace(" ", "_").replace("+", "")
    cmd = [sys.executable, str(ROOT / "tools" / "mlx_lm_peer.py"), "--train", "-c", str(lora_yaml), "--model",
           str(model), "--data", str(data), "--max-seq-length", str(SEQ), "--batch-size", str(BATCH), "--optimizer",
           "adamw", "--learning-rate", str(LR), "--num-layers", "-1", "--iters", str(iters), "--seed", str(SEED),
           "--val-batches", "1", "--steps-per-eval", "100000", "--steps-per-report", "1", "--adapter-path",
           str(adapters), *extra]
    log = work / "logs" / f"{adapters.name}.log"
    rc, wall = run_logged(cmd, log)
    reports = [json.loads(line.split(" ", 1)[1]) for line in log.read_text().splitlines()
               if line.startswith("MLX_LM_REPORT ")]
    timed = [r for r in reports if r["iteration"] > 1]
    if rc or not timed:
        return failed(name, "mlx-lm", cmd, f"exit {rc}, {len(timed)} timed reports (log: {log})")
    steps = [(r["tokens_per_second"] / r["iterations_per_second"], 1 / r["iterations_per_second"]) for r in timed]
    peak_mb = max(r["peak_memory"] for r in timed) * 1e9 / MIB  # mlx-lm reports GB (1e9 bytes)
    return summarize(name, "mlx-lm", cmd, steps, peak_mb, recompute,
                     "--grad-checkpoint" if recompute else "keeps every activation", flops, wall)


# --- report ----------------------------------------------------------------------------------------------------------

def render(rows: list[dict], meta: dict) -> str:
    gemm = meta["gemm_gflops"]
    lines = [f"# Training speed: mesp-mlx train vs mlx_lm lora (SmolLM2-135M, Hamlet, seq {SEQ}, batch {BATCH})", "",
             "| row | tokens/s | s/step | MLX peak MB | fwd recomputed | GFLOP/s (est.) | ÷ GEMM rate |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['peak_mb']:.0f} | "
                     f"{r['recompute']:.0%} | {r['gflops']:.1f} | {r['gflops'] / gemm:.2f} |")
    refs = {r["name"]: r for r in rows if r["kind"] == "mlx-lm" and "error" not in r and "fp32" in r["name"]}
    ours = [r for r in rows if r["kind"] == "ours" and "error" not in r]
    if refs and ours:
        heads = [f"tok/s ÷ {n}" for n in refs] + [f"peak ÷ {n}" for n in refs]
        lines += ["", "| ours | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
        for o in ours:
            cells = [o["tokens_per_s"] / ref["tokens_per_s"] for ref in refs.values()]
            cells += [o["peak_mb"] / ref["peak_mb"] for ref in refs.values()]
            lines.append(f"| {o['name']} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    f = meta["flops"]
    lines += ["", f"{meta['timed_steps']} timed steps per row after 1 warm-up step (iters {meta['timed_steps'] + 1}); "
              f"tokens/s = timed tokens / timed seconds; MLX peak in MiB.",
              f"fp32 GEMM (256x896 @ 896x4864, this process): {meta['gemm_start']:.1f} GFLOP/s at the start, "
              f"{meta['gemm_end']:.1f} at the end (÷ uses {gemm:.1f}); BLAS: {meta['blas']}.",
              f"FLOP model (an estimate; ignores attention scores, norms, LoRA, dequantization and padding): per "
              f"trained token 4 P + 4 V d, 6 P + 4 V d when the forward is recomputed; P = {f['P_blocks'] / 1e6:.1f} M "
              f"(the blocks' dense linears), V d = {f['V'] * f['d'] / 1e6:.1f} M: {f['flop_per_token'] / 1e6:.0f} / "
              f"{f['flop_per_token_recompute'] / 1e6:.0f} MFLOP per token.",
              f"Machine: {meta['machine']}; {meta['when']}."]
    lines += [f"Note: {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row (after 1 warm-up step)")
    ap.add_argument("--budgets", default="tightest,1024,2048", help="our rows: 'tightest' and/or budgets in MB")
    ap.add_argument("--only", choices=["ours", "mlx-lm"], help="run only these rows")
    ap.add_argument("--skip-4bit", action="store_true", help="leave out mlx_lm lora on the 4-bit model (the slow row)")
    ap.add_argument("--out", default=str(ROOT / "tools" / "out" / "bench_speed.md"))
    ap.add_argument("--work", default=str(ROOT / "tools" / "out" / "bench_speed"), help="models, data, runs, logs")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)

    blas = backend.blas_in_use()
    assert not backend.is_reference_blas(blas), f"MLX uses the slow reference BLAS ({blas}): run scripts/setup.sh"
    gemm_start = backend.measure_gemm_gflops()
    print(f"BLAS {blas or 'n/a'} | fp32 GEMM {gemm_start:.1f} GFLOP/s", flush=True)
    model4, model32, data = prepare(work)
    lora_yaml = work / "lora.yaml"
    lora_yaml.write_text(LORA_YAML)
    flops = flop_model(model4)
    iters = args.steps + 1
    notes, rows = [], []

    if args.only in (None, "ours"):
        tightest = ["--keep-activations", "0", "--no-keep-attention", "--keep-dequantized", "0"]
        for budget in args.budgets.split(","):
            budget = budget.strip()
            if budget == "tightest":
                rows.append(run_ours("mesp-mlx tightest", tightest, model4, data, lora_yaml, work, iters, flops))
            else:
                rows.append(run_ours(f"mesp-mlx budget {budget} MB", ["--budget-mb", budget], model4, data, lora_yaml,
                                     work, iters, flops))
    if args.only in (None, "mlx-lm"):
        if args.skip_4bit:
            notes.append("mlx_lm lora on the 4-bit model left out (--skip-4bit)")
        else:
            rows.append(run_mlx_lm("mlx_lm 4-bit", model4, [], data, lora_yaml, work, iters, flops, False))
        rows.append(run_mlx_lm("mlx_lm fp32", model32, [], data, lora_yaml, work, iters, flops, False))
        rows.append(run_mlx_lm("mlx_lm fp32+gc", model32, ["--grad-checkpoint"], data, lora_yaml, work, iters, flops,
                               True))

    gemm_end = backend.measure_gemm_gflops()
    meta = {"timed_steps": args.steps, "gemm_start": gemm_start, "gemm_end": gemm_end,
            "gemm_gflops": (gemm_start + gemm_end) / 2, "blas": blas, "flops": flops, "notes": notes,
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, load average "
                       f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end",
            "when": time.strftime("%Y-%m-%d %H:%M"), "settings": {"max_seq_length": SEQ, "batch_size": BATCH,
            "learning_rate": LR, "optimizer": "adamw", "seed": SEED, "iters": iters, "lora_yaml": LORA_YAML},
            "model": str(model4), "data": str(data), "argv": sys.argv}
    for r in rows:
        if "error" not in r:
            r["gemm_fraction"] = r["gflops"] / meta["gemm_gflops"]
    text = render(rows, meta)
    print("\n" + text)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"-> {out}, {out.with_suffix('.json')}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
