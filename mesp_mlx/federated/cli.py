"""`mesp-mlx federate`: its flags and the command (registered by mesp_mlx/cli.py; Flower is imported only to run)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..arguments import path_arg, positive_int_arg
from ..lock import FolderLock
from ..personalize.pipeline import MAX_BUFFER_KB, MAX_EVAL_TOKENS, MAX_VARIANTS
from ..plan.governor import PROFILES
from .fleet import USERS, parse_device

FAILED = 6  # exit status of a federation that did not complete (global/ keeps the last complete round)


def add_federate_parser(sub) -> None:
    p = sub.add_parser("federate", help="federated personalization: devices fine-tune LoRA on their users' dialogues "
                                        "within their budgets, a Flower server aggregates the adapters")
    p.add_argument("--device", action="append", default=[], type=path_arg, metavar="DIR[:PROFILE|:MB]",
                   help="a device: its folder (stream.jsonl + heldout.jsonl) and memory profile or budget in MB; "
                        "repeat per device")
    p.add_argument("--chatterbot-users", type=int, metavar="N",
                   help="instead of --device: N (1-4) chatterbot-corpus users (one per group of categories) with "
                        "different device profiles, written to OUT/devices")
    p.add_argument("--held-out", type=positive_int_arg, default=20,
                   help="--chatterbot-users: held-out dialogues per user")
    p.add_argument("--out", default="runs/federate", type=path_arg,
                   help="server outputs: rounds/, global/, rounds.jsonl, ...")
    p.add_argument("--model", type=path_arg, help="as for train (default: the embedded SmolLM2-135M-Instruct)")
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
    if bool(args.device) == bool(args.chatterbot_users):
        print("mesp-mlx: error: give either --device (repeated) or --chatterbot-users N", file=sys.stderr)
        return 2
    problem = argument_problem(args)
    if problem:  # refused before the output folder, the devices or Flower are touched
        print(f"mesp-mlx: error: {problem}", file=sys.stderr)
        return 2
    with FolderLock(args.out, flag="--out"):  # one writer per output folder (refused: exit 75)
        return _federate(args)


def argument_problem(args) -> str | None:
    """What is wrong with federate's arguments in one line, or None: what the devices would refuse each round (exit 6
    after starting Flower) is refused here, with exit 2."""
    ints = {"rounds": 1, "iters": 1, "batch_size": 1, "max_seq_length": 2, "rank": 1, "variants": 0,
            "eval_max_tokens": 1, "local_baseline_iters": 0, "seed": 0}
    for key, low in ints.items():
        if getattr(args, key) < low:
            return f"--{key.replace('_', '-')} must be >= {low}, not {getattr(args, key)}"
    for key, value, high in (("seed", args.seed, 2**32 - 1), ("variants", args.variants, MAX_VARIANTS),
                             ("eval-max-tokens", args.eval_max_tokens, MAX_EVAL_TOKENS)):
        if value > high:
            return f"--{key} must be at most {high}, not {value}"
    if not (math.isfinite(args.learning_rate) and args.learning_rate >= 0):
        return f"--learning-rate must be a finite number >= 0, not {args.learning_rate}"
    if not math.isfinite(args.scale):
        return f"--scale must be a finite number, not {args.scale}"
    if not 1 / 1024 <= args.buffer_kb <= MAX_BUFFER_KB:  # NaN fails too
        return f"--buffer-kb must be in [1/1024, {MAX_BUFFER_KB:g}] (a byte to a TB), not {args.buffer_kb}"
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        return f"--timeout must be a finite number of seconds > 0, not {args.timeout}"
    if args.chatterbot_users is not None and not 1 <= args.chatterbot_users <= len(USERS):
        return f"--chatterbot-users must be 1 to {len(USERS)}, not {args.chatterbot_users}"
    for text in args.device:
        spec = parse_device(text)
        if '"' in str(spec.folder):
            return f"--device {text}: a device folder's path cannot hold a double quote (Flower's --node-config)"
        for name in ("stream.jsonl", "heldout.jsonl"):
            if not (spec.folder / name).is_file():
                return f"--device {text}: {spec.folder} has no {name} (mesp-mlx make-data --corpus user-stream)"
        if spec.profile is not None and spec.profile not in PROFILES:
            return f"--device {text}: unknown device profile {spec.profile!r} (known: {', '.join(PROFILES)}; or DIR:MB)"
        if spec.budget_mb is not None and not (math.isfinite(spec.budget_mb) and spec.budget_mb > 0):
            return f"--device {text}: the budget must be a finite number of MB > 0, not {spec.budget_mb}"
    return None


def _federate(args) -> int:
    # Flower is imported when `federate` runs, not each time the CLI starts (flwr's import takes seconds)
    from .device import Settings  # Flower: see the comment above
    from .fleet import chatterbot_fleet, parse_device  # Flower: as above
    from .run import FederateError, federate  # Flower: as above

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
