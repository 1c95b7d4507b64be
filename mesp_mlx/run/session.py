"""The run's second stage: the engine, per-block optimizers and governor built from a prepared run, the saved state
restored on --resume, and the one place that saves adapters and state."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..adapters.lora import save_adapters, write_adapter_config
from ..distributed import Ranks
from ..engine import BlockEngine
from ..io import check_free_space, load_tensors, save_tensors
from ..objectives import objective_for
from ..plan.governor import Governor
from .fingerprint import data_fingerprint, model_fingerprint
from .metrics import MetricsLog
from .optimizers import LearningRate, make_optimizer
from .prepare import PreparedRun
from .state import (
    STATE_FILE,
    ResumeError,
    load_state,
    read_state,
    save_state,
    shared_settings,
)


REFERENCE_FILE = "reference_scores.safetensors"  # DPO's cached reference scores (objectives/preference.py)


@dataclass
class Session:
    """A prepared run with its engine: what the loop steps and what finish() saves."""
    run: PreparedRun
    engine: BlockEngine
    optimizers: list
    lr: LearningRate
    governor: Governor | None
    metrics: MetricsLog | None  # opened once the saved state is restored
    adapter_path: Path
    ranks: Ranks
    first_step: int
    resume_settings: dict  # what --resume compares (and the lanes, recorded beside)
    saved_step: int = 0

    @property
    def writer(self) -> bool:
        return self.ranks.is_writer

    @property
    def adapter_file(self) -> Path:
        return self.adapter_path / "adapters.safetensors"

    def save_reference_cache(self) -> None:
        """DPO: the training pairs' reference scores computed so far (a resumed run need not recompute them)."""
        cache = getattr(self.engine.objective, "reference_cache", None)
        if not cache:
            return
        ids = sorted(cache)
        save_tensors(self.adapter_path / REFERENCE_FILE, {"pair_ids": mx.array(ids, dtype=mx.int32),
                                                          "scores": mx.array([cache[i] for i in ids], dtype=mx.float32)})

    def save(self, step: int) -> None:
        """Adapters and training state after `step` (rank 0 writes: every rank holds the same adapters and states)."""
        if self.writer:
            model = self.run.prep.model
            save_adapters(model, self.adapter_file)
            self.save_reference_cache()
            save_state(self.adapter_path, model, self.optimizers, step, self.run.batches.state(),
                       self.run.method.state_dict(), self.resume_settings, self.engine.accum)
        self.saved_step = step


def open_session(run: PreparedRun, adapter_path: Path, ranks: Ranks, log) -> Session:
    """Build the engine for `run`, restore its state when resuming, and write adapter_config.json."""
    s, prep = run.settings, run.prep
    optimizers = [make_optimizer(s) for _ in prep.parts.layers]
    lr = LearningRate(s.learning_rate, s.lr_schedule, s.grad_accumulation_steps)
    if s.method == "mezo":
        run.method.learning_rate = lr  # MeZO's own SGD update follows the schedule too
    # every run has one: it samples the process footprint per block; it checks the limits the run has
    governor = Governor(run.plan.budget_mb, footprint_limit_mb=run.plan.footprint_limit_mb)
    if hasattr(run.batches, "on_generated"):  # GRPO: the sampling phase's peak is checked like a block's
        run.batches.on_generated = governor
    engine = BlockEngine(prep.parts, run.method, optimizers, s.checkpoint_storage, s.checkpoint_dir, prep.streamer,
                         s.vocab_chunk, s.clear_cache, s.seed, on_block_done=governor,
                         accumulation=s.grad_accumulation_steps, learning_rate=lr, ranks=ranks,
                         keep_activations=run.plan.levers.keep_activations, lanes=s.lanes,
                         objective=objective_for(s), max_grad_norm=s.max_grad_norm)
    identity = {**shared_settings(s), "lanes": s.lanes,  # lanes: recorded for --resume, not compared
                "fingerprints": {"model": model_fingerprint(prep.path), "data": data_fingerprint(s.data)}}
    session = Session(run, engine, optimizers, lr, governor, None, adapter_path, ranks, 1, identity)
    try:  # MLX's limits are process-wide: a refusal here gives them back
        _restore_or_start(session, log)
    except BaseException:
        if governor is not None:
            governor.close()
        raise
    return session


def _restore_or_start(session: Session, log) -> None:
    run, s, adapter_path, writer = session.run, session.run.settings, session.adapter_path, session.writer
    if writer:
        check_free_space(adapter_path, _state_bytes(run.prep.model), "the training state")  # before anything is written
    if s.resume:
        restored = load_state(adapter_path, run.prep.model, session.optimizers, session.resume_settings,
                              _shared_state(adapter_path, session.ranks))
        run.batches.restore(restored["data"])
        run.method.load_state_dict(restored["method"])
        session.engine.accum = restored["accum"]
        _restore_reference_cache(session)
        session.first_step = restored["step"] + 1
        log(f"[mesp-mlx] resuming {adapter_path} after step {restored['step']}")
    elif writer and (adapter_path / STATE_FILE).exists():
        log(f"[mesp-mlx] note: starting a new run over the one saved in {adapter_path} (--resume continues it)")
    if writer:
        write_adapter_config(adapter_path, s.num_layers if s.num_layers != -1 else len(run.prep.parts.layers),
                             s.lora_parameters, extra=_config_record(run), fine_tune_type=s.fine_tune_type)
    session.saved_step = session.first_step - 1
    session.metrics = MetricsLog(adapter_path / "metrics.jsonl" if writer else None,
                                 keep_until=session.first_step - 1 if s.resume else None)


def _restore_reference_cache(session: Session) -> None:
    cache = getattr(session.engine.objective, "reference_cache", None)
    path = session.adapter_path / REFERENCE_FILE
    if cache is None or not path.is_file():
        return
    tensors, _ = load_tensors(path)
    for i, (chosen, rejected) in zip(tensors["pair_ids"].tolist(), tensors["scores"].tolist()):
        cache[int(i)] = (chosen, rejected)


def _shared_state(adapter_path: Path, ranks: Ranks):
    """The saved state for --resume: read by rank 0 and sent to the others (the folder may exist on rank 0 only)."""
    if ranks.size == 1:
        return None
    tensors, meta, error = {}, {}, None
    if ranks.is_writer:
        try:
            tensors, meta = read_state(adapter_path)
        except ResumeError as e:
            error = str(e)
    shared = ranks.broadcast_json({"error": error, "meta": meta})
    if shared["error"]:
        raise ResumeError(shared["error"])
    return ranks.broadcast_arrays(tensors), shared["meta"]


def _state_bytes(model) -> int:
    """A generous size of one state save: the adapters twice (adapters file + state) and up to two optimizer moments."""
    return 4 * sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters())) + 2**20


def _config_record(run: PreparedRun) -> dict:
    """What mlx-lm's adapter_config.json holds (its lora.py dumps its args) plus our engine's resolved settings and
    the speed plan's prediction beside what it chose."""
    rec = dataclasses.asdict(run.settings)
    rec["model"] = str(run.prep.path)
    rec.pop("demo_prompts", None)
    rec.update(run.plan.record())
    return rec
