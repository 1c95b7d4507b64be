"""One dataclass for a training run. YAML (mlx-lm's key names, `lora_parameters` included) is read first, then the CLI
flags that were given explicitly override it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .methods import METHODS


class ConfigError(ValueError):
    pass


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
    batch_size: int = 1
    learning_rate: float = 1e-5
    optimizer: str = "adamw"
    optimizer_config: dict = field(default_factory=dict)  # e.g. {"adamw": {"weight_decay": 0.01}}
    seed: int = 0
    max_seq_length: int | None = None  # None: the smaller of 2048 (mlx-lm's default) and the model's context
    mask_prompt: bool = False
    num_layers: int = -1
    lora_parameters: dict = field(default_factory=lambda: {"rank": 8, "scale": 20.0, "dropout": 0.0})
    adapter_path: str = "adapters"
    resume_adapter_file: str | None = None
    save_every: int = 100
    resume: bool = False  # continue the run saved in adapter_path (training_state.safetensors)
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or gradient does
    device_profile: str | None = None  # a named memory budget (mesp-mlx profiles)
    budget_mb: float | None = None  # a budget in MB (wins over the profile's)
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
    # demo: prompts answered before and after training
    demo_prompts: list = field(default_factory=list)
    demo_max_tokens: int = 48
    plot: bool = True

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def validate(self) -> None:
        from .governor import BudgetError, resolve_budget

        try:
            resolve_budget(self.device_profile, self.budget_mb)
        except BudgetError as e:
            raise ConfigError(str(e)) from None
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"--on-nonfinite must be stop or skip, not {self.on_nonfinite!r}")
        if not 0 < self.lcsb_fraction <= 1:
            raise ConfigError(f"--lcsb-fraction must be in (0, 1], not {self.lcsb_fraction}")
        if self.lcsb_schedule not in ("cyclic", "random", "importance"):
            raise ConfigError(f"--lcsb-schedule must be cyclic, random or importance, not {self.lcsb_schedule!r}")
        if self.lcsb_skipped not in ("freeze", "momentum"):
            raise ConfigError(f"--lcsb-skipped must be freeze or momentum, not {self.lcsb_skipped!r}")
        if self.zo_eps <= 0 or self.zo_samples < 1:
            raise ConfigError("--zo-eps must be > 0 and --zo-samples >= 1")
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r}: available: {', '.join(METHODS)}")
        if self.optimizer not in ("sgd", "adamw", "adam"):
            raise ConfigError(f"--optimizer {self.optimizer!r}: sgd, adamw or adam")
        if self.steps_per_eval < 0 or self.val_batches == 0 or self.val_batches < -1 or self.test_batches == 0 \
                or self.test_batches < -1:
            raise ConfigError("--steps-per-eval must be >= 0 (0: never) and --val-batches / --test-batches >= 1 or -1 "
                              "(all)")
        if self.iters < 1 or self.batch_size < 1 or (self.max_seq_length is not None and self.max_seq_length < 2):
            raise ConfigError("--iters and --batch-size must be >= 1 and --max-seq-length >= 2")
        if self.checkpoint_storage not in ("memory", "mmap"):
            raise ConfigError(f"--checkpoint-storage {self.checkpoint_storage!r}: memory or mmap")
        if self.data is None:
            raise ConfigError("--data is required (a folder with train.jsonl; mlx-lm's formats)")


# mlx-lm YAML keys we accept as they are, and the ones that name the same thing differently
_ALIASES = {"lora_layers": "num_layers", "grad_checkpoint": None,
            "fine_tune_type": None, "train": None, "wandb": None,
            "steps_per_report": "steps_per_report", "report_to": None, "project_name": None,
            "grad_accumulation_steps": None, "lr_schedule": None}


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: malformed YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    out = {}
    known = TrainConfig.keys()
    for k, v in raw.items():
        k2 = k.replace("-", "_")
        if k2 in _ALIASES:
            if _ALIASES[k2] is None:
                print(f"[mesp-mlx] note: {path}: key {k!r} (mlx-lm) has no effect here")
                continue
            k2 = _ALIASES[k2]
        if k2 not in known:
            raise ConfigError(f"{path}: unknown key {k!r}")
        out[k2] = v
    # relative data/model/adapter paths in a recipe are relative to the working directory, like mlx-lm's
    return out


def build_config(yaml_path: str | None, overrides: dict) -> TrainConfig:
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "lora_parameters" in values:
        values["lora_parameters"] = {**TrainConfig().lora_parameters, **values["lora_parameters"]}
    for k in ("learning_rate",):
        if k in values:
            values[k] = float(values[k])
    cfg = TrainConfig(**values)
    return cfg
