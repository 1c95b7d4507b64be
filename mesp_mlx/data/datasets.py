"""mlx-lm's jsonl data (text / completions / chat), validated and tokenized line by line as it is read.

`--data` is a folder with train.jsonl (required), valid.jsonl and test.jsonl (optional). The format is mlx-lm's, detected
the same way (`create_dataset`), and tokenization, chat templates and prompt masking are mlx-lm's dataset classes (their
`process`, called on each record as it is read). What we add: every line is checked, and a bad one is refused with
`file:line` and the reason; a data file must be a regular file (a FIFO, device or folder is refused before it is opened,
and it is opened so that it cannot block) of at most MAX_FILE_BYTES, with lines of at most MAX_LINE_BYTES; and only the
tokenized examples are kept (TokenizedExamples: mlx-lm's CacheDataset's content, in one compact buffer), not the
parsed records, so loading holds about the tokens' bytes instead of ~15x the file. A large file shows its progress.

--train-all-turns (all_turns): a chat's loss covers every assistant message, not only the last (mlx-lm's mask_prompt).
Each assistant message's tokens are found by prefix differences of the chat template (assistant_spans); an example
keeps mlx-lm's (tokens, offset), offset at the first assistant message, plus its cuts: the token ranges after the
offset that the loss skips (the other roles' turns between and after the assistant's). Its batches are mlx-lm's with
the cuts taken out of the loss mask (cut_batch). Completions data under it is --mask-prompt; text data is refused.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import stat
import time
from array import array
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
from mlx_lm.tuner.datasets import CacheDataset, create_dataset
from mlx_lm.tuner.trainer import iterate_batches

from ..engine import Batch


class DataError(ValueError):
    pass


FORMATS = ("chat", "completions", "text")
MB = 1024 * 1024
# a data file larger than this is refused (a runaway or never-ending file; MESP_MLX_MAX_DATA_MB raises it)
MAX_FILE_BYTES = 4096 * MB
# a line longer than this is refused, and no more of it is read: ~1M tokens, 500x mlx-lm's default --max-seq-length
MAX_LINE_BYTES = 4 * MB
# a file larger than this shows its progress, every PROGRESS_SECONDS while it is read and tokenized
PROGRESS_BYTES = 10 * MB
PROGRESS_SECONDS = 5.0


def file_limit() -> int:
    """The largest data file accepted, in bytes: MAX_FILE_BYTES, or MESP_MLX_MAX_DATA_MB when set."""
    given = os.environ.get("MESP_MLX_MAX_DATA_MB")
    if not given:
        return MAX_FILE_BYTES
    try:
        return int(float(given) * MB)
    except ValueError:
        raise DataError(f"MESP_MLX_MAX_DATA_MB={given!r} is not a number of MB") from None


def _size(n: int) -> str:
    return f"{n / MB:.1f} MB" if n < 1024 * MB else f"{n / (1024 * MB):.1f} GB"


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"))


def _check_regular(path, st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise DataError(f"{path}: {kind}, not a regular file (give a jsonl file)")
    if st.st_size > limit:
        raise DataError(f"{path}: {_size(st.st_size)}, over the limit of {_size(limit)} per data file (split it, or "
                        "raise the limit with MESP_MLX_MAX_DATA_MB)")


def open_data_file(path: str | Path):
    """(binary file, its size) of a data file that is a regular file within the size limit; anything else (a FIFO, a
    device, a folder, a missing file) is refused with one line naming it. Checked before it is opened, opened without
    blocking (O_NONBLOCK: a FIFO swapped in after the check opens at once and is refused by the check of the opened
    file), so a reader that has no writer cannot hang the run."""
    limit = file_limit()
    try:
        _check_regular(path, os.stat(path), limit)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) |
                     getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        _check_regular(path, st, limit)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


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


class _Progress:
    """A line every PROGRESS_SECONDS (and one at the end) while a file over PROGRESS_BYTES is read, via `log`."""

    def __init__(self, path, size: int, log):
        self.path, self.size, self.start = path, size, time.monotonic()
        self.log = log if log is not None and size > PROGRESS_BYTES else None
        self.last = self.start
        if self.log:
            self.log(f"[mesp-mlx] {path}: {_size(size)}, reading and tokenizing")

    def update(self, done: int, examples) -> None:
        now = time.monotonic()
        if self.log and now - self.last >= PROGRESS_SECONDS:
            self.last = now
            self.log(f"[mesp-mlx] {self.path}: {_size(done)} of {_size(self.size)} ({100 * done / max(self.size, 1):.0f}"
                     f" %), {examples.describe()}, {now - self.start:.0f} s")

    def done(self, examples) -> None:
        if self.log:
            self.log(f"[mesp-mlx] {self.path}: {examples.describe()} in {time.monotonic() - self.start:.0f} s")


def _lines(path, log=None, examples=None):
    """(where, raw line, bytes read so far) of each line of a data file (open_data_file), where = "file:line"; each
    line read with a bounded readline, so a line over MAX_LINE_BYTES is refused without reading more of it."""
    f, size = open_data_file(path)
    limit, total = file_limit(), 0
    progress = _Progress(path, size, log if examples is not None else None)
    with f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            lineno += 1
            where = f"{path}:{lineno}"
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise DataError(f"{where}: line longer than the limit of {_size(MAX_LINE_BYTES)} (split this example: "
                                "mlx-lm would truncate it to --max-seq-length tokens anyway)")
            total += len(raw)
            if total > limit:
                raise DataError(f"{where}: the file grew past the limit of {_size(limit)} per data file while it was "
                                "read")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield where, raw
            if examples is not None:
                progress.update(total, examples)
    if examples is not None:
        progress.done(examples)


def _parse(where: str, raw: bytes):
    line = _decode_line(raw, where)
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
    return rec


def iter_jsonl(path: str | Path, log=None, examples=None):
    """(where, record) for each non-blank line of a jsonl file, where = "file:line"; a line that is not UTF-8 or not a
    JSON object is refused with its file:line and the reason. Lines end at "\\n" (a "\\r" before it is dropped); a
    UTF-8 byte-order mark at the start is skipped. The file must be a regular file within the limits (open_data_file,
    MAX_LINE_BYTES); with `log` and `examples` (the TokenizedExamples being filled), a large file shows progress."""
    for where, raw in _lines(path, log, examples):
        rec = _parse(where, raw)
        if rec is not None:
            yield where, rec


def chat_record(prompt: str, response: str, system: str | None = None) -> dict:
    """One mlx-lm chat record: an optional system turn, the user's prompt, the assistant's response."""
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def _records(path, keys: dict, log=None, examples=None):
    """(where, record, format) of each record of a jsonl file, validated; every record must be of the format its first
    record has."""
    fmt = None
    for where, rec in iter_jsonl(path, log, examples):
        this = _detect(rec, keys)
        if this is None:
            raise DataError(f"{where}: unknown format: expected {keys['text']!r} (text), {keys['prompt']!r}+"
                            f"{keys['completion']!r} (completions) or {keys['chat']!r} (chat); got keys {sorted(rec)}")
        if fmt is None:
            fmt = this
        elif this != fmt:
            raise DataError(f"{where}: {this} record in a {fmt} file (one format per file)")
        _check_record(rec, fmt, keys, where)
        yield where, rec, fmt


def read_jsonl(path: Path, keys: dict) -> list[dict]:
    """Parse and validate a jsonl file (all its records in memory: for small files; training data goes through
    load_splits, which keeps only the tokens)."""
    records = [rec for _, rec, _ in _records(path, keys)]
    if not records:
        raise DataError(f"{path}: empty (no records)")
    return records


class TokenizedExamples(CacheDataset):
    """A data file's examples as mlx-lm's CacheDataset holds them once every item was visited, `dataset[i]` ->
    (tokens, offset), without the raw records: all tokens in one buffer (uint16 while every id fits, else int32),
    `dataset[i]` a numpy view of example i's tokens. `itemlen(i)` is what mlx-lm's CacheDataset.itemlen returns (the
    length of the raw record, its number of top-level keys), which mlx-lm's iterate_batches sorts by when given a
    CacheDataset, as this is: so the batches are mlx-lm's, in mlx-lm's order."""

    def __init__(self):  # CacheDataset's __init__ would keep mlx-lm's dataset (the records); nothing of it is kept
        self._buf, self._starts, self._offsets, self._keys = array("H"), array("q", [0]), array("q"), array("q")
        self._tokens = self._bounds = None
        self._cuts = self._cut_bounds = None  # --train-all-turns on chat data: see keep_cuts

    def keep_cuts(self) -> None:
        """From now on each example also holds its cuts, the (start, end) token ranges after its offset that its loss
        skips (--train-all-turns: the turns that are not the assistant's), flat (start, end, start, end, ...)."""
        self._cuts, self._cut_bounds = array("q"), array("q", [0])

    @property
    def has_cuts(self) -> bool:
        return self._cuts is not None

    def cuts(self, idx: int) -> list[tuple[int, int]]:
        """Example idx's cuts (none without keep_cuts)."""
        if self._cuts is None:
            return []
        flat = self._cuts[self._cut_bounds[idx]:self._cut_bounds[idx + 1]]
        return list(zip(flat[::2], flat[1::2]))

    def append(self, tokens, offset: int, n_keys: int, cuts=()) -> None:
        n = len(self._buf)
        try:
            self._buf.extend(tokens)
        except OverflowError:  # an id over 65535 (or negative): int32 from now on
            del self._buf[n:]
            if self._buf.typecode == "i":
                raise
            self._buf = array("i", self._buf)
            self._buf.extend(tokens)
        self._starts.append(len(self._buf))
        self._offsets.append(offset)
        self._keys.append(n_keys)
        if self._cuts is not None:
            for start, end in cuts:
                self._cuts.extend((start, end))
            self._cut_bounds.append(len(self._cuts))

    def finish(self) -> TokenizedExamples:
        """No more examples: the buffers become numpy views (zero-copy) that indexing reads."""
        dtype = np.uint16 if self._buf.typecode == "H" else np.int32
        self._tokens = np.frombuffer(self._buf, dtype=dtype) if len(self._buf) else np.zeros(0, dtype)
        self._bounds = np.frombuffer(self._starts, dtype=np.int64)
        return self

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, idx: int):
        n = len(self._offsets)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"example {idx} of {n}")
        if self._tokens is None:
            self.finish()
        return self._tokens[self._bounds[idx]:self._bounds[idx + 1]], self._offsets[idx]

    def itemlen(self, idx: int) -> int:
        return self._keys[idx]

    def lengths(self) -> np.ndarray:
        """Each example's number of tokens."""
        return np.diff(np.frombuffer(self._starts, dtype=np.int64))

    @property
    def n_tokens(self) -> int:
        return len(self._buf)

    @property
    def nbytes(self) -> int:
        """Host memory the examples hold (tokens and per-example metadata)."""
        arrays = (self._buf, self._starts, self._offsets, self._keys, self._cuts or (), self._cut_bounds or ())
        return sum(getattr(a, "itemsize", 0) * len(a) for a in arrays)

    def describe(self) -> str:
        return f"{len(self)} examples, {self.n_tokens} tokens ({_size(self.nbytes)} held)"


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _template_prefix(tokenizer, messages: list, tools, generation: bool, tokens, where: str) -> int:
    """The number of tokens of the chat template of `messages` (a chat's first messages), which must be the first
    tokens of the whole chat's `tokens`; a template that renders a chat's start otherwise is refused."""
    try:
        prefix = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation,
                                               return_dict=False)
    except Exception as e:
        raise DataError(f"{where}: cannot tokenize the first {len(messages)} messages ({_one_line(e)})") from e
    if list(tokens[:len(prefix)]) != list(prefix):
        raise DataError(f"{where}: --train-all-turns: the chat template does not render the first {len(messages)} "
                        "messages as the start of the whole chat, so its assistant turns cannot be told apart (use "
                        "--mask-prompt, which trains the last one)")
    return len(prefix)


def assistant_spans(tokenizer, messages: list, tools, tokens, where: str) -> list[tuple[int, int]]:
    """The token range [start, end) of each assistant message of a chat in its `tokens` (apply_chat_template of all
    its messages): start = the tokens of the messages before it with the generation prompt (its header is prompt, as
    mlx-lm's mask_prompt has it for the last message), end = the tokens of the messages up to it (its end of turn is
    target). An assistant message that opens the chat starts at 0 (a template renders no empty chat)."""
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _template_prefix(tokenizer, messages[:k], tools, True, tokens, where) if k else 0
        last = k + 1 == len(messages)
        end = len(tokens) if last else _template_prefix(tokenizer, messages[:k + 1], tools, False, tokens, where)
        if end < start:
            raise DataError(f"{where}: --train-all-turns: assistant message {k} ends before it starts in the chat "
                            "template's tokens (use --mask-prompt)")
        spans.append((start, end))
    return spans


def turn_cuts(tokenizer, rec: dict, chat_key: str, tokens, where: str) -> tuple[int, list[tuple[int, int]]]:
    """(offset, cuts) of a chat record under --train-all-turns: the offset is the first assistant message's start,
    the cuts the stretches between assistant messages and, when another role ends the chat, its tail, to one past the
    end: the target after the last token that mlx-lm's mask counts (its mask runs to length inclusive)."""
    spans = assistant_spans(tokenizer, rec[chat_key], rec.get("tools"), tokens, where)
    if not spans:
        raise DataError(f"{where}: --train-all-turns: no assistant message (nothing to learn)")
    cuts = [(end, start) for (_, end), (start, _) in itertools.pairwise(spans) if end < start]
    if spans[-1][1] < len(tokens):
        cuts.append((spans[-1][1], len(tokens) + 1))
    return spans[0][0], cuts


def _check_maskable(path, fmt: str, cfg) -> None:
    if getattr(cfg, "all_turns", False) and fmt == "text":
        raise DataError(f"{path}: --train-all-turns needs chat or completions data (text has no turns)")
    if cfg.mask_prompt and fmt == "text":
        raise DataError(f"{path}: --mask-prompt needs chat or completions data (text has no prompt)")


def tokenize_file(path: Path, tokenizer, cfg, keys: dict, log=None) -> TokenizedExamples:
    """Validate and tokenize a jsonl file record by record with mlx-lm's dataset class for its format (the class
    `create_dataset` picks from the first record; its `process` on each record, as CacheDataset calls it), keeping only
    the tokens. Refuses, with file:line, a record that cannot be tokenized or leaves nothing to learn. With
    cfg.all_turns (--train-all-turns; cfg.mask_prompt set with it) chat examples keep their cuts (turn_cuts)."""
    examples, process = TokenizedExamples(), None
    for where, rec, fmt in _records(path, keys, log, examples):
        if process is None:
            _check_maskable(path, fmt, cfg)
            try:
                process = create_dataset([rec], tokenizer, cfg).process
            except Exception as e:
                raise DataError(f"{path}: {_one_line(e)}") from e
            if getattr(cfg, "all_turns", False) and fmt == "chat":
                examples.keep_cuts()
        try:  # tokenized now, so template errors surface with their line
            tokens, offset = process(rec)
        except Exception as e:
            raise DataError(f"{where}: cannot tokenize ({_one_line(e)})") from e
        cuts = ()
        if examples.has_cuts:
            offset, cuts = turn_cuts(tokenizer, rec, keys["chat"], tokens, where)
        if len(tokens) < 2 or offset >= len(tokens) - 1 and cfg.mask_prompt:
            raise DataError(f"{where}: nothing to learn (fewer than 2 tokens, or all of it is prompt)")
        try:
            examples.append(tokens, offset, len(rec), cuts)
        except (OverflowError, TypeError) as e:
            raise DataError(f"{where}: the tokenizer gave token ids that are not 32-bit integers ({e})") from e
    if not len(examples):
        raise DataError(f"{path}: empty (no records)")
    return examples.finish()


def load_splits(data_dir: str | Path, tokenizer, mask_prompt: bool = False, feature_keys: dict | None = None,
                log=print, all_turns: bool = False):
    """Return {'train': examples, 'valid': examples|None, 'test': examples|None}, each a TokenizedExamples (what
    mlx-lm's CacheDataset of its dataset holds). A file over PROGRESS_BYTES reports its progress through `log`.
    all_turns (--train-all-turns): every assistant message of a chat is trained (completions: as mask_prompt)."""

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: no such folder (expected train.jsonl, valid.jsonl, test.jsonl inside)")
    keys = {"text": "text", "prompt": "prompt", "completion": "completion", "chat": "messages", **(feature_keys or {})}
    cfg = SimpleNamespace(mask_prompt=mask_prompt or all_turns, all_turns=all_turns, text_feature=keys["text"],
                          prompt_feature=keys["prompt"], completion_feature=keys["completion"],
                          chat_feature=keys["chat"])
    out = {}
    for split in ("train", "valid", "test"):
        path = data_dir / f"{split}.jsonl"
        if not os.path.lexists(path):
            if split == "train":
                raise DataError(f"{path}: missing (train.jsonl is required)")
            out[split] = None
            continue
        out[split] = tokenize_file(path, tokenizer, cfg, keys, log)
    return out


def data_bytes(splits: dict) -> int:
    """Host memory the splits' tokenized examples hold."""
    return sum(getattr(ds, "nbytes", 0) for ds in splits.values() if ds is not None)


class _Reads(CacheDataset):
    """A dataset as mlx-lm's iterate_batches reads it (a CacheDataset: sorted by itemlen), noting the examples each
    batch reads: its rows, in order."""

    def __init__(self, dataset):  # (CacheDataset's own __init__ is not wanted)
        self.dataset, self.rows = dataset, []

    def itemlen(self, idx: int) -> int:
        return self.dataset.itemlen(idx)

    def __getitem__(self, idx: int):
        self.rows.append(idx)
        return self.dataset[idx]

    def __len__(self) -> int:
        return len(self.dataset)


def cut_batch(dataset: TokenizedExamples, tokens, lengths, rows: list[int]) -> Batch:
    """mlx-lm's batch of examples `rows` of `dataset` (Batch.from_mlx_lm: its mask from each row's offset and length)
    with each example's cuts taken out of its loss mask; token i is the target at position i - 1."""
    batch = Batch.from_mlx_lm(tokens, lengths)
    keep = np.ones(batch.mask.shape, dtype=bool)
    for row, idx in enumerate(rows):
        for start, end in dataset.cuts(idx):
            keep[row, max(start - 1, 0):end - 1] = False
    return Batch(batch.inputs, batch.targets, mx.logical_and(batch.mask, mx.array(keep)))


class BatchIterator:
    """mlx-lm's batches in mlx-lm's order: `mlx_lm.tuner.trainer.iterate_batches` itself (length-sorted batches,
    padded to a multiple of 32 + 1, visited in `np.random.permutation` order per epoch), its permutations drawn from
    `rng`, a RandomState that stands for mlx-lm's global numpy stream (`np.random.seed(seed)` at start). Training and
    validation share that stream as they do in mlx_lm.lora, so with the same data, batch size and seed every batch
    is mlx-lm's. Truncation to max_seq_length is announced once; the position (the stream's state at the start of
    the epoch and now, and the batches drawn in the epoch) can be saved and restored exactly. Each batch is mlx-lm's
    (tokens, lengths), or, for examples with cuts (--train-all-turns on chat data), the same batch as a Batch whose
    mask leaves the cuts out (cut_batch)."""

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
        self._reads = _Reads(dataset) if getattr(dataset, "has_cuts", False) else None
        self.epoch, self.index = 0, 0
        self._gen, self._epoch_state = None, None
        self.warned = False

    def longest_batch_length(self) -> int:
        """The longest padded batch this data can make (mlx-lm pads a batch to a multiple of 32 + 1, at most
        max_seq_length): the sequence length the plan is made for."""
        data = self.dataset  # its items are (tokens, offset), tokenized once and kept (TokenizedExamples)
        if isinstance(data, TokenizedExamples):
            longest = int(data.lengths().max(initial=2))
        else:
            longest = max((len(data[i][0]) for i in range(len(data))), default=2)
        return min(1 + 32 * ((longest + 31) // 32), self.max_seq_length)

    def _draw(self):
        """next() of mlx-lm's generator with its global numpy stream swapped for ours (and its warning held)."""

        outer = np.random.get_state()
        np.random.set_state(self.rng.get_state())
        printed = io.StringIO()
        if self._reads is not None:
            self._reads.rows = []
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
        data = self.dataset if self._reads is None else self._reads
        self._gen = iterate_batches(data, self.batch_size, self.max_seq_length, loop=False)
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
        rows = self._reads.rows if self._reads is not None else None
        if self.world > 1:  # this rank's rows of the global batch (the padding stays the global batch's)
            tokens, lengths = tokens[self.rank::self.world], lengths[self.rank::self.world]
            rows = None if rows is None else rows[self.rank::self.world]
        return (tokens, lengths) if rows is None else cut_batch(self.dataset, tokens, lengths, rows)


def _rng_json(state) -> list:
    name, keys, pos, has_gauss, gauss = state
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)]


def _rng_state(saved: list):
    name, keys, pos, has_gauss, gauss = saved
    return name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss
