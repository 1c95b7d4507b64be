"""One owner per folder: every command that writes into a folder takes its lock, never writes one adapter format over
the other, and a refused command leaves nothing behind."""

import json
import os
import subprocess
import sys
import textwrap
import time

import mlx.core as mx
import pytest
from test_train_cli import write_data

from mesp_mlx.adapters.formats import folder_format
from mesp_mlx.cli import main
from mesp_mlx.lock import LOCK_FILE


def _train(model, data, out, *extra):
    return main(["train", "--model", str(model), "--data", str(data), "--iters", "1", "--batch-size", "1",
                 "--no-plot", "--adapter-path", str(out), *extra])


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """A finished mlx-lm adapter folder, its PEFT conversion, and the data."""
    root = tmp_path_factory.mktemp("owners")
    data = write_data(root / "data")
    mlx_dir = root / "mlx"
    assert _train(tiny_models["qwen2"], data, mlx_dir) == 0
    peft_dir = root / "peft"
    assert main(["convert", str(mlx_dir), str(peft_dir), "--to", "peft"]) == 0
    return {"data": data, "mlx": mlx_dir, "peft": peft_dir, "model": tiny_models["qwen2"]}


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_line(err):
    """The one error line (notes such as the MeSP rule's may precede it)."""
    errors = [line for line in err.strip().splitlines() if line.startswith("mesp-mlx: error:")]
    assert "Traceback" not in err and len(errors) == 1 and err.strip().endswith(errors[0]), err
    return errors[0]


def test_folder_formats_are_told_apart(trained, tmp_path):
    assert folder_format(trained["mlx"]) == "mlx-lm" and folder_format(trained["peft"]) == "peft"
    assert folder_format(tmp_path) is None


def test_convert_into_its_own_source_is_refused_and_changes_nothing(trained, tmp_path, capsys):
    """`convert X X --to peft` used to replace the mlx-lm adapter_config.json with PEFT's."""
    import shutil

    src = tmp_path / "x"
    shutil.copytree(trained["mlx"], src)
    before = _snapshot(src)
    assert main(["convert", str(src), str(src), "--to", "peft"]) == 2
    assert "holds a mlx-lm adapter" in _one_line(capsys.readouterr().err)
    assert _snapshot(src) == before
    # and the reverse: a PEFT adapter converted into a folder holding another PEFT adapter's neighbour format
    peft = tmp_path / "p"
    shutil.copytree(trained["peft"], peft)
    before = _snapshot(peft)
    assert main(["convert", str(trained["mlx"]), str(peft), "--to", "mlx-lm", "--from", "mlx-lm"]) == 2
    capsys.readouterr()
    assert _snapshot(peft) == before


def test_train_into_a_peft_folder_is_refused_and_changes_nothing(trained, tmp_path, capsys):
    import shutil

    peft = tmp_path / "p"
    shutil.copytree(trained["peft"], peft)
    before = _snapshot(peft)
    assert _train(trained["model"], trained["data"], peft) == 2
    assert "holds a peft adapter" in _one_line(capsys.readouterr().err)
    assert _snapshot(peft) == before and not (peft / LOCK_FILE).exists()


def test_a_refused_run_creates_no_folder(trained, tmp_path, capsys):
    """A run refused after taking its folder's lock (here: bad data) removes the folders the lock created."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"text": "ok"}\n{"nope": 1}\n')
    out = tmp_path / "new" / "deeper" / "adapters"
    assert _train(trained["model"], bad, out) == 2
    assert "train.jsonl:2" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "new").exists()


@pytest.fixture
def held_folder(tmp_path):
    """A folder whose lock a live process holds (as a training run does)."""
    folder = tmp_path / "busy"
    script = textwrap.dedent(f"""
        import sys, time
        from mesp_mlx.lock import FolderLock
        FolderLock({str(folder)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield folder
    proc.kill()
    proc.wait()


def test_every_writer_refuses_a_folder_in_use_with_exit_75(trained, held_folder, tmp_path, capsys):
    before = _snapshot(held_folder)
    stream = tmp_path / "s.jsonl"
    stream.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "hello"}]}) + "\n")
    commands = {
        "train": ["train", "--model", str(trained["model"]), "--data", str(trained["data"]), "--iters", "1",
                  "--adapter-path", str(held_folder)],
        "convert": ["convert", str(trained["mlx"]), str(held_folder), "--to", "peft"],
        "fuse": ["fuse", "--model", str(trained["model"]), "--adapter-path", str(trained["mlx"]), "--save-path",
                 str(held_folder)],
        "make-data": ["make-data", "--out", str(held_folder)],
        "personalize": ["personalize", "--stream", str(stream), "--out", str(held_folder), "--model",
                        str(trained["model"]), "--iters", "1"],
        "import-gguf": ["import-gguf", str(tmp_path / "any.gguf"), str(held_folder)],
        "federate": ["federate", "--chatterbot-users", "2", "--out", str(held_folder)],
    }
    for name, argv in commands.items():
        t = time.monotonic()
        assert main(argv) == 75, name
        line = _one_line(capsys.readouterr().err)
        assert "in use by another run" in line and "pid " in line, (name, line)
        assert time.monotonic() - t < 30, name
        assert _snapshot(held_folder) == before, name


def test_import_gguf_never_deletes_an_existing_folder(tmp_path, capsys):
    """It used to remove a non-empty output folder before writing the import."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["import-gguf", str(tmp_path / "missing.gguf"), str(out)]) == 2
    assert "not an empty folder" in _one_line(capsys.readouterr().err)
    assert (out / "notes.txt").read_text() == "keep me"


def test_make_data_takes_the_lock_and_a_refused_one_creates_nothing(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["make-data", "--out", str(out), "--corpus", "chatterbot", "--categories", "no-such-category"]) != 0
    capsys.readouterr()
    assert not out.exists()
    assert main(["make-data", "--out", str(out)]) == 0
    assert (out / "train.jsonl").is_file() and not (out / LOCK_FILE).exists()
    os.remove(out / "train.jsonl")
    mx.clear_cache()
