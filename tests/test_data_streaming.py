"""Data loading that streams (issue 35): data files that cannot hang the run (a FIFO, a device), bounded files and lines,
only the tokenized examples kept (memory ~ the tokens, not ~15x the file), progress on a large file, tokens and batches
identical to mlx-lm's own dataset classes; and a model folder without a usable tokenizer refused before training."""

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from mlx_lm.tuner.datasets import CacheDataset, create_dataset
from mlx_lm.tuner.trainer import iterate_batches
from mlx_lm.utils import load_tokenizer
from test_train_cli import CHAT, write_data

from mesp_mlx.cli import main
from mesp_mlx.data import datasets
from mesp_mlx.data.datasets import DataError, load_splits


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return load_tokenizer(Path(tiny_models["qwen2"]))


def _write(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _chat_records(n: int, seed: int = 0, words: int = 40) -> list[dict]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(500)]
    return [{"messages": [{"role": "user", "content": " ".join(rng.choices(vocab, k=rng.randint(5, words)))},
                          {"role": "assistant", "content": " ".join(rng.choices(vocab, k=rng.randint(5, words)))}]}
            for _ in range(n)]


def _load_within(seconds: float, *args, **kwargs):
    """load_splits(*args) in a daemon thread: (finished, its result or exception)."""
    box = {}

    def run():
        try:
            box["result"] = load_splits(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["result"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive(), box.get("result")


# --- files that cannot hang the run -------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("split", ["train", "valid"])
def test_a_fifo_data_file_is_refused_at_once(tokenizer, tmp_path, split):
    data = write_data(tmp_path / "data", valid=False)
    fifo = data / f"{split}.jsonl"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    finished, result = _load_within(10, data, tokenizer)
    if not finished:  # today's open() blocks until a writer comes: be that writer, so the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert finished, "loading a FIFO with no writer blocked"
    assert isinstance(result, DataError), result
    assert str(result) == f"{fifo}: a named pipe (FIFO), not a regular file (give a jsonl file)"


def test_a_device_as_data_file_is_refused(tokenizer, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").symlink_to(os.devnull)
    with pytest.raises(DataError, match=r"train\.jsonl: a character device, not a regular file"):
        load_splits(data, tokenizer)


def test_a_fifo_train_jsonl_makes_train_exit_2_promptly(tiny_models, tmp_path):
    """The CLI end to end, in a subprocess with a timeout (today's `mesp-mlx train` hangs in open())."""
    data = tmp_path / "data"
    data.mkdir()
    os.mkfifo(data / "train.jsonl")
    out = tmp_path / "out"
    try:
        proc = subprocess.run([sys.executable, "-m", "mesp_mlx.cli", "train", "--model", str(tiny_models["qwen2"]),
                               "--data", str(data), "--adapter-path", str(out), "--iters", "1", "--no-plot"],
                              check=False, capture_output=True, text=True, timeout=60, env={**os.environ})
    except subprocess.TimeoutExpired:
        pytest.fail("mesp-mlx train blocked on a FIFO train.jsonl")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.jsonl: a named pipe (FIFO), not a regular file" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "adapters.safetensors").exists()


# --- bounded files and lines --------------------------------------------------------------------------------------------
def test_a_line_over_the_limit_is_refused_with_file_and_line(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_LINE_BYTES", 200)
    path = _write(tmp_path / "data" / "train.jsonl", [{"text": "short"}, {"text": "x" * 300}, {"text": "short"}])
    with pytest.raises(DataError, match=r"train\.jsonl:2: line longer than the limit of 0\.0 MB"):
        load_splits(path.parent, tokenizer)
    # the limit counts the line's bytes without its newline; a last line without one counts the same
    exact = '{"text": "%s"}' % ("y" * (200 - 12))
    assert len(exact) == 200
    path.write_text('{"text": "short"}\n' + exact + "\n")
    assert len(load_splits(path.parent, tokenizer)["train"]) == 2
    path.write_text('{"text": "short"}\n' + exact)
    assert len(load_splits(path.parent, tokenizer)["train"]) == 2
    path.write_text('{"text": "short"}\n' + exact + " ")
    with pytest.raises(DataError, match=r"train\.jsonl:2: line longer than the limit"):
        load_splits(path.parent, tokenizer)


def test_a_huge_line_is_refused_without_reading_it_all(tokenizer, tmp_path):
    """A 256 MB line (a sparse file of zeros, no newline): refused at line 1 having read at most the line limit."""
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "train.jsonl", "wb") as f:
        f.truncate(256 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"train\.jsonl:1: line longer than the limit of 4\.0 MB"):
            load_splits(data, tokenizer)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * datasets.MAX_LINE_BYTES, peak


def test_a_file_over_the_size_limit_is_refused(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_FILE_BYTES", 1000)
    path = _write(tmp_path / "data" / "train.jsonl", [{"text": f"record {i}"} for i in range(100)])
    assert path.stat().st_size > 1000
    with pytest.raises(DataError, match=rf"^{path}: .* MB, over the limit of 0\.0 MB per data file"):
        load_splits(path.parent, tokenizer)
    monkeypatch.setenv("MESP_MLX_MAX_DATA_MB", "1")  # the user's way to raise it
    assert len(load_splits(path.parent, tokenizer)["train"]) == 100


# --- streaming: memory and progress -------------------------------------------------------------------------------------
def test_loading_holds_about_the_tokens_not_the_records(tokenizer, tmp_path):
    """The traced peak of loading ~1 MB of chat records (~1 token per byte with the tiny tokenizer) stays under the
    tokens' int32 bytes + 1 MB (the loader before issue 35 kept every parsed record, mlx-lm's dataset objects and Python
    token lists: ~15x the file)."""
    path = _write(tmp_path / "data" / "train.jsonl", _chat_records(2500, words=60))
    assert path.stat().st_size > 900_000
    tracemalloc.start()
    try:
        splits = load_splits(path.parent, tokenizer)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    train = splits["train"]
    n_tokens = sum(len(train[i][0]) for i in range(len(train)))
    assert len(train) == 2500 and n_tokens > 100_000
    assert peak < 4 * n_tokens + 2**20, (peak, n_tokens)  # measured: 2.5 MB here (uint16 tokens), 14.5 MB before


def test_a_large_file_shows_its_progress(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "PROGRESS_BYTES", 1000)
    monkeypatch.setattr(datasets, "PROGRESS_SECONDS", 0.0)
    path = _write(tmp_path / "data" / "train.jsonl", _chat_records(40))
    _write(tmp_path / "data" / "valid.jsonl", _chat_records(2))  # under the threshold: silent
    lines = []
    splits = load_splits(path.parent, tokenizer, log=lines.append)
    assert lines[0] == f"[mesp-mlx] {path}: {path.stat().st_size / 2**20:.1f} MB, reading and tokenizing"
    assert len(lines) == 1 + 40 + 1 and all(str(path) in line for line in lines)
    assert "(100 %), 40 examples" in lines[-2]
    train = splits["train"]
    assert lines[-1].startswith(f"[mesp-mlx] {path}: 40 examples, {train.n_tokens} tokens (")
    quiet = []
    monkeypatch.setattr(datasets, "PROGRESS_BYTES", 10 * 2**20)
    load_splits(path.parent, tokenizer, log=quiet.append)
    assert quiet == []


# --- the same tokens and batches as mlx-lm ------------------------------------------------------------------------------
TEXT = [{"text": "To be, or not to be"}, {"text": "that is the question", "id": 7},
        {"text": "whether tis nobler in the mind to suffer"}, {"text": "the slings and arrows"},
        {"text": "of outrageous fortune", "source": "hamlet", "id": 9}, {"text": "or to take arms"}]
COMPLETIONS = [{"prompt": "hello, how are you", "completion": "i am fine"},
               {"prompt": "capital of france?", "completion": "paris", "id": 1},
               {"prompt": "2 + 2", "completion": "4, of course"}, {"prompt": "a colour", "completion": "blue"},
               {"prompt": "the quick brown fox", "completion": "jumps over the lazy dog", "a": 1, "b": 2}]
CHATS = CHAT + [
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "caf\u00e9?"},
                  {"role": "assistant", "content": "yes"}], "id": 3},
    {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                  {"role": "user", "content": "three"}, {"role": "assistant", "content": "four"}]},
]


@pytest.mark.parametrize("records,mask_prompt", [(TEXT, False), (COMPLETIONS, False), (COMPLETIONS, True),
                                                 (CHATS, False), (CHATS, True)],
                         ids=["text", "completions", "completions-masked", "chat", "chat-masked"])
def test_tokens_and_batches_are_mlx_lms(tokenizer, tmp_path, records, mask_prompt):
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("\n" + "".join(json.dumps(r) + "\n\n" for r in records))  # blank lines are skipped
    ours = load_splits(path.parent, tokenizer, mask_prompt)["train"]
    theirs = CacheDataset(create_dataset([json.loads(json.dumps(r)) for r in records], tokenizer,
                                         type("Cfg", (), {"mask_prompt": mask_prompt})()))
    assert len(ours) == len(theirs) == len(records)
    for i in range(len(records)):
        tokens, offset = ours[i]
        assert (tokens.tolist(), offset) == tuple(theirs[i]), i
        assert ours.itemlen(i) == theirs.itemlen(i)  # mlx-lm's iterate_batches sorts by it
    assert isinstance(ours, CacheDataset) and ours[-1][0].tolist() == theirs[len(records) - 1][0]
    for batch_size, max_seq in ((2, 2048), (3, 8)):
        np.random.seed(5)
        mine = [tuple(np.array(a).tolist() for a in b) for b in iterate_batches(ours, batch_size, max_seq)]
        np.random.seed(5)
        ref = [tuple(np.array(a).tolist() for a in b) for b in iterate_batches(theirs, batch_size, max_seq)]
        assert mine == ref


def test_token_ids_over_uint16_are_kept_exactly():
    examples = datasets.TokenizedExamples()
    examples.append([1, 2, 65535], 1, 1)
    examples.append([70000, 3], 0, 2)
    examples.append([4, 5], 0, 1)
    examples.finish()
    assert [(t.tolist(), o) for t, o in (examples[i] for i in range(3))] == \
        [([1, 2, 65535], 1), ([70000, 3], 0), ([4, 5], 0)]
    assert examples[0][0].dtype == np.int32 and examples.lengths().tolist() == [3, 2, 2]
    assert examples.itemlen(1) == 2 and examples.nbytes == 7 * 4 + 4 * 8 + 3 * 8 + 3 * 8


# --- a model folder without a usable tokenizer --------------------------------------------------------------------------
def test_a_model_without_tokenizer_is_refused_before_training(tiny_models, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["qwen2"], folder)
    (folder / "tokenizer.json").unlink()
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    rc = main(["train", "--model", str(folder), "--data", str(data), "--adapter-path", str(out), "--iters", "1",
               "--no-plot"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{folder}: no tokenizer: tokenizer.json is missing" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    # tokenizer files without a vocabulary: transformers builds an empty tokenizer; refused too
    (folder / "vocab.json").write_text("{}")
    (folder / "merges.txt").write_text("#version: 0.2\n")
    rc = main(["train", "--model", str(folder), "--data", str(data), "--adapter-path", str(out), "--iters", "1",
               "--no-plot"])
    err = capsys.readouterr().err
    assert rc == 2 and "its tokenizer has no vocabulary" in err and not out.exists()
