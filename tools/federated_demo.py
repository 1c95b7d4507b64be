"""The federated personalization demo (issue 19): chatterbot-corpus users (one user per group of categories) as
3-4 emulated phones with different memory profiles, on the embedded SmolLM2-135M-Instruct, on Flower's deployment
engine on localhost (a SuperLink and one SuperNode per device, started and stopped by `mesp-mlx federate`'s launcher).

Each device selects its user's dialogues into its buffer, fine-tunes with MeSP under its own budget each round,
and sends only LoRA tensors and scalar metrics; the server aggregates them with FlexLoRA. At the end every device
scores on its user's held-out dialogues (ROUGE-1): the base model, a local-only adapter (the same number of steps as
the federation's rounds x iters, on its own data alone), the final global adapter and its personal adapter
(the global adapter of the previous round fine-tuned on its own data in the last round).

    python tools/federated_demo.py                         # 3 devices, 2 rounds, 15 steps per round
    python tools/federated_demo.py --devices 4 --rounds 3 --iters 20

Writes tools/out/federated.json and tools/out/federated.md (tables) and the run under tools/out/federated/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mesp_mlx.federated.cli import table  # noqa: E402
from mesp_mlx.federated.device import Settings  # noqa: E402
from mesp_mlx.federated.fleet import USERS, chatterbot_fleet  # noqa: E402
from mesp_mlx.federated.run import federate  # noqa: E402
from mesp_mlx.io import atomic_write_json, atomic_write_text  # noqa: E402
from mesp_mlx.models.load import resolve_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--buffer-kb", type=float, default=24.0)
    ap.add_argument("--variants", type=int, default=0)
    ap.add_argument("--held-out", type=int, default=20)
    ap.add_argument("--eval-max-tokens", type=int, default=32)
    ap.add_argument("--aggregation", default="flexlora", choices=["flexlora", "fedit"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=5400.0)
    ap.add_argument("--out", default=str(ROOT / "tools" / "out" / "federated"))
    args = ap.parse_args()
    out = Path(args.out)
    model = str(resolve_model(None))  # the embedded SmolLM2, imported once before the devices start
    devices = chatterbot_fleet(args.devices, out / "devices", args.held_out, args.seed)
    settings = Settings(model=model, iters=args.iters, batch_size=args.batch_size, learning_rate=args.learning_rate,
                        buffer_kb=args.buffer_kb, variants=args.variants, eval_max_tokens=args.eval_max_tokens,
                        seed=args.seed, local_baseline_iters=args.rounds * args.iters)
    t = time.perf_counter()
    summary = federate(out / "server", devices, settings, args.rounds, args.aggregation, args.timeout,
                       log=lambda m: print(m, flush=True))
    seconds = time.perf_counter() - t
    rounds = [json.loads(x) for x in (out / "server" / "rounds.jsonl").read_text().splitlines()]
    users = list(USERS)[:args.devices]
    evaluation = [{**e, "user": users[e["partition_id"]], "profile": devices[e["partition_id"]].profile}
                  for e in summary["evaluation"]]
    named = [{**e, "partition_id": f"{e['partition_id']} ({e['user']}, {e['profile']})"} for e in evaluation]
    atomic_write_json(out.parent / "federated.json", {"settings": vars(args), "seconds": round(seconds, 1),
                                                      "evaluation": evaluation, "rounds": rounds})
    lines = [f"{args.devices} devices (chatterbot-corpus users: {', '.join(users)}), {args.rounds} rounds x "
             f"{args.iters} MeSP steps (AdamW {args.learning_rate:g}, batch {args.batch_size}, r 8), "
             f"{args.aggregation}; held-out ROUGE-1 on each user's last {args.held_out} dialogues; "
             f"{seconds / 60:.1f} min", "", table(named).replace("| device |", "| device (user) |"), "",
             "| round | device | examples | loss first -> last | peak MB / budget MB | aggregation error vs exact mean "
             "of dW |", "|---|---|---|---|---|---|"]
    for r in rounds:
        for d in sorted(r["devices"], key=lambda d: d["partition_id"]):
            lines.append(f"| {r['round']} | {d['partition_id']} ({users[d['partition_id']]}) | {d['num_examples']} | "
                         f"{d['loss_first']:.3f} -> {d['loss_last']:.3f} | {d['peak_mb']:.1f} / {d['budget_mb']:.0f} | "
                         f"{r['aggregation']['rel_error']:.4f} |")
    atomic_write_text(out.parent / "federated.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
