"""Type and range of every training setting, checked before anything runs (one line naming the file and key, or the
flag, that gave the value)."""

from __future__ import annotations

import math
import numbers

import mlx.core as mx
import mlx.optimizers as optim

from ..arguments import folder_problem, path_problem
from ..methods import METHODS
from ..models.compute import QUANT_BITS, QUANT_GROUP_SIZES
from .optimizers import OPTIMIZERS, optimizer_arguments


class ConfigError(ValueError):
    """A setting that cannot run: raised before anything runs, naming the file and key or the flag that gave it."""

INT = {  # name: (lowest allowed, extra allowed values)
    "iters": (1, ()), "batch_size": (1, ()), "seed": (0, ()), "max_seq_length": (2, ()), "num_layers": (1, (-1,)),
    "save_every": (0, ()), "steps_per_report": (1, ()), "steps_per_eval": (0, ()), "val_batches": (1, (-1,)),
    "test_batches": (1, (-1,)), "zo_samples": (1, ()), "quantize_bits": (1, ()), "quantize_group_size": (1, ()),
    "demo_max_tokens": (1, ()), "grad_accumulation_steps": (1, ()), "vocab_chunk": (1, ()),
    "keep_activations": (0, (-1,)), "keep_dequantized": (0, (-1,)), "lanes": (1, ()), "epochs": (1, ()),
    "group_size": (2, ()), "max_completion_length": (1, ()), "top_k": (0, ()),
}
FLOAT = {  # name: (low, low inclusive, high or None)
    "learning_rate": (0.0, True, None), "lcsb_fraction": (0.0, False, 1.0), "zo_eps": (0.0, False, None),
    "zo_weight_decay": (0.0, True, None), "budget_mb": (-math.inf, True, None),
    "footprint_limit": (0.0, False, None), "beta": (0.0, True, None),
    "max_grad_norm": (0.0, False, None), "temperature": (0.0, True, None), "top_p": (0.0, False, 1.0),
    "min_p": (0.0, True, 1.0), "epsilon": (0.0, True, 1.0), "epsilon_high": (0.0, True, None),
}
BOOL = ("store_h", "mask_prompt", "train_all_turns", "resume", "skip_plan", "test", "stream_weights", "plot",
        "keep_attention", "follow_adapter_config")
CHOICES = {
    "lcsb_schedule": ("cyclic", "random", "importance"), "lcsb_skipped": ("freeze", "momentum"),
    "on_nonfinite": ("stop", "skip"), "compute_path": ("auto", "fused", "dequant"),
    "dtype": ("auto", "float32", "float16", "bfloat16", "native"), "checkpoint_storage": ("memory", "mmap"),
    "clear_cache": ("block", "step", "never"), "fine_tune_type": ("lora", "dora"),
    "train_mode": ("sft", "dpo", "orpo", "grpo"), "dpo_cpo_loss_type": ("sigmoid", "hinge", "ipo"),
    "grpo_loss_type": ("grpo", "bnpo", "dr_grpo"), "importance_sampling_level": ("token", "sequence"),
}
# past these a value is a typo, not a wish, and would end in a crash (no thread for a lane, a memory limit past 2**63
# bytes) or in a run that never ends (SPSA draws per step); MB for the budgets (1e9 MB: a PB)
HIGH = {"lanes": 256, "zo_samples": 1024, "budget_mb": 1e9, "footprint_limit": 1e9}
INT_CHOICES = {"quantize_bits": QUANT_BITS, "quantize_group_size": QUANT_GROUP_SIZES}  # what MLX quantizes with
PATHS = ("model", "data", "adapter_path", "resume_adapter_file", "checkpoint_dir")
STRINGS = ("model", "data", "adapter_path", "resume_adapter_file", "checkpoint_dir", "device_profile")
NULLABLE = ("vocab_chunk", "budget_mb", "footprint_limit", "max_grad_norm", "epochs", "epsilon_high", "max_seq_length", "keep_activations", "keep_dequantized",
            "keep_attention", "lanes") + STRINGS  # max_seq_length None: the model's context


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_settings(cfg, sources: dict) -> None:

    def fail(key: str, what: str, value) -> None:
        where = sources.get(key) or f"--{key.replace('_', '-')}"
        raise ConfigError(f"{where}: {what}, not {value!r}")

    for key in NULLABLE:
        if getattr(cfg, key) is None:
            continue
        if key in STRINGS and not isinstance(getattr(cfg, key), str):
            fail(key, "must be a string (a path or a name)", getattr(cfg, key))
    for key, (low, extra) in INT.items():
        v = getattr(cfg, key)
        if v is None and key in NULLABLE:
            continue
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            fail(key, "must be an integer", v)
        if v < low and v not in extra:
            fail(key, f"must be >= {low}" + (f" (or {', '.join(map(str, extra))})" if extra else ""), v)
        if key == "seed" and v >= 2**32:  # numpy's stream (mlx-lm's batch order) takes 32-bit seeds
            fail(key, "must be < 2**32", v)
        if key in INT_CHOICES and v not in INT_CHOICES[key]:
            fail(key, f"must be one of {', '.join(map(str, INT_CHOICES[key]))} (what MLX quantizes with)", v)
    for key, (low, inclusive, high) in FLOAT.items():
        v = getattr(cfg, key)
        if v is None and key in NULLABLE:
            continue
        if not _number(v) or not math.isfinite(v):
            fail(key, "must be a finite number", v)
        if v < low or (v == low and not inclusive) or (high is not None and v > high):
            fail(key, f"must be in {'[' if inclusive else '('}{low:g}, {high if high is not None else 'inf'}"
                      f"{']' if high is not None else ')'}", v)
    for key, high in HIGH.items():
        if getattr(cfg, key) is not None and getattr(cfg, key) > high:
            fail(key, f"must be <= {high:g}", getattr(cfg, key))
    for key in PATHS:
        value = getattr(cfg, key)
        problem = value and (folder_problem(value) if key == "checkpoint_dir" else path_problem(value))
        if problem:
            raise ConfigError(f"{sources.get(key) or '--' + key.replace('_', '-')}: {problem}")
    for key in BOOL:
        if getattr(cfg, key) is None and key in NULLABLE:
            continue
        if not isinstance(getattr(cfg, key), bool):
            fail(key, "must be true or false", getattr(cfg, key))
    for key, choices in {**CHOICES, "method": tuple(METHODS), "optimizer": tuple(OPTIMIZERS)}.items():
        v = getattr(cfg, key)
        if key == "fine_tune_type" and v == "full":
            fail(key, "full fine-tuning is refused here: the base stays frozen 4-bit (use lora or dora)", v)
        if v not in choices:
            fail(key, f"must be one of {', '.join(choices)}", v)
    if not isinstance(cfg.demo_prompts, list) or not all(isinstance(p, str) for p in cfg.demo_prompts):
        fail("demo_prompts", "must be a list of strings", cfg.demo_prompts)
    _check_lora(cfg.lora_parameters, fail)
    _check_optimizer_config(cfg.optimizer_config, fail)
    _check_schedule(cfg.lr_schedule, fail)


def _check_lora(lp, fail) -> None:
    key = "lora_parameters"
    if not isinstance(lp, dict):
        fail(key, "must be a mapping (rank, scale, dropout, keys)", lp)
    unknown = set(lp) - {"rank", "scale", "dropout", "keys"}
    if unknown:
        fail(key, f"unknown entry {sorted(unknown)[0]!r} (rank, scale, dropout, keys)", lp)
    if not isinstance(lp.get("rank"), numbers.Integral) or isinstance(lp.get("rank"), bool):
        fail(key, "rank must be an integer", lp.get("rank"))
    if not _number(lp.get("scale")) or not math.isfinite(lp["scale"]):
        fail(key, "scale must be a finite number", lp.get("scale"))
    if not _number(lp.get("dropout")) or not 0 <= lp["dropout"] < 1:
        fail(key, "dropout must be a number in [0, 1)", lp.get("dropout"))
    keys = lp.get("keys")
    if keys is not None and (not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys)):
        fail(key, "keys must be a non-empty list of module names", keys)


def _check_optimizer_config(oc, fail) -> None:

    key = "optimizer_config"
    if not isinstance(oc, dict):
        fail(key, "must be a mapping of optimizer name to its arguments", oc)
    for name, args in oc.items():
        if name not in OPTIMIZERS:
            fail(key, f"unknown optimizer {name!r} ({', '.join(OPTIMIZERS)})", oc)
        if args is None:
            continue
        if not isinstance(args, dict):
            fail(key, f"{name}: must be a mapping of arguments", args)
        allowed = optimizer_arguments(name)
        for arg, v in args.items():
            if arg not in allowed:
                fail(key, f"{name} has no argument {arg!r} (it takes {', '.join(allowed)})", arg)
            values = v if isinstance(v, (list, tuple)) else [v]
            if not all(isinstance(x, bool) or (_number(x) and math.isfinite(x)) for x in values):
                fail(key, f"{name}.{arg} must be a finite number, a boolean or a list of numbers", v)


def _check_schedule(spec, fail) -> None:

    key = "lr_schedule"
    if spec is None:
        return
    if not isinstance(spec, dict):
        fail(key, "must be a mapping {name, arguments, warmup, warmup_init}", spec)
    unknown = set(spec) - {"name", "arguments", "warmup", "warmup_init"}
    if unknown:
        fail(key, f"unknown entry {sorted(unknown)[0]!r} (name, arguments, warmup, warmup_init)", spec)
    names = [n for n in dir(optim.schedulers) if not n.startswith("_") and n not in ("Callable", "List", "mx", "math")
             and callable(getattr(optim.schedulers, n))]
    if spec.get("name") not in names:
        fail(key, f"name must be one of mlx.optimizers' schedules ({', '.join(names)})", spec.get("name"))
    args = spec.get("arguments")
    if not isinstance(args, list) or not args or not all(_number(a) and math.isfinite(a) for a in args):
        fail(key, "arguments must be a non-empty list of finite numbers (the first is the initial learning rate)", args)
    if args[0] < 0:
        fail(key, "the initial learning rate (arguments[0]) must be >= 0", args[0])
    warmup = spec.get("warmup", 0)
    if not isinstance(warmup, numbers.Integral) or isinstance(warmup, bool) or warmup < 0:
        fail(key, "warmup must be an integer >= 0", warmup)
    init = spec.get("warmup_init", 0.0)
    if not _number(init) or not math.isfinite(init) or init < 0:
        fail(key, "warmup_init must be a finite number >= 0", init)
    try:
        fn = getattr(optim.schedulers, spec["name"])(*args)

        lr = fn(mx.array(0, mx.uint64)).item()
    except Exception as e:  # noqa: BLE001 - wrong arity or types of a schedule's arguments
        fail(key, f"{spec['name']}{tuple(args)} cannot be built ({e})", spec)
    if not math.isfinite(lr):
        fail(key, "the schedule gives a non-finite learning rate", spec)
