"""Training state for crash-safe resume: one safetensors file, written atomically (temp file, fsync, rename).

    <adapter_path>/training_state.safetensors
        tensors : adapter.<name>   every trainable tensor (full precision, bit-exact)
                  opt.<block>.<path> every optimizer state tensor of every block's optimizer (AdamW m, v, step, ...)
                  acc.<block>.<path> the gradient summed so far in an unfinished accumulation window (so a run can be
                                     saved and resumed mid-accumulation, bit-exactly)
        metadata: step, data position, method state, the settings a resumed run must share, the fingerprints of
                  the model and the data (fingerprint.py), and the SHA-256 of the tensors (io.save_tensors)
    <adapter_path>/training_state.previous.safetensors
        the state saved before it (one generation back): what a damaged state file is refused in favour of

Randomness needs no saved generator: the engine draws every random number of step s, block i from a key derived from
(--seed, s, i), so (seed, step) is the whole random state. A resumed run therefore repeats an uninterrupted one bit for
bit. The file is either the previous complete state or the new complete state: a kill at any moment leaves one that
loads, and a file damaged later is refused by its checksum, naming the previous state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..io import CorruptFile, load_tensors, save_tensors
from .config import TrainConfig
from .fingerprint import changed_files

STATE_FILE = "training_state.safetensors"
PREVIOUS_STATE_FILE = "training_state.previous.safetensors"
FORMAT = "mesp_mlx-training-state-1"
# GRPO's settings change what is trained on: a resumed run keeps them (a state saved before GRPO existed was an SFT
# run's, for which they are TrainConfig's defaults)
GRPO_KEYS = ("group_size", "max_completion_length", "temperature", "top_p", "top_k", "min_p", "epsilon",
             "epsilon_high", "grpo_loss_type", "importance_sampling_level", "reward_functions", "reward_weights")
GRPO_DEFAULTS = {k: getattr(TrainConfig(), k) for k in GRPO_KEYS}
# settings that must not change between a run and its resumption (iters may grow; reporting settings may change);
# "model" and "data" are compared by content (the state's fingerprints) where the state has them
SHARED = ("model", "data", "method", "num_layers", "lora_parameters", "batch_size", "max_seq_length", "mask_prompt",
          "optimizer", "optimizer_config", "learning_rate", "lr_schedule", "grad_accumulation_steps",
          "fine_tune_type", "seed", "dtype", "compute_path", "quantize_bits",
          "quantize_group_size", "store_h", "lcsb_fraction", "lcsb_schedule", "lcsb_skipped", "zo_eps", "zo_samples",
          "zo_weight_decay", "train_mode", "beta", "dpo_cpo_loss_type", "max_grad_norm",
          "train_all_turns") + tuple(GRPO_DEFAULTS)
# settings added after states were first written: a state without one was made with its default
ADDED_LATER = {"train_mode": "sft", "beta": 0.1, "dpo_cpo_loss_type": "sigmoid", "max_grad_norm": None,
               "train_all_turns": False, **GRPO_DEFAULTS}


class ResumeError(ValueError):
    pass


def shared_settings(cfg) -> dict:
    return {k: getattr(cfg, k) for k in SHARED}


def save_state(path: Path, model, optimizers: list, step: int, data_position: dict, method_state: dict,
               settings: dict, accum: dict | None = None) -> None:
    tensors = {f"adapter.{k}": v for k, v in tree_flatten(model.trainable_parameters())}
    for i, opt in enumerate(optimizers):
        tensors.update({f"opt.{i}.{k}": v for k, v in tree_flatten(opt.state)})
    for i, tree in (accum or {}).items():
        tensors.update({f"acc.{i}.{k}": v for k, v in tree_flatten(tree)})
    meta = {"format": FORMAT, "step": str(step), "data": json.dumps(data_position),
            "method": json.dumps(method_state), "settings": json.dumps(settings, sort_keys=True, default=str)}
    _keep_previous(path)
    save_tensors(path / STATE_FILE, tensors, meta, what="the training state")


def _keep_previous(path: Path) -> None:
    """The current state becomes the previous one (a hard link renamed over it: both names always hold a complete
    state); copied where the file system has no hard links."""
    current, previous = path / STATE_FILE, path / PREVIOUS_STATE_FILE
    if not current.is_file():
        return
    tmp = path / f".{PREVIOUS_STATE_FILE}.link"
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(current, tmp)
        except OSError:
            shutil.copyfile(current, tmp)
        os.replace(tmp, previous)
    except OSError:
        tmp.unlink(missing_ok=True)  # no previous generation this time; the save itself still goes ahead


def read_state(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of the saved state in `path`; ResumeError when there is none or it is unreadable."""
    file = path / STATE_FILE
    if not file.is_file():
        raise ResumeError(f"--resume: {file} does not exist (nothing to resume in {path})")
    try:
        tensors, meta = load_tensors(file)
    except CorruptFile as e:
        raise ResumeError(f"--resume: {e}{_previous_offer(path)}") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error to the user
        raise ResumeError(f"--resume: {file} is unreadable ({_first_line(e)}){_previous_offer(path)}") from None
    if meta.get("format") != FORMAT:
        raise ResumeError(f"--resume: {file} is not a mesp_mlx training state")
    return tensors, meta


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _previous_offer(path: Path) -> str:
    """How to continue from the previous state, when it is whole."""
    previous = path / PREVIOUS_STATE_FILE
    try:
        _, meta = load_tensors(previous)
        step = int(meta["step"])
    except Exception:  # noqa: BLE001 - no usable previous state: nothing to offer
        return ""
    return (f"; the previous state (after step {step}) is whole: to continue from it, move {previous} to "
            f"{path / STATE_FILE} and --resume again")


def saved_setting(path: Path, key: str):
    """One setting of the state saved in `path` (None when there is no state or it does not record `key`); reads the
    metadata only."""
    file = path / STATE_FILE
    try:
        _, meta = mx.load(str(file), return_metadata=True)
        return json.loads(meta["settings"]).get(key)
    except Exception:  # noqa: BLE001 - no readable state: load_state says why, later
        return None


def load_state(path: Path, model, optimizers: list, settings: dict, state: tuple[dict, dict] | None = None) -> dict:
    """Restore adapters and optimizer states in place; return {step, data, method}. Refuses another run's state.
    `state` is (tensors, metadata) already read (a distributed run's ranks get rank 0's); else the file is read."""
    tensors, meta = state if state is not None else read_state(path)
    file = path / STATE_FILE
    saved = json.loads(meta["settings"])
    now = json.loads(json.dumps(settings, sort_keys=True, default=str))
    by_content = "fingerprints" in saved and "fingerprints" in now
    if by_content:
        for what, flag in (("model", "--model"), ("data", "--data")):
            files = changed_files(saved["fingerprints"][what], now["fingerprints"][what])
            if files:
                raise ResumeError(f"--resume: the {what} differs from the one the run in {path} was trained on "
                                  f"({flag} {now.get(what)}: {', '.join(files)} changed since); resume with the same "
                                  f"{what}, or start a new run without --resume")
    changed = [k for k in SHARED if saved.get(k, ADDED_LATER.get(k)) != now.get(k)
               and not (by_content and k in ("model", "data"))]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ResumeError(f"--resume: the run in {path} used other settings ({diffs})")
    adapters = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
    own = dict(tree_flatten(model.trainable_parameters()))
    if set(adapters) != set(own) or any(adapters[k].shape != own[k].shape for k in own):
        raise ResumeError(f"--resume: {file} holds adapters of another shape than this run's")
    model.update(tree_unflatten(list(adapters.items())))
    for i, opt in enumerate(optimizers):
        prefix = f"opt.{i}."
        flat = [(k[len(prefix):], v) for k, v in tensors.items() if k.startswith(prefix)]
        if flat:
            opt.state = tree_unflatten(flat)
    accum: dict = {}
    for k, v in tensors.items():
        if k.startswith("acc."):
            block, name = k[len("acc."):].split(".", 1)
            accum.setdefault(int(block), []).append((name, v))
    accum = {i: tree_unflatten(flat) for i, flat in accum.items()}
    mx.eval(model.trainable_parameters(), [opt.state for opt in optimizers], accum)
    return {"step": int(meta["step"]), "data": json.loads(meta["data"]), "method": json.loads(meta["method"]),
            "accum": accum}
