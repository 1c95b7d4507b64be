"""`mesp-mlx federate`: its flags and the command (registered by mesp_mlx/cli.py; Flower is imported only to run)."""

from __future__ import annotations

import sys
from pathlib import Path

FAILED = 6  # exit status of a federation that did not complete (global/ keeps the last complete round)


def add_federate_parser(sub) -> None:
    p = sub.add_parser("federate", help="federated personalization: devices fine-tune LoRA on their users' dialogues "
                                        "within their budgets, a Flower server aggregates the adapters")
    p.add_argument("--device", action="append", default=[], metavar="DIR[:PROFILE|:MB]",
                   help="a device: its folder (stream.jsonl + heldout.jsonl) and memory profile or budget in MB; "
                        "repeat per device")
    p.add_argument("--chatterbot-users", type=int, metavar="N",
                   help="instead of --device: N (1-4) chatterbot-corpus users (one per group of categories) with "
                        "different device profiles, written to OUT/devices")
    p.add_argument("--held-out", type=int, default=20, help="--chatterbot-users: held-out dialogues per user")
    p.add_argument("--out", default="runs/federate", help="server outputs: rounds/, global/, rounds.jsonl, ...")
    p.add_argument("--model", help="as for train (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--aggregation", default="flexlora", choices=["flexlora", "fedit"],
                   help="flexlora: average s·A·B, SVD back to rank r (error reported); fedit: average A and B apart")
    p.add_argument("--iters", type=int, default=20, help="MeSP steps per device per round")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--buffer-kb", type=float, default=48.0, help="each device's selection buffer")
    p.add_argument("--variants", type=int, default=0, help="self-synthesised paraphrases per kept prompt")
    p.add_argument("--eval-max-tokens", type=int, default=48)
    p.add_argument("--local-baseline-iters", type=int, default=0,
                   help="also train a local-only adapter per device for this many steps and score it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds for the whole run (then all is stopped)")
    p.set_defaults(func=cmd_federate)


def cmd_federate(args) -> int:
    # Flower is imported when `federate` runs, not each time the CLI starts (flwr's import takes seconds)
    from .device import Settings  # Flower: see the comment above
    from .fleet import chatterbot_fleet, parse_device  # Flower: as above
    from .run import FederateError, federate  # Flower: as above

    if bool(args.device) == bool(args.chatterbot_users):
        print("mesp-mlx: error: give either --device (repeated) or --chatterbot-users N", file=sys.stderr)
        return 2
    try:
        devices = ([parse_device(d) for d in args.device] if args.device else
                   chatterbot_fleet(args.chatterbot_users, Path(args.out) / "devices", args.held_out, args.seed))
    except ValueError as e:
        print(f"mesp-mlx: error: {e}", file=sys.stderr)
        return 2
    settings = Settings(model=args.model, iters=args.iters, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, max_seq_length=args.max_seq_length, rank=args.rank,
                        scale=args.scale, buffer_kb=args.buffer_kb, variants=args.variants,
                        eval_max_tokens=args.eval_max_tokens, seed=args.seed,
                        local_baseline_iters=args.local_baseline_iters)
    try:
        summary = federate(args.out, devices, settings, args.rounds, args.aggregation, args.timeout)
    except FederateError as e:
        print(f"mesp-mlx: error: {e}", file=sys.stderr)
        return FAILED
    print(table(summary["evaluation"]))
    return 0


def table(evaluation: list[dict]) -> str:
    cols = [("rouge1_base", "base"), ("rouge1_local", "local only"), ("rouge1_global", "federated global"),
            ("rouge1_personal", "federated + personal")]
    cols = [(k, name) for k, name in cols if any(k in e for e in evaluation)]
    lines = ["| device | " + " | ".join(name for _, name in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for e in evaluation:
        lines.append(f"| {e['partition_id']} | " + " | ".join(f"{e[k]:.4f}" if k in e else "-" for k, _ in cols) + " |")
    return "\n".join(lines)
