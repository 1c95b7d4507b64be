"""DPO at phone memory: MLX peak and step time of DPO beside SFT under MeSP on the Qwen2.5-0.5B shape (random 4-bit
weights, streamed, leanest plan), and mlx-lm-lora's own DPO trainer on the same model and data (its peak and step).

    PYTHONPATH=. .venv/bin/python tools/bench_preference.py [--seq 256] [--steps 2] [--peer]

Each row runs in its own process (MLX's peak is per process). A DPO batch is one pair (2 sequences of --seq tokens);
the SFT batch one sequence of --seq tokens; LoRA rank 8 on the 7 projections of every block.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

OUT = ROOT / "tools" / "out"
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj"]
LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": KEYS}


def words(n: int, offset: int) -> str:
    vocab = "the quick brown fox jumps over a lazy dog while small models learn on phones and laptops".split()
    return " ".join(vocab[(i + offset) % len(vocab)] + str((i * 7 + offset) % 11) for i in range(n))


def ensure_pairs(seq: int) -> Path:
    """A preference set whose chosen and rejected conversations are each about `seq` tokens (SmolLM2-style BPE of the
    random model: about 2 tokens per word here), and an SFT set of the chosen conversations as chat records."""
    folder = OUT / f"pairs-seq{seq}"
    folder.mkdir(parents=True, exist_ok=True)
    prompt = words(seq // 8, 0)
    rows = [{"prompt": prompt, "chosen": words(seq // 2, 3), "rejected": words(seq // 2, 5)} for _ in range(2)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = folder / "sft"
    sft.mkdir(exist_ok=True)
    (sft / "train.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}) + "\n" for r in rows))
    return folder


def run_ours(model: str, data: str, mode: str, seq: int, steps: int) -> dict:
    """One process: our engine, MeSP, streamed, leanest plan; DPO or SFT."""
    import mlx.core as mx

    from mesp_mlx.data.datasets import BatchIterator, load_splits
    from mesp_mlx.data.preference import PairBatches, load_pairs
    from mesp_mlx.engine import Batch, BlockEngine
    from mesp_mlx.methods import method_for
    from mesp_mlx.objectives import objective_for
    from mesp_mlx.run.config import TrainConfig
    from mesp_mlx.run.optimizers import make_optimizer
    from mesp_mlx.run.prepare import prepare_model

    cfg = TrainConfig(model=model, data=data, method="mesp", optimizer="sgd", learning_rate=1e-4,
                      max_seq_length=2 * seq, lora_parameters=LORA, stream_weights=True, train_mode=mode)
    mx.random.seed(0)
    prep = prepare_model(cfg)
    cfg = prep.settings
    if mode == "sft":
        batches = BatchIterator(load_splits(Path(data) / "sft", prep.tokenizer)["train"], 1, cfg.max_seq_length)
    else:
        batches = PairBatches(load_pairs(Path(data) / "train.jsonl", prep.tokenizer), 1, cfg.max_seq_length)
    engine = BlockEngine(prep.parts, method_for(cfg), [make_optimizer(cfg) for _ in prep.parts.layers],
                         streamer=prep.streamer, objective=objective_for(cfg))
    rows = []
    for step in range(steps + 1):  # step 0 warms up
        item = next(batches)
        batch = item if isinstance(item, Batch) else Batch.from_mlx_lm(*item)
        stats, _ = engine.step(batch, step)
        rows.append((stats, batch.inputs.shape))
    timed = [s for s, _ in rows[1:]]
    return {"peak_mb": max(s.peak_mb for s in timed), "step_s": sum(s.step_s for s in timed) / len(timed),
            "rows_x_tokens": list(rows[-1][1]), "phase_peak_mb": timed[-1].phase_peak_mb}


def peer_setup(model: str, data: str, lora: dict):
    """mlx-lm-lora's trainers as its CLI sets them up: the policy with LoRA and a frozen reference model loaded beside
    it; (policy, reference, tokenizer, train.jsonl's rows)."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    info = mx.device_info()  # its trainers ask Metal's key; on the CPU backend give it one
    mx.device_info = lambda: {**info, "max_recommended_working_set_size": 1 << 34}
    policy, tokenizer = load(model)
    reference, _ = load(model)
    policy.freeze()
    reference.freeze()
    linear_to_lora_layers(policy, len(policy.layers), lora)
    rows = [json.loads(line) for line in (Path(data) / "train.jsonl").read_text().splitlines()]
    return policy, reference, tokenizer, rows


def peer_timed(train) -> dict:
    """Run `train(callback)`, a peer trainer reporting every step to `callback`: its MLX peak and its mean step time
    (the first step excluded when there are more)."""
    import mlx.core as mx
    from mlx_lm.tuner.callbacks import TrainingCallback

    times = []

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info):
            times.append(time.perf_counter())

    mx.reset_peak_memory()
    start = time.perf_counter()
    train(Clock())
    marks = [start] + times
    return {"peak_mb": mx.get_peak_memory() / 2**20,
            "step_s": (marks[-1] - marks[1]) / max(len(marks) - 2, 1) if len(marks) > 2 else marks[-1] - start}


def run_peer(model: str, data: str, seq: int, steps: int) -> dict:
    """One process: mlx-lm-lora's train_dpo (its reference model loaded beside the policy, as its CLI does)."""
    import mlx.optimizers as optim
    from mlx_lm_lora.trainer.datasets import DPODataset
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    policy, reference, tokenizer, rows = peer_setup(model, data, LORA)
    args = DPOTrainingArgs(batch_size=1, iters=steps + 1, steps_per_eval=10**6, steps_per_report=1,
                           steps_per_save=10**6, adapter_file=str(OUT / "peer_dpo.safetensors"),
                           max_seq_length=2 * seq, beta=0.1)
    return peer_timed(lambda clock: train_dpo(policy, reference, optim.SGD(learning_rate=1e-4),
                                              DPODataset(rows, tokenizer), None, args=args, training_callback=clock))


def in_process(kind: str, **kw) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", kind, "--kw", json.dumps(kw)], capture_output=True,
                         text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--peer", action="store_true", help="also mlx-lm-lora's DPO on the same model and data")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--kw", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kw = json.loads(args.kw)
        result = run_peer(**kw) if args.one == "peer" else run_ours(mode=args.one, **kw)
        print(json.dumps(result))
        return 0
    from bench import ensure_model

    model = str(ensure_model("qwen2.5-0.5b"))
    data = str(ensure_pairs(args.seq))
    common = {"model": model, "data": data, "seq": args.seq, "steps": args.steps}
    rows = {}
    for name, kind in [("MeSP SFT", "sft"), ("MeSP DPO", "dpo")] + ([("mlx-lm-lora DPO", "peer")] if args.peer else []):
        rows[name] = in_process(kind, **common)
        print(f"{name}: {json.dumps(rows[name])}", flush=True)  # each row as it ends (the peer's take long)
    sft = rows["MeSP SFT"]["peak_mb"]
    print(f"Qwen2.5-0.5B shape (random 4-bit), seq {args.seq}, LoRA r8 x 7 keys, SGD, {args.steps} timed steps")
    print("| run | batch (rows x tokens) | MLX peak MB | x SFT | step s |\n|---|---|---|---|---|")
    for name, r in rows.items():
        shape = " x ".join(map(str, r.get("rows_x_tokens", ["1 pair"])))
        print(f"| {name} | {shape} | {r['peak_mb']:.1f} | {r['peak_mb'] / sft:.2f} | {r['step_s']:.2f} |")
    (OUT / "bench_preference.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
