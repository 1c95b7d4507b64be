"""One mlx-lm YAML, two trainers: `mesp-mlx train` beside `mlx_lm lora` (run through tools/mlx_lm_peer.py, i.e. mlx-lm's
own CLI and loop with a callback that prints each report at full precision), from the same starting adapter, with the
same data, batch size and seed. Writes the per-step losses and learning rates of both to comparison.json and draws
both curves in one plot (comparison.png). Not a CI test: on the real SmolLM2 mlx-lm's CPU quantized matmul is slow.

    PYTHONPATH=. python tools/compare_mlx_lm.py --out runs/compare [--model FOLDER] [--data FOLDER] [--iters 20]

Learning rates: ours is the rate of the optimizer step a micro-batch belongs to; mlx-lm reports the rate of the last
update applied, so with accumulation N its column lags ours by up to N - 1 steps (the same values).
Measured (this box, shared, defaults: SmolLM2-135M 4-bit, adam 1e-4, cosine over 10 after a warmup of 2, accumulation 2,
batch 2, seq <= 128, 44 chatterbot dialogues, 20 steps): training losses within 8.7e-4 of mlx-lm's at every step
(4.768 -> 0.437 for both), final adapters max rel diff 5.8e-3 (the same with --dtype native). At step 1, with identical
adapters, the losses already differ by 3.4e-4 (4.76837 vs 4.76803), so the base forward itself differs numerically
between the two (mlx-lm's CPU quantized matmul vs our dequantized GEMM, presumably); Adam's normalised steps carry such
differences into the adapters. On the tiny fp32-scale test model the adapters agree to 5e-6 (tests/test_mlx_lm_parity.py).

Without --model, the embedded SmolLM2-135M-Instruct GGUF is imported to an mlx-lm folder; without --data, up to 48
chatterbot-corpus dialogues (botprofile, greetings, conversations; at most 48) are written as mlx-lm chat jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402

YAML = """optimizer: adam
learning_rate: {lr}
lr_schedule:
  name: cosine_decay
  arguments: [{lr}, {decay}]
  warmup: 2
  warmup_init: 0.0
grad_accumulation_steps: 2
batch_size: 2
seed: 0
iters: {iters}
num_layers: -1
max_seq_length: {seq}
steps_per_report: 1
steps_per_eval: 1000
val_batches: 1
lora_parameters:
  rank: 8
  scale: 20.0
  dropout: 0.0
  keys: [self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/compare_mlx_lm")
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-seq-length", type=int, default=128)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from mesp_mlx.models.gguf_import import import_gguf
        from mesp_mlx.models.load import embedded_gguf

        model = str(out / "SmolLM2")
        if not (out / "SmolLM2" / "config.json").is_file():
            import_gguf(embedded_gguf(), out / "SmolLM2")
    data = args.data
    if data is None:
        from mesp_mlx.data.corpora import chatterbot_pairs, write_chat_jsonl

        data = str(out / "data")
        write_chat_jsonl(chatterbot_pairs(["botprofile", "greetings", "conversations"])[:48], data)
    recipe = out / "recipe.yaml"
    recipe.write_text(YAML.format(lr=args.lr, decay=args.iters // 2, iters=args.iters, seq=args.max_seq_length))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    # one starting adapter for both (random A, zero B: one step at learning rate 0)
    start = out / "start"
    subprocess.run([sys.executable, "-m", "mesp_mlx.cli", "train", "--model", model, "--data", data, "--iters", "1",
                    "--optimizer", "sgd", "--learning-rate", "0", "--adapter-path", str(start), "--no-plot",
                    "--steps-per-eval", "0", "--max-seq-length", str(args.max_seq_length)], check=True, env=env)
    common = ["-c", str(recipe), "--model", model, "--data", data,
              "--resume-adapter-file", str(start / "adapters.safetensors")]

    t0 = time.perf_counter()
    with open(out / "mlx_lm.log", "w") as log:  # followed live with tail -f (mlx-lm is slow on CPU)
        peer = subprocess.run([sys.executable, str(ROOT / "tools" / "mlx_lm_peer.py"), "--train",
                               "--adapter-path", str(out / "mlx_lm"), *common], stdout=log, stderr=subprocess.STDOUT,
                              text=True, env=env)
    mlx_lm_s = time.perf_counter() - t0
    printed = (out / "mlx_lm.log").read_text()
    if peer.returncode:
        print(printed[-3000:])
        return 1
    theirs = [json.loads(line.split(" ", 1)[1]) for line in printed.splitlines() if line.startswith("MLX_LM_REPORT ")]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mesp_mlx.cli", "train", "--adapter-path", str(out / "mesp"), "--no-plot",
                    *common], check=True, env=env)
    mesp_s = time.perf_counter() - t0
    ours = [json.loads(line) for line in (out / "mesp" / "metrics.jsonl").read_text().splitlines()]

    a = mx.load(str(out / "mesp" / "adapters.safetensors"))
    b = mx.load(str(out / "mlx_lm" / "adapters.safetensors"))
    rel = max((mx.linalg.norm(a[k] - b[k]) / (mx.linalg.norm(b[k]) + 1e-30)).item() for k in b)
    steps = [r["step"] for r in ours]
    loss_theirs = {r["iteration"]: r["train_loss"] for r in theirs}
    lr_theirs = {r["iteration"]: r["learning_rate"] for r in theirs}
    rows = [{"step": s, "mesp_loss": r["loss"], "mlx_lm_loss": loss_theirs.get(s), "mesp_lr": r["learning_rate"],
             "mlx_lm_lr": lr_theirs.get(s)} for s, r in zip(steps, ours)]
    diffs = [abs(r["mesp_loss"] - r["mlx_lm_loss"]) for r in rows if r["mlx_lm_loss"] is not None]
    summary = {"model": model, "data": data, "recipe": recipe.read_text(), "rows": rows,
               "max_abs_loss_diff": max(diffs) if diffs else None, "adapter_max_rel_diff": rel,
               "mlx_lm_wall_s": mlx_lm_s, "mesp_wall_s": mesp_s}
    (out / "comparison.json").write_text(json.dumps(summary, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["mesp_loss"] for r in rows], marker="o", ms=3, label="mesp-mlx train (MeSP)")
    ax.plot([r["step"] for r in rows if r["mlx_lm_loss"] is not None],
            [r["mlx_lm_loss"] for r in rows if r["mlx_lm_loss"] is not None], marker="x", ms=5, ls="--",
            label="mlx_lm lora")
    ax.set_xlabel("step (micro-batch)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"same YAML, same batches: max |loss diff| {summary['max_abs_loss_diff']:.2e}, "
                 f"adapter rel diff {rel:.2e}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)
    for r in rows:
        print(f"step {r['step']:>3}  mesp {r['mesp_loss']:.5f}  mlx_lm {r['mlx_lm_loss']}  lr {r['mesp_lr']:.3e} / "
              f"{r['mlx_lm_lr']}")
    print(f"max |loss diff| {summary['max_abs_loss_diff']}, adapter max rel diff {rel:.3e}; wall: mlx_lm "
          f"{mlx_lm_s:.0f} s, mesp {mesp_s:.0f} s -> {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
