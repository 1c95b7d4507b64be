"""MeSP vs MeBP vs `mlx_lm.lora` — memory and step time on random-weight 4-bit Qwen2.5- and Gemma3-1B-shaped models,
with the papers' figures beside ours (MeSP's Tables 1, 2, 3, 5; MeBP's Gemma3-1B). Same machine, same BLAS, batch 1,
SGD lr 1e-4, LoRA scale 20 on all 7 projections; our rows stream the weights and keep checkpoints in mmap'd files (the
papers' runtime setting).

    .venv/bin/python tools/bench.py --tables 1,2,3,5 [--steps 1] [--mlx-lm 0.5b] [--fresh]
    .venv/bin/python tools/bench.py --tables 4 --steps 4   # the method family beside mlx_lm.lora (both variants)
    .venv/bin/python tools/bench.py --tables g --steps 2   # a Gemma3-1B-shaped model: MeBP, MeSP streamed / resident
    .venv/bin/python tools/bench.py --tables 4,g --steps 2 --repeat 3 --only ours   # rows round-robin, medians

Models are built block by block (no fp32 whole model ever exists) in tools/out/models. Results accumulate in
tools/out/bench.json (one entry per row, re-running a row replaces it) and tools/out/bench.md is rendered from all rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesp_mlx import backend  # noqa: E402
from mesp_mlx.run.config import TrainConfig  # noqa: E402
from mesp_mlx.data.datasets import BatchIterator, load_splits  # noqa: E402
from mesp_mlx.engine import Batch, BlockEngine  # noqa: E402
from mesp_mlx.methods import method_for  # noqa: E402
from mesp_mlx.models.synthetic import SHAPES, gemma3_1b_config, model_config, write_random_model  # noqa: E402
from mesp_mlx.plan.resolve import plan_run  # noqa: E402
from mesp_mlx.run.optimizers import make_optimizer  # noqa: E402
from mesp_mlx.run.prepare import apply_levers, prepare_model  # noqa: E402

OUT = ROOT / "tools" / "out"
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj"]


def ensure_model(shape: str) -> Path:
    folder = OUT / "models" / f"{shape}-4bit-g64"
    if not (folder / "config.json").is_file():
        if shape == "gemma3-1b":
            config = gemma3_1b_config()
        else:
            model_type, hidden, layers, inter, heads, kv, vocab = SHAPES[shape]
            config = model_config(model_type, hidden, layers, inter, heads, kv, vocab)
        print(f"building random {shape} (4-bit, group 64) in {folder} ...", flush=True)
        write_random_model(folder, config, bits=4, group_size=64, scales_dtype=mx.float32)
    return folder


def ensure_data(seq: int) -> Path:
    folder = OUT / f"data-seq{seq}"
    folder.mkdir(parents=True, exist_ok=True)
    words = ("the quick brown fox jumps over the lazy dog and a small model learns to answer questions about memory "
             "phones laptops and training ").split()
    text = " ".join(words[i % len(words)] + str(i % 7) for i in range(seq * 2))  # tokenizes to well over seq tokens
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    return folder


def bench_ours(model: Path, data: Path, method: str, seq: int, rank: int, steps: int, stream: bool,
               storage: str = "memory", store_h: bool = False, budget_mb: float | None = None) -> dict:
    """One row of ours. Without budget_mb: the leanest plan (nothing kept: the papers' memory); with it: the speed
    levers the planner chooses for that budget (docs/speed.md)."""
    cfg = TrainConfig(model=str(model), data=str(data), method=method, optimizer="sgd", learning_rate=1e-4,
                      max_seq_length=seq + 1, lora_parameters={"rank": rank, "scale": 20.0, "dropout": 0.0, "keys": KEYS},
                      stream_weights=stream, checkpoint_storage=storage, store_h=store_h)
    mx.reset_peak_memory()
    # the same LoRA A initialisation in every row (the engine reseeds per block, so without this a row's A depended on
    # which row ran before it, and rows' losses after step 0 were not comparable)
    mx.random.seed(0)
    prep = prepare_model(cfg)
    cfg = prep.settings  # the sequence length and LoRA keys as the run resolves them
    splits = load_splits(cfg.data, prep.tokenizer)
    batches = BatchIterator(splits["train"], 1, cfg.max_seq_length)
    method_rule = method_for(cfg)
    keep = 0
    predicted = None
    if budget_mb is not None:
        plan = plan_run(prep.settings, prep, method_rule, budget_mb, f"{budget_mb:.0f} MB", cfg.max_seq_length)
        levers = plan.levers
        print(f"speed levers ({plan.lever_note()}): {levers.flags()}")
        apply_levers(prep, method_rule, levers)
        keep, predicted = levers.keep_activations, (plan.predicted_step_s, plan.predicted_peak_mb)
    engine = BlockEngine(prep.parts, method_rule, [make_optimizer(cfg) for _ in prep.parts.layers],
                         cfg.checkpoint_storage, None, prep.streamer, keep_activations=keep)
    resident = mx.get_active_memory() / 2**20
    rows = []
    for step in range(steps + 1):  # step 0 warms up
        tokens, lengths = next(batches)
        stats, _ = engine.step(Batch.from_mlx_lm(tokens, lengths), step)
        rows.append(stats)
    timed = rows[1:]
    return {"peak_mb": max(s.peak_mb for s in timed), "step_s": sum(s.step_s for s in timed) / len(timed),
            "resident_mb_before_step": resident, "tokens": int(tokens.shape[1] - 1),
            "predicted_step_s_peak_mb": predicted,
            "phase_peak_mb": timed[-1].phase_peak_mb, "losses": [s.loss for s in rows],
            # seconds per phase, mean over the timed steps (LCSB's cyclic groups differ from step to step)
            "phase_s": {k: sum(s.phase_s.get(k, 0.0) for s in timed) / len(timed) for k in timed[-1].phase_s}}


def bench_mlx_lm(model: Path, data: Path, seq: int, rank: int, steps: int, grad_checkpoint: bool) -> dict:
    cfg = OUT / f"mlx_lm_lora_r{rank}.yaml"
    cfg.write_text(f"lora_parameters:\n  rank: {rank}\n  scale: 20.0\n  dropout: 0.0\n  keys: {json.dumps(KEYS)}\n")
    adapters = OUT / "mlx_lm_adapters"
    cmd = [sys.executable, str(ROOT / "tools" / "mlx_lm_peer.py"), "--train", "--model", str(model), "--data", str(data), "-c", str(cfg),
           "--iters", str(steps + 1), "--batch-size", "1", "--num-layers", "-1", "--optimizer", "sgd",
           "--learning-rate", "1e-4", "--max-seq-length", str(seq + 1), "--steps-per-report", "1",
           "--steps-per-eval", "100000", "--val-batches", "1", "--adapter-path", str(adapters)]
    if grad_checkpoint:
        cmd.append("--grad-checkpoint")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    text = proc.stdout + proc.stderr
    reports = [json.loads(line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith("MLX_LM_REPORT ")]
    if not reports:
        raise RuntimeError("no report from mlx_lm lora:\n" + text[-3000:])
    timed = reports[1:] or reports  # the first step warms up
    step_s = [1.0 / r["iterations_per_second"] for r in timed]
    # mlx-lm's peak_memory is bytes / 1e9 and never reset: the run's peak
    return {"peak_mb": max(r["peak_memory"] for r in reports) * 1e9 / 2**20, "step_s": sum(step_s) / len(step_s),
            "wall_s": wall}



# the MeSP paper's figures (iPhone 17 Pro; peak MB = phys_footprint, s per step), docs/design.md §2
PAPER = {
    ("t1", "0.5b", 256, 8, "mebp"): (360.8, 0.68), ("t1", "0.5b", 256, 8, "mesp"): (136.2, 0.86),
    ("t1", "1.5b", 256, 8, "mebp"): (516.2, 1.66), ("t1", "1.5b", 256, 8, "mesp"): (262.6, 2.17),
    ("t1", "3b", 256, 8, "mebp"): (637.6, 3.21), ("t1", "3b", 256, 8, "mesp"): (368.4, 4.09),
    **{("t2", "0.5b", s, 8, "mebp"): (m, None) for s, m in zip((128, 256, 512, 1024), (252.7, 360.8, 582.4, 1050.3))},
    **{("t2", "0.5b", s, 8, "mesp"): (m, None) for s, m in zip((128, 256, 512, 1024), (110.7, 136.2, 245.8, 513.6))},
    **{("t3", "0.5b", 256, r, "mebp"): (m, None) for r, m in zip((4, 8, 16, 32), (355.2, 360.8, 372.4, 395.8))},
    **{("t3", "0.5b", 256, r, "mesp"): (m, None) for r, m in zip((4, 8, 16, 32), (132.8, 136.2, 143.5, 158.2))},
    ("t5", "3b", 256, 8, "mebp"): (637.6, 3.21), ("t5", "3b", 256, 8, "mesp-store-h"): (398.5, 3.85),
    ("t5", "3b", 256, 8, "mesp"): (368.4, 4.09),
    # the MeBP paper's Gemma3-1B (iPhone 15 Pro Max, second-hand, docs/design.md §3): MeBP 569 MB / 9.48 s per step
    ("tg", "gemma3-1b", 256, 8, "mebp"): (569.0, 9.48),
}
TABLES = {
    "1": [("t1", size, 256, 8, v) for size in ("0.5b", "1.5b", "3b") for v in ("mebp", "mesp")],
    "2": [("t2", "0.5b", s, 8, v) for s in (128, 256, 512, 1024) for v in ("mebp", "mesp")],
    "3": [("t3", "0.5b", 256, r, v) for r in (4, 8, 16, 32) for v in ("mebp", "mesp")],
    "5": [("t5", "3b", 256, 8, v) for v in ("mebp", "mesp-store-h", "mesp")],
    "4": [("t4", "0.5b", 256, 8, v) for v in ("mebp", "mesp", "lcsb", "mezo", "mlx-lm", "mlx-lm-gc", "mesp-fast-2g",
                                             "mebp-fast-2g")],
    "g": [("tg", "gemma3-1b", 256, 8, v) for v in ("mebp", "mesp", "mesp-resident")],
}
TITLES = {"t1": "Table 1 — model size (seq 256, r 8)", "t2": "Table 2 — sequence length (0.5B, r 8)",
          "t3": "Table 3 — LoRA rank (0.5B, seq 256)", "t5": "Table 5 — store h vs recompute h (seq 256, r 8)",
          "tg": "Gemma3-1B shape (seq 256, r 8, checkpoints mmap'd; MeBP and MeSP streamed, MeSP also with weights resident; paper: MeBP's "
                "Gemma3-1B on an iPhone 15 Pro Max)",
          "t4": "The method family per step, beside plain mlx-lm LoRA (0.5B, seq 256, r 8; LCSB 1/4 of the blocks cyclic, MeZO n=1)"}
LABELS = {"mebp": "MeBP", "mesp": "MeSP", "mesp-resident": "MeSP, weights resident", "mesp-store-h": "MeSP, store h", "lcsb": "LCSB (MeSP rule)", "mezo": "MeZO", "mlx-lm": "mlx_lm.lora",
          "mlx-lm-gc": "mlx_lm.lora --grad-checkpoint",
          "mesp-fast-2g": "MeSP, fastest plan under 2 GB", "mebp-fast-2g": "MeBP, fastest plan under 2 GB"}
RESULTS = OUT / "bench.json"


def run_row(key, steps: int) -> dict:
    table, size, seq, rank, variant = key
    model, data = ensure_model(size if size.startswith("gemma") else f"qwen2.5-{size}"), ensure_data(seq)
    if variant.endswith("-fast-2g"):  # weights resident, the speed levers the planner picks under 2048 MB
        r = bench_ours(model, data, variant.split("-")[0], seq, rank, steps, False, "memory", budget_mb=2048.0)
        mx.clear_cache()
        return r
    if variant == "mesp-resident":  # differs from the streamed row in the weights only (checkpoints mmap'd in both)
        r = bench_ours(model, data, "mesp", seq, rank, steps, False, "mmap")
        mx.clear_cache()
        return r
    if variant.startswith("mlx-lm"):
        # the peer's steps take minutes on CPU and do not vary (no schedule): one timed step after the warm-up
        return bench_mlx_lm(model, data, seq, rank, 1, variant == "mlx-lm-gc")
    method = "mesp" if variant == "mesp-store-h" else variant
    r = bench_ours(model, data, method, seq, rank, steps, True, "mmap", store_h=variant == "mesp-store-h")
    mx.clear_cache()
    return r


def render(results: dict, machine: dict) -> str:
    lines = [f"Random-weight 4-bit (g64) Qwen2.5 / Gemma3-1B shapes, batch 1, LoRA r on 7 projections, SGD. Ours: {machine['backend']},"
             f" BLAS {machine['blas'].split(',')[0]}, {machine['gemm_gflops']:.0f} GFLOP/s fp32 GEMM; MLX peak "
             "(allocator, everything MLX holds). Paper: iPhone 17 Pro phys_footprint (mmap'd weight pages not counted).",
             ""]
    rows = {tuple(json.loads(k)): v for k, v in results.items()}
    for table in ("t1", "t2", "t3", "t5", "t4", "tg"):
        keys = sorted((k for k in rows if k[0] == table), key=lambda k: (k[1], k[2], k[3], list(LABELS).index(k[4])))
        if not keys:
            continue
        lines += [f"**{TITLES[table]}**", "",
                  "| model | seq | rank | run | MLX peak MB | s / step | paper MB | paper s | ÷ MeBP peak | ÷ MeBP time |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for k in keys:
            r = rows[k]
            paper = PAPER.get(k, (None, None))
            base = rows.get((table, k[1], k[2], k[3], "mebp"))
            ratio_m = ratio_t = ""
            if k[4] != "mebp" and not k[4].startswith("mlx-lm") and base:
                ratio_m, ratio_t = f"{r['peak_mb'] / base['peak_mb']:.2f}", f"{r['step_s'] / base['step_s']:.2f}"
            fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
            step = f"{r['step_s']:.2f}"
            if r.get("round_step_s"):  # median of alternating rounds, with their range
                step += f" ({min(r['round_step_s']):.2f}–{max(r['round_step_s']):.2f}, {len(r['round_step_s'])} rounds)"
            lines.append(f"| {k[1].upper()} | {k[2]} | {k[3]} | {LABELS[k[4]]} | {r['peak_mb']:.1f} | {step} | "
                         f"{fmt(paper[0], '.1f')} | {fmt(paper[1], '.2f')} | {ratio_m} | {ratio_t} |")
        lines.append("")
        if table == "t4":
            lines += family_phases([(k, rows[k]) for k in keys])
    return "\n".join(lines)


def family_phases(rows: list) -> list[str]:
    """Seconds per phase of the family's rows, and the most any LCSB can gain on MeBP: its forward and loss are the
    full model's, so even a free backward leaves (forward + loss); ceiling = MeBP step / (forward + loss)."""
    lines = ["Seconds per phase (mean over the timed steps):", "",
             "| run | forward | loss | backward | update |", "|---|---|---|---|---|"]
    for k, r in rows:
        p = r.get("phase_s")
        if not p:  # the peer's rows: mlx-lm reports no phases
            continue
        lines.append(f"| {LABELS[k[4]]} | " + " | ".join(f"{p.get(ph, 0.0):.2f}" for ph in
                                                          ("forward", "loss", "backward", "update")) + " |")
    by = {k[4]: r for k, r in rows}
    if "mebp" in by and "lcsb" in by and by["lcsb"].get("phase_s"):
        p = by["lcsb"]["phase_s"]
        floor = p.get("forward", 0.0) + p.get("loss", 0.0)
        lines += ["", f"LCSB's forward + loss take {floor:.2f} s, which no backward rule removes: the most LCSB can be "
                      f"faster than MeBP here is {by['mebp']['step_s'] / floor:.2f}x (with a free backward); measured "
                      f"{by['mebp']['step_s'] / by['lcsb']['step_s']:.2f}x."]
        if "mesp" in by and by["mesp"].get("phase_s", {}).get("backward"):
            full = by["mesp"]["phase_s"]["backward"]
            room = by["mebp"]["step_s"] / 2 - floor
            lines.append(f"2x would leave LCSB {room:.2f} s of backward, {room / full:.0%} of MeSP's full backward "
                         f"({full:.2f} s); a quarter of the blocks takes {p.get('backward', 0.0):.2f} s.")
        lines.append("")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", default="1,2,3,5,4", help="comma list of 1, 2, 3, 5 (the paper's), 4 (the family), g (Gemma3-1B)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per row (after one warm-up step)")
    ap.add_argument("--mlx-lm", default="", help="sizes (0.5b,1.5b,3b) for which to add the mlx_lm.lora rows to table 1")
    ap.add_argument("--only", choices=["ours", "mlx-lm"], help="run only our rows or only the peer's")
    ap.add_argument("--sizes", help="only rows of these model sizes (e.g. 1.5b,3b)")
    ap.add_argument("--seqs", help="only rows of these sequence lengths (e.g. 1024)")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run our rows this many times round-robin (each a fresh model) and report the median step "
                         "time with its range: the rows' ratios then hold against the machine's drift")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    report = backend.doctor()
    print("\n".join(report.lines()), flush=True)
    machine = {"backend": report.backend, "blas": report.blas, "gemm_gflops": report.gemm_gflops,
               "mlx": report.mlx_version, "mlx_lm": report.mlx_lm_version}
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() and not args.fresh else {"rows": {}}
    keys = [] if args.only == "mlx-lm" else [k for t in args.tables.split(",") if t for k in TABLES[t.strip()]]
    if args.only == "ours":
        keys = [k for k in keys if not k[4].startswith("mlx-lm")]
    if args.sizes:
        keys = [k for k in keys if k[1] in args.sizes.split(",")]
    if args.seqs:
        keys = [k for k in keys if str(k[2]) in args.seqs.split(",")]
    if args.only != "ours":
        keys += [("t1", s, 256, 8, v) for s in args.mlx_lm.split(",") if s for v in ("mlx-lm", "mlx-lm-gc")]
    measured = {}  # the same run in two tables (e.g. 0.5B, seq 256, r 8) is measured once per round
    rounds: dict = {}  # run -> its results, one per round
    for rnd in range(max(1, args.repeat)):
        measured.clear()
        for key in keys:
            if rnd and key[4].startswith("mlx-lm"):  # the peer's rows take minutes and run once
                continue
            print(f"running {key}" + (f" (round {rnd + 1} of {args.repeat})" if args.repeat > 1 else "") + " ...",
                  flush=True)
            if key[1:] not in measured:
                measured[key[1:]] = run_row(key, args.steps)
                rounds.setdefault(key[1:], []).append(measured[key[1:]])
            r = _median_round(rounds[key[1:]])
            r["machine"] = machine
            saved["rows"][json.dumps(list(key))] = r
            print(f"  peak {r['peak_mb']:.1f} MB, {r['step_s']:.2f} s/step", flush=True)
            RESULTS.write_text(json.dumps(saved, indent=2))  # after every row: a long run keeps what it measured
            (OUT / "bench.md").write_text(render(saved["rows"], machine) + "\n")
    print("\n" + render(saved["rows"], machine))


def _median_round(results: list) -> dict:
    """A run's result over its rounds: the round of median step time (its phases, losses, peak), with every round's
    step time beside it."""
    ordered = sorted(results, key=lambda r: r["step_s"])
    r = dict(ordered[(len(ordered) - 1) // 2])
    if len(results) > 1:
        r["round_step_s"] = [x["step_s"] for x in results]
        r["peak_mb"] = max(x["peak_mb"] for x in results)
    return r


if __name__ == "__main__":
    main()
