"""One dataclass for a training run. YAML (mlx-lm's key names, `lora_parameters` included) is read first, then the CLI
flags that were given explicitly override it."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..plan.governor import BudgetError, resolve_budget, resolve_footprint_limit
from .checks import ConfigError, check_settings


@dataclass
class TrainConfig:
    model: str | None = None  # local folder, .gguf, hub repo id, or None for the embedded SmolLM2
    data: str | None = None
    method: str = "mesp"
    store_h: bool = False  # MeSP: keep h = xA from the recompute instead of recomputing it in backward
    lcsb_fraction: float = 0.25  # LCSB: share of the trainable blocks back-propagated per step
    lcsb_schedule: str = "cyclic"  # cyclic | random | importance
    lcsb_skipped: str = "freeze"  # freeze | momentum: skipped blocks' optimizer state
    zo_eps: float = 1e-3  # MeZO: perturbation size
    zo_samples: int = 1  # MeZO: SPSA draws averaged per step (n-SPSA)
    zo_weight_decay: float = 0.0  # MeZO: weight decay in its own update
    iters: int = 100
    epochs: int | None = None  # passes over train.jsonl instead of --iters (iters = epochs x batches per epoch)
    max_grad_norm: float | None = None  # clip by the global norm over every block's LoRA gradient (None: no clip)
    batch_size: int = 1
    learning_rate: float = 1e-5
    optimizer: str = "adam"  # mlx-lm's default (adam | adamw | sgd | adafactor | muon)
    optimizer_config: dict = field(default_factory=dict)  # e.g. {"adamw": {"weight_decay": 0.01}}
    lr_schedule: dict | None = None  # mlx-lm's {name, arguments, warmup, warmup_init}
    grad_accumulation_steps: int = 1  # micro-batches per optimizer step (iters counts micro-batches, as mlx-lm)
    fine_tune_type: str = "lora"  # lora | dora (full is refused: the base stays frozen 4-bit)
    train_mode: str = "sft"  # sft | dpo | orpo | grpo (mlx-lm-lora's modes and key names; docs/training.md)
    beta: float = 0.1  # dpo / orpo: the preference term's temperature (DPO) or weight (ORPO); grpo: the KL weight
    dpo_cpo_loss_type: str = "sigmoid"  # dpo: sigmoid | hinge | ipo
    # grpo (mlx-lm-lora's keys): G completions sampled per prompt, rewarded, normalised within the group
    group_size: int = 4
    max_completion_length: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 20
    min_p: float = 0.0
    epsilon: float = 1e-4  # the ratio's clip: [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # None: epsilon
    grpo_loss_type: str = "grpo"  # grpo | bnpo | dr_grpo
    importance_sampling_level: str = "token"  # token | sequence
    reward_functions: list = field(default_factory=lambda: ["exact_match"])  # built-ins or module:function
    reward_weights: list | None = None  # one per reward function (None: 1 each)
    seed: int = 0
    max_seq_length: int | None = None  # None: the smaller of 2048 (mlx-lm's default) and the model's context
    mask_prompt: bool = False
    train_all_turns: bool = False  # chat data: the loss covers every assistant message (mask_prompt: the last only)
    num_layers: int = -1
    lora_parameters: dict = field(default_factory=lambda: {"rank": 8, "scale": 20.0, "dropout": 0.0})
    adapter_path: str = "adapters"
    resume_adapter_file: str | None = None
    follow_adapter_config: bool = False  # --resume-adapter-file: adopt its adapter_config.json's LoRA settings
    save_every: int = 100
    resume: bool = False  # continue the run saved in adapter_path (training_state.safetensors)
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or gradient does
    device_profile: str | None = None  # a named memory budget (mesp-mlx profiles)
    budget_mb: float | None = None  # a budget in MB (wins over the profile's)
    footprint_limit: float | None = None  # the process footprint's limit in MB (wins over the profile's; footprint.py)
    skip_plan: bool = False  # start even when the planner predicts the budget is exceeded
    steps_per_report: int = 1
    steps_per_eval: int = 200  # held-out loss on valid.jsonl every N steps (and before the first, after the last)
    val_batches: int = 25  # batches of valid.jsonl per evaluation (-1: all of it)
    test: bool = False  # after training, the loss on test.jsonl
    test_batches: int = 500  # batches of test.jsonl (-1: all)
    # model / compute
    quantize_bits: int = 4
    quantize_group_size: int = 64
    compute_path: str = "auto"  # auto | fused | dequant
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16 | native
    # engine
    stream_weights: bool = False
    checkpoint_storage: str = "memory"  # memory | mmap
    checkpoint_dir: str | None = None
    vocab_chunk: int | None = None
    clear_cache: str = "block"  # block | step | never
    # speed levers (speed_plan.py): None = the planner picks the fastest that fits the budget; a value = this, as given
    keep_activations: int | None = None  # MeSP: blocks (from the top) whose forward context is kept, not recomputed
    keep_attention: bool | None = None  # MeSP: those blocks keep their attention probabilities too
    keep_dequantized: int | None = None  # CPU path: blocks (from the top) whose fp32 weights stay resident
    lanes: int | None = None  # a block's rows split over this many CPU threads (engine/lanes.py); None: one per core
    # demo: prompts answered before and after training
    demo_prompts: list = field(default_factory=list)
    demo_max_tokens: int = 48
    plot: bool = True

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def validate(self) -> None:
        """Every setting's type and range (naming the YAML file and key, or the flag, that gave it), then the
        settings that depend on each other. Raises ConfigError before anything runs."""
        check_settings(self, getattr(self, "_sources", {}))
        try:
            resolve_budget(self.device_profile, self.budget_mb)
            resolve_footprint_limit(self.device_profile, self.footprint_limit)
        except BudgetError as e:
            raise ConfigError(str(e)) from None
        where = getattr(self, "_sources", {})

        def name(key):
            return where.get(key) or f"--{key.replace('_', '-')}"

        if self.method == "mezo":  # MeZO's update is its own SGD step; what it cannot honour is refused by name
            if self.grad_accumulation_steps != 1:
                raise ConfigError(f"{name('grad_accumulation_steps')}: MeZO (forward-only) has no gradient to "
                                  "accumulate; use a larger --batch-size or --zo-samples")
            if self.max_grad_norm is not None:
                raise ConfigError(f"{name('max_grad_norm')}: MeZO (forward-only) has no gradient to clip")
            if "optimizer" in where and self.optimizer != "sgd" or "optimizer_config" in where:
                raise ConfigError(f"{name('optimizer' if 'optimizer' in where else 'optimizer_config')}: MeZO "
                                  "steps with its own SGD update (--zo-weight-decay); only optimizer sgd applies")
        if self.data is None:
            raise ConfigError("--data is required (a folder with train.jsonl; mlx-lm's formats)")
        if self.train_all_turns and self.train_mode != "sft":
            raise ConfigError(f"{name('train_all_turns')}: trains next-token targets (--train-mode sft); "
                              f"--train-mode {self.train_mode} has its own prompt and responses")
        if self.train_mode != "sft":  # the preference objectives (objectives/preference.py) need a backward
            if self.method == "mezo":
                raise ConfigError(f"{name('train_mode')} {self.train_mode}: MeZO has no backward for a preference "
                                  "loss; use --method mesp, mebp or lcsb")
            if self.train_mode == "grpo":
                _check_grpo(self, name)
            elif self.beta == 0:
                raise ConfigError(f"{name('beta')}: {self.train_mode} needs beta > 0 (the preference term's "
                                  "temperature or weight)")
            if self.train_mode in ("dpo", "grpo") and self.fine_tune_type == "dora" and self.beta != 0:
                raise ConfigError(f"{name('train_mode')} {self.train_mode}: its reference is the model with the "
                                  "adapters off, which DoRA's magnitudes do not give; use --fine-tune-type lora"
                                  + (" (or ORPO)" if self.train_mode == "dpo" else " (or --beta 0: no KL term)"))


def reward_list(value) -> list:
    """reward_functions as a list: a YAML list, or mlx-lm-lora's comma-separated string."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else value


def _weights(text: str, where: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"{where}: comma-separated numbers, not {text!r}") from None


def _check_grpo(cfg, name) -> None:
    """GRPO's settings that depend on each other (their types and ranges are checks.py's)."""
    functions = reward_list(cfg.reward_functions)
    if not isinstance(functions, list) or not functions or not all(isinstance(f, str) for f in functions):
        raise ConfigError(f"{name('reward_functions')}: a list of reward functions (built-in names, regex:PATTERN, "
                          f"length:N or module:function), not {cfg.reward_functions!r}")
    weights = cfg.reward_weights
    if weights is not None and (not isinstance(weights, list) or len(weights) != len(functions) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)):
        raise ConfigError(f"{name('reward_weights')}: one weight per reward function ({len(functions)}), not "
                          f"{weights!r}")
    if cfg.epsilon_high is not None and cfg.epsilon_high < 0:
        raise ConfigError(f"{name('epsilon_high')}: must be >= 0, not {cfg.epsilon_high!r}")


# mlx-lm keys with another name here, and the mlx-lm keys that cannot change training here (said once, then dropped)
_ALIASES = {"lora_layers": "num_layers"}
_NO_EFFECT = {
    "grad_checkpoint": "training is always block-checkpointed here",
    "report_to": "nothing leaves the machine (metrics.jsonl and the plots are the report)",
    "wandb": "nothing leaves the machine (metrics.jsonl and the plots are the report)",
    "project_name": "nothing leaves the machine (metrics.jsonl and the plots are the report)",
    "train": "`mesp-mlx train` always trains",
    "clear_cache_threshold": "the engine returns MLX's cache after every block (--clear-cache)",
    "trust_remote_code": "no remote code is run here",
}


class _Loader(yaml.SafeLoader):
    """mlx-lm's YAML loader: 1e-5 (no dot) is a float, as in mlx_lm.lora's yaml_loader."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*|[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.VERBOSE),
    list("-+0123456789."))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        raw = yaml.load(text, _Loader) or {}
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line
        raise ConfigError(f"{where}: malformed YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    out = {}
    known = TrainConfig.keys()
    for k, v in raw.items():
        k2 = _ALIASES.get(str(k).replace("-", "_"), str(k).replace("-", "_"))
        if k2 in _NO_EFFECT:
            print(f"[mesp-mlx] note: {path}: key {k!r} (mlx-lm) has no effect here: {_NO_EFFECT[k2]}")
            continue
        if k2 not in known:
            raise ConfigError(f"{path}: unknown key {k!r}")
        out[k2] = v
    # relative data/model/adapter paths in a recipe are relative to the working directory, like mlx-lm's
    return out


def build_config(yaml_path: str | None, overrides: dict) -> TrainConfig:
    """YAML values, then the flags given; each value remembers where it came from (for the one-line errors)."""
    values = load_yaml(yaml_path) if yaml_path else {}
    sources = {k: f"{yaml_path}: key {k!r}" for k in values}
    given = {k: v for k, v in overrides.items() if v is not None}
    for k in [k for k in given if k in _NO_EFFECT]:
        print(f"[mesp-mlx] note: --{k.replace('_', '-')} (mlx-lm) has no effect here: {_NO_EFFECT[k]}")
        del given[k]
    sources.update({k: f"--{k.replace('_', '-')}" for k in given})
    values.update(given)
    if isinstance(values.get("lora_parameters"), dict):
        values["lora_parameters"] = {**TrainConfig().lora_parameters, **values["lora_parameters"]}
    if isinstance(values.get("reward_functions"), str):  # mlx-lm-lora's comma-separated form
        values["reward_functions"] = reward_list(values["reward_functions"])
    if isinstance(values.get("reward_weights"), str):
        values["reward_weights"] = _weights(values["reward_weights"], sources["reward_weights"])
    cfg = TrainConfig(**values)
    cfg._sources = sources
    return cfg
