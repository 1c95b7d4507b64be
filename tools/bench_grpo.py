"""GRPO on the real SmolLM2-135M-Instruct with a verifiable reward, under a phone's budget, beside mlx-lm-lora's GRPO.

    PYTHONPATH=. .venv/bin/python tools/bench_grpo.py [--iters 30] [--profile iphone-17-pro] [--peer]

The task: small additions the tool writes ("What is 7 + 2?"), answered with a number; the reward is number_match
(1 when the last number in the completion is the sum). 48 training prompts, 32 held-out ones that never appear in
training. Our run: `mesp-mlx train --train-mode grpo` under the profile (its planner picks the levers); the held-out
mean reward of greedy completions before and after. The peer: mlx-lm-lora's train_grpo on the same model, data,
LoRA, group size, completion length, learning rate and reference (the model with its adapters off: a second load,
as its CLI does), timed steps and MLX peak. Writes tools/out/bench_grpo.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tools" / "out"
SYSTEM = "You are a calculator."
LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0}


def ensure_smollm2() -> Path:
    from mesp_mlx.models.gguf_import import import_gguf
    from mesp_mlx.models.load import embedded_gguf

    folder = OUT / "models" / "SmolLM2-135M-Instruct"
    if not (folder / "config.json").is_file():
        import_gguf(embedded_gguf(), folder)
    return folder


def ensure_sums() -> Path:
    """48 training and 32 held-out additions of one-digit numbers (no pair in both)."""
    folder = OUT / "data-sums"
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    random.Random(0).shuffle(pairs)
    rows = [{"system": SYSTEM, "prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in pairs[:80]]
    for name, part in (("train", rows[:48]), ("valid", rows[48:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


def run_ours(model: str, data: str, args) -> dict:
    out = OUT / "grpo_ours"
    cmd = [sys.executable, "-m", "mesp_mlx.cli", "train", "--model", model, "--data", data, "--adapter-path", str(out),
           "--train-mode", "grpo", "--iters", str(args.iters), "--batch-size", str(args.batch_size), "--group-size",
           str(args.group_size), "--max-completion-length", str(args.max_tokens), "--learning-rate", str(args.lr),
           "--beta", str(args.beta), "--reward-functions", "number_match", "--steps-per-eval", str(args.iters),
           "--val-batches", str(32 // args.batch_size), "--max-seq-length", "64", "--no-plot", "--save-every",
           str(args.iters), "--optimizer", "adam"]
    if args.profile:
        cmd += ["--device-profile", args.profile]
    if args.resume:  # continue a run a signal stopped (its state was saved)
        cmd.append("--resume")
    else:
        subprocess.run(["rm", "-rf", str(out)], check=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    phases: dict = {}
    for r in records:
        for k, v in r["phase_peak_mb"].items():
            phases[k] = max(phases.get(k, 0.0), v)
    return {"steps": len(records), "val_reward_before": records[0]["val_reward_at_start"],
            "val_reward_after": records[-1]["val_reward"],
            "train_reward_first5": sum(r["reward_mean"] for r in records[:5]) / 5,
            "train_reward_last5": sum(r["reward_mean"] for r in records[-5:]) / 5,
            "peak_mb": max(r["peak_mb"] for r in records), "phase_peak_mb": phases,
            "footprint_mb": max((r["footprint_mb"] or 0) for r in records),
            "step_s": sum(r["step_s"] + r["generate_s"] for r in records[1:]) / max(len(records) - 1, 1),
            "generate_s": sum(r["generate_s"] for r in records[1:]) / max(len(records) - 1, 1),
            "wall_s": time.perf_counter() - start}


def run_peer(model: str, data: str, args) -> dict:
    """mlx-lm-lora's train_grpo in this process (its reference model loaded beside the policy, as its CLI does)."""
    import mlx.optimizers as optim
    from mlx_lm_lora.trainer.datasets import GRPODataset
    from mlx_lm_lora.trainer.grpo_reward_functions import register_reward_function
    from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs, train_grpo

    from bench_preference import peer_setup, peer_timed
    from mesp_mlx.objectives.rewards import number_match

    policy, reference, tokenizer, rows = peer_setup(model, data, LORA)
    reward = register_reward_function("number_match")(number_match)
    targs = GRPOTrainingArgs(batch_size=args.batch_size, iters=args.peer_iters, steps_per_eval=10**6,
                             steps_per_report=1, steps_per_save=10**6, max_seq_length=128,
                             adapter_file=str(OUT / "grpo_peer.safetensors"), group_size=args.group_size,
                             max_completion_length=args.max_tokens, beta=args.beta, temperature=0.8)
    return peer_timed(lambda clock: train_grpo(policy, reference, tokenizer, optim.Adam(learning_rate=args.lr),
                                               GRPODataset(rows, tokenizer), None, reward_funcs=[reward], args=targs,
                                               training_callback=clock))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--profile", default="iphone-17-pro")
    ap.add_argument("--peer", action="store_true", help="also mlx-lm-lora's GRPO (peer-iters steps)")
    ap.add_argument("--peer-iters", type=int, default=3)
    ap.add_argument("--resume", action="store_true", help="continue our run saved in tools/out/grpo_ours")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    model, data = str(ensure_smollm2()), str(ensure_sums())
    if args.one == "peer":
        print(json.dumps(run_peer(model, data, args)))
        return 0
    rows = {"MeSP GRPO": run_ours(model, data, args)}
    print(f"MeSP GRPO: {json.dumps(rows['MeSP GRPO'])}", flush=True)
    if args.peer:
        out = subprocess.run([sys.executable, __file__, "--one", "peer", *sys.argv[1:]], capture_output=True,
                             text=True, cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(f"peer failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        rows["mlx-lm-lora GRPO"] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"mlx-lm-lora GRPO: {json.dumps(rows['mlx-lm-lora GRPO'])}", flush=True)
    print(f"SmolLM2-135M-Instruct, sums, B {args.batch_size} x G {args.group_size}, {args.max_tokens} new tokens, "
          f"lr {args.lr}, beta {args.beta}, profile {args.profile}")
    print("| run | MLX peak MB | step s | held-out reward before -> after |\n|---|---|---|---|")
    for name, r in rows.items():
        reward = f"{r['val_reward_before']:.3f} -> {r['val_reward_after']:.3f}" if "val_reward_after" in r else "-"
        print(f"| {name} | {r['peak_mb']:.1f} | {r['step_s']:.2f} | {reward} |")
    (OUT / "bench_grpo.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
