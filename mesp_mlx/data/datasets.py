"""mlx-lm's jsonl data (text / completions / chat), validated line by line before any training.

`--data` is a folder with train.jsonl (required), valid.jsonl and test.jsonl (optional). The format is mlx-lm's, detected
the same way (`create_dataset`), and tokenization, chat templates and prompt masking are mlx-lm's dataset classes. What we
add: every line is checked first, and a bad one is refused with `file:line` and the reason.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from mlx_lm.tuner.datasets import CacheDataset, create_dataset
from mlx_lm.tuner.trainer import iterate_batches


class DataError(ValueError):
    pass


FORMATS = ("chat", "completions", "text")


def _detect(sample: dict, keys: dict) -> str | None:
    if keys["prompt"] in sample and keys["completion"] in sample:
        return "completions"
    if keys["chat"] in sample:
        return "chat"
    if keys["text"] in sample:
        return "text"
    return None


def _check_record(rec, fmt: str, keys: dict, where: str) -> None:
    if fmt == "text":
        if not isinstance(rec.get(keys["text"]), str) or not rec[keys["text"]].strip():
            raise DataError(f"{where}: text format needs a non-empty string {keys['text']!r}")
    elif fmt == "completions":
        for k in (keys["prompt"], keys["completion"]):
            if not isinstance(rec.get(k), str):
                raise DataError(f"{where}: completions format needs string fields {keys['prompt']!r} and {keys['completion']!r}")
    else:
        msgs = rec.get(keys["chat"])
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: chat format needs a non-empty list {keys['chat']!r}")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: message {j} needs 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant", "tool"):
                raise DataError(f"{where}: message {j} has unknown role {m['role']!r}")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: message {j} content must be a string")


def _decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file "
                        "as UTF-8") from None


def iter_jsonl(path: str | Path):
    """(where, record) for each non-blank line of a jsonl file, where = "file:line"; a line that is not UTF-8 or not a
    JSON object is refused with its file:line and the reason. Lines end at "\\n" (a "\\r" before it is dropped); a
    UTF-8 byte-order mark at the start is skipped."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            line = _decode_line(raw, where)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: JSON nested too deeply") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
            yield where, rec


def chat_record(prompt: str, response: str, system: str | None = None) -> dict:
    """One mlx-lm chat record: an optional system turn, the user's prompt, the assistant's response."""
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def read_jsonl(path: Path, keys: dict) -> list[dict]:
    """Parse and validate a jsonl file; every record must be of the format its first record has."""
    records, fmt = [], None
    for where, rec in iter_jsonl(path):
        this = _detect(rec, keys)
        if this is None:
            raise DataError(f"{where}: unknown format: expected {keys['text']!r} (text), {keys['prompt']!r}+"
                            f"{keys['completion']!r} (completions) or {keys['chat']!r} (chat); got keys {sorted(rec)}")
        if fmt is None:
            fmt = this
        elif this != fmt:
            raise DataError(f"{where}: {this} record in a {fmt} file (one format per file)")
        _check_record(rec, fmt, keys, where)
        records.append(rec)
    if not records:
        raise DataError(f"{path}: empty (no records)")
    return records


def load_splits(data_dir: str | Path, tokenizer, mask_prompt: bool = False, feature_keys: dict | None = None):
    """Return {'train': dataset, 'valid': dataset|None, 'test': dataset|None} of mlx-lm dataset objects."""

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: no such folder (expected train.jsonl, valid.jsonl, test.jsonl inside)")
    keys = {"text": "text", "prompt": "prompt", "completion": "completion", "chat": "messages", **(feature_keys or {})}
    cfg = SimpleNamespace(mask_prompt=mask_prompt, text_feature=keys["text"], prompt_feature=keys["prompt"],
                          completion_feature=keys["completion"], chat_feature=keys["chat"])
    out = {}
    for split in ("train", "valid", "test"):
        path = data_dir / f"{split}.jsonl"
        if not path.exists():
            if split == "train":
                raise DataError(f"{path}: missing (train.jsonl is required)")
            out[split] = None
            continue
        records = read_jsonl(path, keys)
        if mask_prompt and _detect(records[0], keys) == "text":
            raise DataError(f"{path}: --mask-prompt needs chat or completions data (text has no prompt)")
        try:
            ds = create_dataset(records, tokenizer, cfg)
        except Exception as e:
            raise DataError(f"{path}: {e}") from e
        cached = CacheDataset(ds)
        for i in range(len(cached)):  # tokenize now, so template errors surface with their line
            try:
                tokens, offset = cached[i]
            except Exception as e:
                raise DataError(f"{path}:{i + 1}: cannot tokenize ({e})") from e
            if len(tokens) < 2 or offset >= len(tokens) - 1 and mask_prompt:
                raise DataError(f"{path}:{i + 1}: nothing to learn (fewer than 2 tokens, or all of it is prompt)")
        out[split] = cached
    return out


class BatchIterator:
    """mlx-lm's batches in mlx-lm's order: `mlx_lm.tuner.trainer.iterate_batches` itself (length-sorted batches,
    padded to a multiple of 32 + 1, visited in `np.random.permutation` order per epoch), its permutations drawn from
    `rng`, a RandomState that stands for mlx-lm's global numpy stream (`np.random.seed(seed)` at start). Training and
    validation share that stream as they do in mlx_lm.lora, so with the same data, batch size and seed every batch
    is mlx-lm's. Truncation to max_seq_length is announced once; the position (the stream's state at the start of
    the epoch and now, and the batches drawn in the epoch) can be saved and restored exactly."""

    def __init__(self, dataset, batch_size: int, max_seq_length: int, seed: int = 0, rng=None, rank: int = 0,
                 world: int = 1, even: bool = True):
        if len(dataset) < batch_size:
            raise DataError(f"the training set has {len(dataset)} examples, fewer than --batch-size {batch_size}")
        if batch_size < world:
            raise DataError(f"a batch of {batch_size} examples cannot be split over the {world} ranks of this run")
        if even and batch_size % world:
            raise DataError(f"--batch-size {batch_size} is not divisible by the {world} ranks of this run")
        # distributed: rank r takes rows r, r + world, ... of every global batch (mlx-lm's strided split; uneven
        # shares, allowed for evaluation, are exact too: the engine weights each rank's loss by its tokens)
        self.rank, self.world = rank, world
        self.dataset, self.batch_size, self.max_seq_length = dataset, batch_size, max_seq_length
        self.n_batches = len(range(0, len(dataset) - batch_size + 1, batch_size))
        self.rng = rng if rng is not None else np.random.RandomState(seed)
        self.epoch, self.index = 0, 0
        self._gen, self._epoch_state = None, None
        self.warned = False

    def longest_batch_length(self) -> int:
        """The longest padded batch this data can make (mlx-lm pads a batch to a multiple of 32 + 1, at most
        max_seq_length): the sequence length the plan is made for."""
        data = self.dataset  # its items are (tokens, offset), tokenized once and cached (mlx-lm's CacheDataset)
        longest = max((len(data[i][0]) for i in range(len(data))), default=2)
        return min(1 + 32 * ((longest + 31) // 32), self.max_seq_length)

    def _draw(self):
        """next() of mlx-lm's generator with its global numpy stream swapped for ours (and its warning held)."""

        outer = np.random.get_state()
        np.random.set_state(self.rng.get_state())
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                batch = next(self._gen)
        finally:
            self.rng.set_state(np.random.get_state())
            np.random.set_state(outer)
        if "WARNING" in printed.getvalue() and not self.warned:
            print(f"[mesp-mlx] WARNING: a sequence longer than --max-seq-length {self.max_seq_length} is truncated "
                  "(pre-split long examples to keep their ends)")
            self.warned = True
        return batch

    def _new_epoch(self) -> None:

        if self._gen is not None:
            self.epoch += 1
        self._epoch_state = self.rng.get_state()
        self._gen = iterate_batches(self.dataset, self.batch_size, self.max_seq_length, loop=False)
        self.index = 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "rng": _rng_json(self.rng.get_state()),
                "epoch_rng": None if self._epoch_state is None else _rng_json(self._epoch_state)}

    def restore(self, state: dict) -> None:
        """Replay the epoch's draws from its starting stream state, then continue from the saved stream state."""
        if state.get("epoch_rng") is not None:
            self.rng.set_state(_rng_state(state["epoch_rng"]))
            self._new_epoch()
            for _ in range(int(state["index"])):
                self._draw()
            self.index = int(state["index"])
        self.epoch = int(state["epoch"])
        self.rng.set_state(_rng_state(state["rng"]))

    def __iter__(self):
        return self

    def __next__(self):
        if self._gen is None or self.index >= self.n_batches:
            self._new_epoch()
        tokens, lengths = self._draw()
        self.index += 1
        if self.world > 1:  # this rank's rows of the global batch (the padding stays the global batch's)
            tokens, lengths = tokens[self.rank::self.world], lengths[self.rank::self.world]
        return tokens, lengths


def _rng_json(state) -> list:
    name, keys, pos, has_gauss, gauss = state
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)]


def _rng_state(saved: list):
    name, keys, pos, has_gauss, gauss = saved
    return name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss
