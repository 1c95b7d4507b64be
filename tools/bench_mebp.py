"""MeBP step vs `mlx_lm.lora` on a random-weight 4-bit Qwen2.5-0.5B-shaped model (seq 256, batch 1, LoRA r=8 on all 7
projections, SGD), same machine, same BLAS. Prints a table of MLX peak MB and seconds per step; writes JSON + markdown.

    .venv/bin/python tools/bench_mebp.py [--shape qwen2.5-0.5b] [--steps 3] [--skip-mlx-lm]
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
from mesp_mlx.config import TrainConfig  # noqa: E402
from mesp_mlx.data import BatchIterator, load_splits  # noqa: E402
from mesp_mlx.engine import Batch, BlockEngine  # noqa: E402
from mesp_mlx.methods import make_method  # noqa: E402
from mesp_mlx.models.synthetic import SHAPES, model_config, write_random_model  # noqa: E402
from mesp_mlx.train import make_optimizer, prepare_model  # noqa: E402

OUT = ROOT / "tools" / "out"
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj"]


def ensure_model(shape: str) -> Path:
    folder = OUT / "models" / f"{shape}-4bit-g64"
    if not (folder / "config.json").is_file():
        model_type, hidden, layers, inter, heads, kv, vocab = SHAPES[shape]
        print(f"building random {shape} (4-bit, group 64) in {folder} ...", flush=True)
        write_random_model(folder, model_config(model_type, hidden, layers, inter, heads, kv, vocab), bits=4,
                           group_size=64, scales_dtype=mx.float32)
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
               storage: str = "memory") -> dict:
    cfg = TrainConfig(model=str(model), data=str(data), method=method, optimizer="sgd", learning_rate=1e-4,
                      max_seq_length=seq + 1, lora_parameters={"rank": rank, "scale": 20.0, "dropout": 0.0, "keys": KEYS},
                      stream_weights=stream, checkpoint_storage=storage)
    mx.reset_peak_memory()
    prep = prepare_model(cfg)
    splits = load_splits(cfg.data, prep.tokenizer)
    batches = BatchIterator(splits["train"], 1, cfg.max_seq_length)
    engine = BlockEngine(prep.parts, make_method(method), [make_optimizer(cfg) for _ in prep.parts.layers],
                         cfg.checkpoint_storage, None, prep.streamer)
    resident = mx.get_active_memory() / 2**20
    rows = []
    for step in range(steps + 1):  # step 0 warms up
        tokens, lengths = next(batches)
        stats, _ = engine.step(Batch.from_mlx_lm(tokens, lengths), step)
        rows.append(stats)
    timed = rows[1:]
    return {"peak_mb": max(s.peak_mb for s in timed), "step_s": sum(s.step_s for s in timed) / len(timed),
            "resident_mb_before_step": resident, "tokens": int(tokens.shape[1] - 1),
            "phase_peak_mb": timed[-1].phase_peak_mb, "phase_s": timed[-1].phase_s, "losses": [s.loss for s in rows]}


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--skip-mlx-lm", action="store_true")
    ap.add_argument("--only", choices=["ours", "mlx-lm"], help="run only our rows or only the peer's")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    report = backend.doctor()
    print("\n".join(report.lines()), flush=True)
    model = ensure_model(args.shape)
    data = ensure_data(args.seq)
    results = {"machine": {"backend": report.backend, "blas": report.blas, "gemm_gflops": report.gemm_gflops,
                           "mlx": report.mlx_version, "mlx_lm": report.mlx_lm_version},
               "shape": args.shape, "seq": args.seq, "rank": args.rank, "rows": {}}
    runs = [("MeBP (ours, resident weights)", lambda: bench_ours(model, data, "mebp", args.seq, args.rank, args.steps, False)),
            ("MeBP (ours, streamed weights)", lambda: bench_ours(model, data, "mebp", args.seq, args.rank, args.steps, True)),
            ("MeBP (ours, streamed + mmap ckpt)",
             lambda: bench_ours(model, data, "mebp", args.seq, args.rank, args.steps, True, "mmap"))]
    if args.only == "mlx-lm":
        runs = []
    if not args.skip_mlx_lm and args.only != "ours":
        runs += [("mlx_lm.lora", lambda: bench_mlx_lm(model, data, args.seq, args.rank, args.steps, False)),
                 ("mlx_lm.lora --grad-checkpoint", lambda: bench_mlx_lm(model, data, args.seq, args.rank, args.steps, True))]
    for name, fn in runs:
        print(f"running {name} ...", flush=True)
        results["rows"][name] = fn()
        r = results["rows"][name]
        print(f"  peak {r['peak_mb']:.1f} MB, {r['step_s']:.2f} s/step", flush=True)
    lines = [f"MeBP vs mlx_lm.lora — random-weight 4-bit {args.shape}, seq {args.seq}, batch 1, LoRA r={args.rank} on 7 "
             f"projections, SGD; {report.backend}, BLAS {report.blas.split(',')[0]}, {report.gemm_gflops:.0f} GFLOP/s", "",
             "| run | MLX peak MB | s / step |", "|---|---|---|"]
    for name, r in results["rows"].items():
        lines.append(f"| {name} | {r['peak_mb']:.1f} | {r['step_s']:.2f} |")
    md = "\n".join(lines)
    print("\n" + md)
    (OUT / f"bench_mebp_{args.shape}.json").write_text(json.dumps(results, indent=2))
    (OUT / f"bench_mebp_{args.shape}.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
