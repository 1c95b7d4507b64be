"""One device of the fleet: the personalization pipeline (docs/design.md §6) run where the user's dialogues live.

A device folder holds the user's data — `stream.jsonl` (their dialogue history) and `heldout.jsonl` (their future
dialogues, for ROUGE-1) — and everything the device makes from it: buffer.jsonl, synthetic.jsonl, data/train.jsonl,
the personal adapter (personal/, mlx-lm's format), the global adapters received (global_in/) and report.json.
None of it leaves the device; what it returns to the federation is a dict of LoRA tensors and scalar metrics.

`prepare` runs once per device (selection buffer, sparse annotation skipped, self-synthesis, base ROUGE-1);
`fine_tune` runs every round (MeSP under the device's budget, starting from the global adapter); `evaluate` scores
the base model, the global adapter, the personal one and optionally a local-only baseline on the held-out dialogues.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..data.datasets import DataError, chat_record
from ..io import atomic_write_json, load_tensors, save_tensors, write_jsonl
from ..personalize.generation import TextEncoder
from ..personalize.pipeline import (
    PersonalizeConfig,
    load_for_inference,
    make_candidates,
    select,
    synthesize,
    training_config,
    with_adapters,
)
from ..personalize.pipeline import evaluate as rouge_of
from ..personalize.scores import load_lexicons
from ..personalize.stream import read_dialogues
from ..plan.governor import resolve_budget
from ..run.train import train


class DeviceError(RuntimeError):
    pass


@dataclass
class Settings:
    """What the server decides for every device (sent each round as a ConfigRecord of scalars)."""
    model: str | None = None
    iters: int = 20
    batch_size: int = 4
    learning_rate: float = 2e-4
    max_seq_length: int = 256
    rank: int = 8
    scale: float = 20.0
    num_layers: int = -1
    buffer_kb: float = 48.0
    policy: str = "quality"
    variants: int = 0
    eval_max_tokens: int = 48
    seed: int = 0
    local_baseline_iters: int = 0  # > 0: evaluate also trains a local-only adapter for this many steps

    @classmethod
    def from_record(cls, record: dict) -> Settings:
        types = {"int": int, "float": float, "str": str, "str | None": str}
        s = cls(**{f.name: types[f.type](record[f.name]) for f in fields(cls) if f.name in record})
        s.model = s.model or None
        return s

    def record(self) -> dict:
        return {k: ("" if v is None else v) for k, v in asdict(self).items()}

    def lora_parameters(self) -> dict:
        return {"rank": self.rank, "scale": self.scale, "dropout": 0.0}


@dataclass
class Device:
    folder: Path
    profile: str | None = None  # a named device memory profile (mesp-mlx profiles)
    budget_mb: float | None = None

    def personalize_config(self, s: Settings, out_train: dict | None = None) -> PersonalizeConfig:
        train = {"iters": s.iters, "batch_size": s.batch_size, "learning_rate": s.learning_rate,
                 "max_seq_length": s.max_seq_length, "num_layers": s.num_layers, "device_profile": self.profile,
                 "budget_mb": self.budget_mb, "lora_parameters": s.lora_parameters(), "steps_per_report": 5,
                 "plot": False,
                 **(out_train or {})}
        return PersonalizeConfig(stream=str(self.folder / "stream.jsonl"), out=str(self.folder), model=s.model,
                                 eval=str(self.folder / "heldout.jsonl"), buffer_kb=s.buffer_kb, policy=s.policy,
                                 seed=s.seed, variants=s.variants, eval_max_tokens=s.eval_max_tokens, train=train)

    @property
    def prepared_file(self) -> Path:
        return self.folder / "prepared.json"


def prepare(device: Device, s: Settings, log=print) -> dict:
    """Selection, synthesis and the training set, once; the base model's held-out ROUGE-1. Idempotent: a device that
    has prepared with the same settings reuses its files (every round after the first)."""
    key = {k: getattr(s, k) for k in ("model", "buffer_kb", "policy", "variants", "seed", "eval_max_tokens")}
    if device.prepared_file.is_file():
        done = json.loads(device.prepared_file.read_text())
        if done.get("key") == key:
            return done
    cfg = device.personalize_config(s)
    cfg.validate()
    stream = read_dialogues(cfg.stream)
    held_out = read_dialogues(cfg.eval, need_response=True)
    t = time.perf_counter()
    loaded = load_for_inference(s.model)
    encoder = TextEncoder(loaded.model, loaded.tokenizer)
    buffer = select(make_candidates(stream, encoder, load_lexicons()), s.policy, int(s.buffer_kb * 1024), s.seed)
    items = [c for c in buffer.items if c.response is not None]
    if not items:
        raise DataError(f"{device.folder}: no kept dialogue has a response to train on")
    write_jsonl(device.folder / "buffer.jsonl", [c.record() for c in buffer.items])
    synthetic = synthesize(items, loaded.model, loaded.tokenizer, s.variants, s.seed, cfg.synth_min_rouge,
                           cfg.synth_temperature) if s.variants else []
    write_jsonl(device.folder / "synthetic.jsonl", synthetic)
    records = [chat_record(c.prompt, c.response) for c in items] + \
              [chat_record(x["prompt"], x["response"]) for x in synthetic]
    write_jsonl(device.folder / "data" / "train.jsonl", records)
    base = rouge_of(loaded.model, loaded.tokenizer, held_out, s.eval_max_tokens)
    done = {"key": key, "stream": len(stream), "held_out": len(held_out), "kept": len(buffer.items),
            "synthetic": len(synthetic), "train_examples": len(records), "rouge1_base": base["rouge1"],
            "seconds": round(time.perf_counter() - t, 1)}
    atomic_write_json(device.prepared_file, done)
    log(f"[device {device.folder.name}] {len(stream)} dialogues -> {len(buffer.items)} kept, {len(synthetic)} "
        f"paraphrases, {len(records)} training examples; base ROUGE-1 {base['rouge1']:.4f}")
    del encoder, loaded
    _release()
    return done


def _release() -> None:
    gc.collect()
    mx.clear_cache()


def save_weights(weights: dict, folder: Path, what: str) -> Path:
    """numpy LoRA tensors -> folder/adapters.safetensors (atomic)."""
    arrays = {k: mx.array(v) for k, v in weights.items()}
    path = folder / "adapters.safetensors"
    save_tensors(path, arrays, what=what)
    return path


def load_weights(adapter_file: Path) -> dict:
    return {k: np.array(v) for k, v in load_tensors(adapter_file)[0].items()}


def _train(device: Device, s: Settings, out: Path, iters: int, start: dict | None, log, seed: int
           ) -> tuple[dict, dict]:

    extra = {"iters": iters}
    if start:
        extra["resume_adapter_file"] = str(save_weights(start, device.folder / "global_in", "the global adapter"))
    train_cfg = training_config(device.personalize_config(s, extra), device.folder / "data", out)
    train_cfg.seed = seed  # each round draws its own batch order
    t = time.perf_counter()
    result = train(train_cfg, log=log)
    if result.status != "done" or not result.records:
        raise DeviceError(f"device {device.folder.name}: the fine-tune ended with status {result.status}")
    peaks = [r["peak_mb"] for r in result.records]
    budget = train_cfg.budget_mb
    if budget is None and train_cfg.device_profile:
        budget = resolve_budget(train_cfg.device_profile, None)[0]
    metrics = {"steps": len(result.records), "loss_first": float(result.records[0]["loss"]),
               "loss_last": float(result.records[-1]["loss"]), "peak_mb": float(max(peaks)),
               "budget_mb": float(budget) if budget is not None else -1.0,
               "train_seconds": round(time.perf_counter() - t, 2)}
    weights = load_weights(out / "adapters.safetensors")
    _release()
    return weights, metrics


def fine_tune(device: Device, s: Settings, global_weights: dict | None, round_: int = 1, log=print
              ) -> tuple[dict, dict]:
    """One round on the device: MeSP from the global adapter (or a fresh LoRA in round 1) under the device's budget.
    Its result is the device's personal adapter (kept in personal/) and what it sends: (LoRA tensors, metrics)."""
    prepared = prepare(device, s, log)
    weights, metrics = _train(device, s, device.folder / "personal", s.iters, global_weights, log,
                              s.seed + round_)
    metrics["num_examples"] = int(prepared["train_examples"])
    return weights, metrics


def _rouge_with(device: Device, s: Settings, adapter_file: Path | None) -> float:
    cfg = device.personalize_config(s)
    held_out = read_dialogues(cfg.eval, need_response=True)
    loaded = load_for_inference(s.model)
    model = loaded.model
    if adapter_file is not None:
        train_cfg = training_config(cfg, device.folder / "data", device.folder / "personal")
        model = with_adapters(loaded, train_cfg, adapter_file)
    score = rouge_of(model, loaded.tokenizer, held_out, s.eval_max_tokens)["rouge1"]
    del model, loaded
    _release()
    return float(score)


def evaluate(device: Device, s: Settings, global_weights: dict, log=print) -> dict:
    """Held-out ROUGE-1 of the base model, the global adapter, the personal adapter (global + this device's last
    round) and, with local_baseline_iters, of an adapter trained on this device alone from scratch."""
    prepared = prepare(device, s, log)
    personal = device.folder / "personal" / "adapters.safetensors"
    if not personal.is_file():
        raise DeviceError(f"device {device.folder.name}: no personal adapter yet (evaluate after a training round)")
    out = {"rouge1_base": float(prepared["rouge1_base"]),
           "rouge1_global": _rouge_with(device, s, save_weights(global_weights, device.folder / "global_final",
                                                                "the final global adapter")),
           "rouge1_personal": _rouge_with(device, s, personal)}
    if s.local_baseline_iters > 0:
        _train(device, s, device.folder / "local_only", s.local_baseline_iters, None, log, s.seed)
        out["rouge1_local"] = _rouge_with(device, s, device.folder / "local_only" / "adapters.safetensors")
    atomic_write_json(device.folder / "report.json", {**prepared, **out})
    log(f"[device {device.folder.name}] held-out ROUGE-1: " + ", ".join(f"{k[7:]} {v:.4f}" for k, v in out.items()))
    return out
