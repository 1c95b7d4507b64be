"""The run's first stage: the model with its LoRA, the data and its batches, and the plan the engine will execute.

Nothing here writes into the user's TrainConfig: what the run decides (the sequence length the model allows, the
family's LoRA keys, the lanes, the speed levers) comes back as `Prepared.settings` and `RunPlan.settings`, copies with
those values filled in. `mesp-mlx plan` calls `prepare_run` too, so it plans for exactly what `train` would run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .. import backend
from ..adapters.lora import apply_lora, cast_lora, load_adapter_weights, match_adapter_config
from ..data.datasets import BatchIterator, DataError, data_bytes, load_splits
from ..data.preference import PairBatches, load_pairs
from ..data.prompts import PromptBatches, load_prompts
from ..distributed import Ranks
from ..engine import WeightStreamer
from ..engine.lanes import lane_count
from ..methods import Method, method_for
from ..methods.mesp import to_mesp_lora
from ..models import (
    ModelParts,
    cast_float_params,
    context_length,
    family_lora_parameters,
    load_model,
    set_compute_path,
)
from ..models.compute import keep_dequantized_blocks
from ..objectives.rewards import Rewards
from ..plan.governor import resolve_budget, resolve_footprint_limit
from ..plan.memory import PlanResult, mlx_room_mb, predict, predict_fresh, reserve_generation
from ..plan.resolve import RunPlan, check_budget, plan_run
from ..plan.speed import HEADROOM
from .checks import ConfigError
from .rollouts import RolloutBatches, Sampling
from .state import saved_setting


@dataclass
class Prepared:
    """A model as a run trains it: loaded, on its compute path, LoRA applied (MeSP's VJP layers under MeSP)."""
    model: object
    tokenizer: object
    config: dict  # the model's config.json
    path: Path
    parts: ModelParts
    compute_path: str
    streamer: WeightStreamer | None
    n_trainable: int
    settings: object  # the TrainConfig with max_seq_length and lora_parameters resolved for this model


def default_seq_length(cfg, context: int | None) -> int:
    """The run's sequence length: as given (refused over the model's context), else the smaller of 2048 (mlx-lm's
    default) and the context."""
    if cfg.max_seq_length is None:
        return min(2048, context) if context else 2048
    if context and cfg.max_seq_length > context:
        raise ConfigError(f"--max-seq-length {cfg.max_seq_length} exceeds the model's context of {context} tokens")
    return cfg.max_seq_length


def prepare_model(cfg) -> Prepared:
    """Load, pick the compute path and dtype, set up streaming, wrap with LoRA, resume an adapter if asked."""
    loaded = load_model(cfg.model, cfg.quantize_bits, cfg.quantize_group_size, lazy=True)
    model = loaded.model
    path = backend.compute_path(cfg.compute_path)
    set_compute_path(model, path)
    cast_float_params(model, backend.default_dtype() if cfg.dtype == "auto" else cfg.dtype)
    seq = default_seq_length(cfg, context_length(loaded.config))
    streamer = None
    if cfg.stream_weights:
        streamer = WeightStreamer(loaded.path, model, model.layers)
        streamer.release_all()
    lora_parameters = family_lora_parameters(model, cfg.lora_parameters)  # the family's keys unless given
    num_layers, fine_tune_type = cfg.num_layers, cfg.fine_tune_type
    if cfg.resume_adapter_file:  # its adapter_config.json must agree (or, --follow-adapter-config, is taken)
        lora_parameters, num_layers, fine_tune_type = match_adapter_config(
            cfg.resume_adapter_file, lora_parameters, num_layers, fine_tune_type, len(model.layers),
            cfg.follow_adapter_config)
    n_trainable = apply_lora(model, num_layers, lora_parameters, dora=fine_tune_type == "dora")
    cast_lora(model, mx.float32)
    if cfg.method == "mesp":
        to_mesp_lora(model)  # blocks the hand rule cannot take still get MeSP's LoRA VJPs under the fallback
    if cfg.resume_adapter_file:
        load_adapter_weights(model, cfg.resume_adapter_file)
    if streamer is None:
        mx.eval(model.parameters())
    else:
        mx.eval(model.trainable_parameters())
    settings = dataclasses.replace(cfg, max_seq_length=seq, lora_parameters=lora_parameters, num_layers=num_layers,
                                   fine_tune_type=fine_tune_type)
    return Prepared(model, loaded.tokenizer, loaded.config, loaded.path, ModelParts(model, path, streamer), path,
                    streamer, n_trainable, settings)


def predict_lean(cfg) -> PlanResult:
    """The leanest plan of run `cfg` by component, on a freshly prepared model."""
    return predict_fresh(cfg, prepare_model)[1]


def check_fits(cfg, log) -> None:
    """Refuse now (OverBudget, naming the settings that fit) a run predicted not to fit its budget: for callers with
    slow stages before they call train() (personalize)."""
    budget_mb, budget_text = resolve_budget(cfg.device_profile, cfg.budget_mb)
    if budget_mb is None and resolve_footprint_limit(cfg.device_profile, cfg.footprint_limit)[0] is None:
        return
    settings, lean = predict_fresh(cfg, prepare_model)
    check_budget(settings, lean, budget_mb, budget_text, prepare_model, log)


@dataclass
class PreparedRun:
    """Everything the loop needs, built once: the model, the data, the method and the plan."""
    prep: Prepared
    splits: dict
    batches: BatchIterator
    method: Method
    plan: RunPlan

    @property
    def settings(self):
        return self.plan.settings


def apply_levers(prep: Prepared, method: Method, levers) -> None:
    """What the plan's levers set outside the engine: the method's kept attention probabilities, and on the CPU path
    the blocks whose fp32 weights stay resident (the kept contexts are the engine's: keep_activations)."""
    inner = getattr(method, "inner", method)  # LCSB runs MeSP's rule inside
    if hasattr(inner, "keep_attention"):
        inner.keep_attention = levers.keep_attention
    if prep.compute_path == "dequant" and levers.keep_dequantized:
        keep_dequantized_blocks(prep.parts.layers, levers.keep_dequantized)


def resolve_lanes(cfg, adapter_path: Path) -> int:
    """A resumed run keeps the interrupted run's lanes (so its continuation stays bit-exact); else as given, or one
    per core."""
    lanes = cfg.lanes
    if lanes is None and cfg.resume:
        lanes = saved_setting(adapter_path, "lanes")
    return lane_count(lanes)


def prepare_run(cfg, ranks: Ranks, log, lever_log=None) -> PreparedRun:
    """Model, data and plan of run `cfg` for this rank; refuses (OverBudget) a run predicted not to fit its budget
    before anything is written. `lever_log` reports the speed levers chosen (default: `log`)."""
    budget_mb, budget_text = resolve_budget(cfg.device_profile, cfg.budget_mb)
    mx.random.seed(cfg.seed)  # LoRA's initialisation, as mlx_lm.lora's mx.random.seed(seed) before it
    mx.clear_cache()
    before = mx.get_active_memory()
    prep = prepare_model(dataclasses.replace(cfg, lanes=resolve_lanes(cfg, Path(cfg.adapter_path))))
    footprint_limit_mb = resolve_footprint_limit(cfg.device_profile, cfg.footprint_limit)[0]  # each rank's process
    if (budget_mb is not None or footprint_limit_mb is not None) and not cfg.skip_plan:
        # the budget is each rank's: it holds batch / ranks rows
        rows = engine_rows(prep.settings)
        per_rank = dataclasses.replace(rows, batch_size=rows.batch_size // ranks.size)
        check_budget(per_rank, predict(per_rank, prep, before), budget_mb, budget_text, prepare_model, log)
    settings = prep.settings
    if settings.train_mode == "sft":
        splits = load_splits(settings.data, prep.tokenizer, settings.mask_prompt, log=log,
                             all_turns=settings.train_all_turns)
        for name in ("valid", "test") if ranks.size > 1 else ():
            if splits.get(name) is not None and 0 < len(splits[name]) < ranks.size:
                raise DataError(f"{settings.data}/{name}.jsonl: {len(splits[name])} examples cannot be split over "
                                f"{ranks.size} ranks (each rank evaluates its share)")
        # one numpy stream for the training and validation batches' order, as mlx_lm.lora's np.random.seed(seed)
        batches = BatchIterator(splits["train"], settings.batch_size, settings.max_seq_length, settings.seed,
                                rank=ranks.rank, world=ranks.size)
    elif settings.train_mode == "grpo":
        splits, batches = grpo_data(settings, prep, ranks)
    else:
        splits, batches = preference_data(settings, prep.tokenizer, ranks)
    if settings.epochs is not None:  # --epochs: the iterations of that many passes over train.jsonl
        per_epoch = batches.n_batches if settings.train_mode == "sft" else len(batches.batches)
        settings = dataclasses.replace(settings, iters=settings.epochs * per_epoch)
        log(f"[mesp-mlx] --epochs {settings.epochs}: {settings.iters} iterations ({per_epoch} batches per epoch)")
    method = method_for(settings)
    plan = plan_run(engine_rows(settings), prep, method, budget_mb, budget_text, batches.longest_batch_length(),
                    footprint_limit_mb)
    plan = dataclasses.replace(plan, settings=dataclasses.replace(plan.settings, batch_size=settings.batch_size,
                                                                  max_seq_length=settings.max_seq_length))
    apply_levers(prep, method, plan.levers)
    (lever_log or log)(f"[mesp-mlx] speed levers ({plan.lever_note()}): {plan.levers.flags()}")
    if settings.train_mode == "grpo":
        batches.sampling.rows_at_once = generation_rows(settings, prep, plan, budget_mb)
        (lever_log or log)(f"[mesp-mlx] generation: {batches.sampling.rows_at_once} of the "
                           f"{settings.batch_size * settings.group_size} rows decoded together (KV caches and logits "
                           "counted in the plan)")
    plan = dataclasses.replace(plan, data_mb=data_bytes(splits) / 2**20)  # host memory, beside the plan
    return PreparedRun(prep, splits, batches, method, plan)


def engine_rows(settings):
    """The settings as the engine's batches are shaped, which the plan is made for: B rows (sft), 2B (dpo / orpo: the
    chosen and the rejected response of each pair), B x G rows of prompt + completion (grpo)."""
    if settings.train_mode == "sft":
        return settings
    if settings.train_mode == "grpo":
        return dataclasses.replace(settings, batch_size=settings.batch_size * settings.group_size,
                                   max_seq_length=settings.max_seq_length + settings.max_completion_length)
    return dataclasses.replace(settings, batch_size=2 * settings.batch_size)


def generation_rows(settings, prep: Prepared, plan: RunPlan, budget_mb: float | None) -> int:
    """GRPO: how many of the B x G rows decode together: the plan's choice (plan/memory.py, reserve_generation), or,
    when every speed lever was given, as many as the room leaves beside what stays resident; at least one."""
    if plan.lean is not None:
        return plan.lean.generation_rows
    lean = predict(dataclasses.replace(engine_rows(settings), max_seq_length=plan.seq_len), prep)
    room = mlx_room_mb(budget_mb, lean)
    reserve_generation(lean, None if room is None else HEADROOM * room)
    return lean.generation_rows


def grpo_data(settings, prep: Prepared, ranks: Ranks) -> tuple[dict, RolloutBatches]:
    """--train-mode grpo: the prompts of train.jsonl (valid.jsonl, test.jsonl optional), the reward functions (each
    tried once on a training prompt before anything is written) and the batches sampled from the policy."""
    folder = Path(settings.data)
    if not (folder / "train.jsonl").is_file():
        raise DataError(f"{folder / 'train.jsonl'}: missing (train.jsonl is required)")
    splits = {name: load_prompts(folder / f"{name}.jsonl", prep.tokenizer) if (folder / f"{name}.jsonl").is_file()
              else None for name in ("train", "valid", "test")}
    rewards = Rewards(settings.reward_functions, settings.reward_weights)
    _, prompt, answer, kind = splits["train"][0]
    rewards([prompt], [answer], [answer], [kind], [0])  # raises RewardError naming the function and the prompt
    if len(splits["train"]) < settings.batch_size:
        raise DataError(f"{folder / 'train.jsonl'}: {len(splits['train'])} prompts, fewer than --batch-size "
                        f"{settings.batch_size}")
    prompts = PromptBatches(splits["train"], settings.batch_size, settings.max_seq_length, settings.seed,
                            rank=ranks.rank, world=ranks.size)
    return splits, RolloutBatches(prompts, Sampling.of(settings), rewards, prep.model, prep.tokenizer,
                                  prep.streamer, settings.seed)


def preference_data(settings, tokenizer, ranks: Ranks) -> tuple[dict, PairBatches]:
    """--train-mode dpo / orpo: the preference pairs of train.jsonl (valid.jsonl, test.jsonl optional) and their
    batches in mlx-lm-lora's order."""
    folder = Path(settings.data)
    if not (folder / "train.jsonl").is_file():
        raise DataError(f"{folder / 'train.jsonl'}: missing (train.jsonl is required)")
    splits = {name: load_pairs(folder / f"{name}.jsonl", tokenizer) if (folder / f"{name}.jsonl").is_file() else None
              for name in ("train", "valid", "test")}
    return splits, PairBatches(splits["train"], settings.batch_size, settings.max_seq_length, settings.seed,
                               rank=ranks.rank, world=ranks.size)
