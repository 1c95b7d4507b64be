"""Gradient quality and convergence of the method family on the real SmolLM2-135M with real text (Shakespeare).

1. Cosine similarity to the exact LoRA gradient (MeSP = whole-model autodiff, tested to 1e-5) of
   - MeZO's SPSA estimate with n = 1, 4, 16 draws (averaged over a few steps' seeds),
   - LCSB's partial gradient (1/4 of the blocks; unselected blocks count as zero), and on the selected blocks alone.
2. Loss curves of MeSP, MeBP, LCSB and MeZO from the same start, on the same batches, for a fixed step budget, and
   the same curves against wall-clock seconds; with --eval-every, the loss on the held-out passages along the way.
Writes tools/out/study/<name>.json and <name>.png.

Starts: the cosines need B != 0 (at mlx-lm's LoRA init B = 0, so dL/dA = 0 exactly), so they are taken at a perturbed
start (A, B += 0.02 N(0, 1)). The curves start where `mesp-mlx train` starts (--init lora: B = 0, the model is the
pretrained one) unless --init perturbed, the earlier studies' start, which mostly measures how fast the noise is undone.

    .venv/bin/python tools/study_gradients.py [--steps 40] [--seq 128]
    # the LCSB paper's setting (r 16, AdamW 1e-4, wd 0.01), held-out loss every 50 steps (README's table):
    .venv/bin/python tools/study_gradients.py --steps 500 --rank 16 --optimizer adamw --lr 1e-4 --weight-decay 0.01 \
        --eval-every 50 --methods mesp,lcsb,lcsb:cyclic:momentum,lcsb:importance --name study_paper
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesp_mlx.config import TrainConfig  # noqa: E402
from mesp_mlx.corpora import shakespeare_passages, write_text_jsonl  # noqa: E402
from mesp_mlx.data import BatchIterator, load_splits  # noqa: E402
from mesp_mlx.engine import Batch, BlockEngine  # noqa: E402
from mesp_mlx.methods import method_for  # noqa: E402
from mesp_mlx.train import evaluate, make_optimizer, prepare_model  # noqa: E402

OUT = ROOT / "tools" / "out" / "study"


def _vector(grads: dict, layers: int, like: list) -> mx.array:
    """Concatenate a {block: tree} gradient in a fixed order; blocks absent count as zeros."""
    parts = []
    for i in range(layers):
        names = like[i]
        flat = dict(tree_flatten(grads[i])) if i in grads else {}
        parts += [flat[n].reshape(-1) if n in flat else mx.zeros(shape).reshape(-1) for n, shape in names]
    return mx.concatenate(parts).astype(mx.float32)


def _cos(a: mx.array, b: mx.array) -> float:
    return (mx.sum(a * b) / (mx.linalg.norm(a) * mx.linalg.norm(b) + 1e-30)).item()


def setup(args, method: str, init: str = "perturbed", **extra):
    optimizer = "sgd" if method == "mezo" else args.optimizer  # MeZO's update is its own (plain SGD on the estimate)
    opt_config = {"adamw": {"weight_decay": args.weight_decay}} if optimizer == "adamw" else {}
    cfg = TrainConfig(model=None, data=str(args.data), method=method, optimizer=optimizer, learning_rate=extra.pop(
        "lr", args.lr), max_seq_length=args.seq + 1, seed=0, optimizer_config=opt_config,
        lora_parameters={**TrainConfig().lora_parameters, "rank": args.rank}, **extra)
    mx.random.seed(0)
    prep = prepare_model(cfg)
    if init == "perturbed":
        # a trained-looking start: LoRA B is zero at init (then dL/dA = 0); give it small random values
        prep.model.update(tree_map(lambda x: 0.02 * mx.random.normal(x.shape), prep.model.trainable_parameters()))
        mx.eval(prep.model.trainable_parameters())
    batches = BatchIterator(load_splits(cfg.data, prep.tokenizer)["train"], 1, cfg.max_seq_length, seed=0)
    engine = BlockEngine(prep.parts, method_for(cfg), [make_optimizer(cfg) for _ in prep.parts.layers], seed=0)
    return cfg, prep, batches, engine


def cosines(args) -> dict:
    _, prep, batches, exact_engine = setup(args, "mesp")
    layers = len(prep.parts.layers)
    like = [[(n, v.shape) for n, v in tree_flatten(l.trainable_parameters())] for l in prep.parts.layers]
    out = {"mezo": {}, "lcsb_all": [], "lcsb_selected": []}
    from mesp_mlx.methods import LCSB, MeZO

    for trial in range(args.trials):
        tokens, lengths = next(batches)
        batch = Batch.from_mlx_lm(tokens, lengths)
        _, g = exact_engine.step(batch, trial, apply_update=False)
        exact = _vector(g, layers, like)
        for n in (1, 4, 16):
            eng = BlockEngine(prep.parts, MeZO(1e-4, eps=1e-3, samples=n, seed=trial), None, seed=0)
            _, gz = eng.step(batch, trial, apply_update=False)
            out["mezo"].setdefault(str(n), []).append(_cos(_vector(gz, layers, like), exact))
        lcsb = LCSB(fraction=0.25)
        _, gl = BlockEngine(prep.parts, lcsb, None, seed=0).step(batch, trial, apply_update=False)
        out["lcsb_all"].append(_cos(_vector(gl, layers, like), exact))
        sel = sorted(gl)
        exact_sel = _vector({i: g[i] for i in sel}, layers, like)
        out["lcsb_selected"].append(_cos(_vector(gl, layers, like), exact_sel))
        print(f"trial {trial}: MeZO n=1/4/16 cos {[round(out['mezo'][k][-1], 4) for k in ('1', '4', '16')]}, "
              f"LCSB blocks {sel[0]}-{sel[-1]}: cos {out['lcsb_all'][-1]:.3f} (selected blocks {out['lcsb_selected'][-1]:.3f})",
              flush=True)
    return out


def curves(args) -> dict:
    runs = {"mesp": {}, "mebp": {}, "lcsb": {}, "mezo": {"lr": args.mezo_lr, "zo_eps": args.zo_eps}}
    out = {}
    for name in args.methods.split(","):
        # lcsb:<schedule>[:<skipped>] picks LCSB's schedule (cyclic, random, importance) and skipped-block state
        method, schedule, skipped = (name.split(":") + ["", ""])[:3]
        extra = dict(runs[method])
        if schedule:
            extra["lcsb_schedule"] = schedule
        if skipped:
            extra["lcsb_skipped"] = skipped
        cfg, prep, batches, engine = setup(args, method, init=args.init, **extra)
        valid = load_splits(cfg.data, prep.tokenizer)["valid"] if args.eval_every else None

        def heldout_loss() -> float:  # every held-out passage once, as train's evaluation does with --val-batches -1
            return evaluate(engine, prep.model, valid, 1, cfg.max_seq_length, -1)[0]

        evals = {0: heldout_loss()} if valid is not None else {}
        losses, seconds, t = [], [], 0.0
        for step in range(args.steps):
            tokens, lengths = next(batches)
            stats, _ = engine.step(Batch.from_mlx_lm(tokens, lengths), step)
            t += stats.step_s
            losses.append(stats.loss)
            seconds.append(t)
            if valid is not None and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                evals[step + 1] = heldout_loss()
                print(f"  {name} step {step + 1}: train {np.mean(losses[-args.eval_every:]):.4f} "
                      f"held-out {evals[step + 1]:.4f}", flush=True)
        out[name] = {"loss": losses, "seconds": seconds, "s_per_step": t / args.steps,
                     "heldout": {str(k): v for k, v in evals.items()}}
        print(f"{name}: loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f} (mean of last 5), {t / args.steps:.2f} s/step"
              + (f", held-out {evals[args.steps]:.4f}" if valid is not None else ""), flush=True)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in result["curves"].items():
        line, = a1.plot(range(1, len(r["loss"]) + 1), r["loss"], label=name, alpha=0.5 if r.get("heldout") else 1)
        a2.plot(r["seconds"], r["loss"], label=name)
        if r.get("heldout"):
            steps = sorted(int(k) for k in r["heldout"])
            a1.plot(steps, [r["heldout"][str(k)] for k in steps], marker="o", color=line.get_color(), lw=2,
                    label=f"{name} held-out")
    a1.set_xlabel("step")
    a2.set_xlabel("seconds (this CPU)")
    for a in (a1, a2):
        a.set_ylabel("loss (log scale)")
        a.set_yscale("log")
        a.grid(alpha=0.3)
        a.legend()
    c = result["cosines"]
    fig.suptitle("SmolLM2-135M, Shakespeare: cos to the exact gradient — MeZO n=1/4/16: "
                 + ", ".join(f"{np.mean(c['mezo'][k]):.3f}" for k in ("1", "4", "16"))
                 + f"; LCSB 1/4: {np.mean(c['lcsb_all']):.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of the first-order methods")
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="of the first-order methods")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's weight decay")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (the LCSB paper uses 16)")
    ap.add_argument("--init", default="lora", choices=["lora", "perturbed"],
                    help="start of the curves: mlx-lm's LoRA init (B = 0, as train) or the perturbed one of the cosines")
    ap.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (0: none)")
    ap.add_argument("--name", default="study", help="output files tools/out/study/<name>.{json,png}")
    ap.add_argument("--mezo-lr", type=float, default=1e-4)
    ap.add_argument("--zo-eps", type=float, default=1e-3)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--methods", default="mesp,mebp,lcsb,mezo", help="curves to (re)measure; others are kept. lcsb:importance / lcsb:random: LCSB with that schedule")
    ap.add_argument("--skip-cosines", action="store_true", help="keep the cosines of the last run")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    args.data = OUT / "shakespeare"
    write_text_jsonl(shakespeare_passages(["hamlet", "macbeth", "othello"]), args.data)
    old = json.loads((OUT / f"{args.name}.json").read_text()) if (OUT / f"{args.name}.json").is_file() else {}
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "cosines": old["cosines"] if args.skip_cosines and "cosines" in old else cosines(args),
              "curves": {**old.get("curves", {}), **curves(args)}}
    (OUT / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    plot(result, OUT / f"{args.name}.png")
    print(f"wrote {OUT / args.name}.json and .png")


if __name__ == "__main__":
    main()
