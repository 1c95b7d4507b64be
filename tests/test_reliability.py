"""Every way a run can end keeps the last good state: signals, full disks, concurrent runs, bad bytes, random kills."""

import json
import os
import random
import resource
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mesp_mlx.cli import main
from mesp_mlx.io import WriteError, atomic_write, atomic_write_json, plain_file_mode, remove_stale_temp_files
from mesp_mlx.lock import LOCK_FILE, FolderLock
from mesp_mlx.run.metrics import MetricsLog
from mesp_mlx.run.state import STATE_FILE
from test_resume import ITERS, _args, _assert_same, run_setup  # noqa: F401 (fixture)
from test_train_cli import CHAT, write_data


# --- signals ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_second_signal_stops_at_once(signum):
    """The first signal only asks the run to stop after its step; the second one ends the process there and then."""
    script = textwrap.dedent(f"""
        import os, time
        from mesp_mlx.run.signals import StopSignals
        stop = StopSignals(log=lambda *a: None, at_once=False)  # during the steps
        os.kill(os.getpid(), {int(signum)})
        assert stop.received == {int(signum)}, stop.received
        print("first handled", flush=True)
        os.kill(os.getpid(), {int(signum)})
        time.sleep(30)
        print("still running")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "first handled" in proc.stdout and "still running" not in proc.stdout
    if signum == signal.SIGINT:
        assert "KeyboardInterrupt" in proc.stderr  # the CLI turns it into exit 130
    else:
        assert proc.returncode == -signum  # the signal's default action: killed by it (shell status 128 + n)


# --- stops before step 1: at once, nothing half-written ----------------------------------------------------------------
_SILENT_HUB = textwrap.dedent("""
    import os, socket, sys, threading
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
    os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{server.getsockname()[1]}"  # accepts, never answers
    os.environ["HF_HOME"] = sys.argv.pop(1)
    from mesp_mlx.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_signal_during_a_hub_download_that_never_answers_stops_at_once(tmp_path, signum, status):
    """A first signal before step 1 used to say "finishing this step" and wait for a download that never ends."""
    out = tmp_path / "out"
    data = write_data(tmp_path / "data")
    proc = subprocess.Popen([sys.executable, "-c", _SILENT_HUB, str(tmp_path / "hf"), "train", "--model",
                             "someone/some-model", "--data", str(data), "--adapter-path", str(out), "--iters", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3.0)  # importing, then waiting on the silent hub
    assert proc.poll() is None, proc.stdout.read()
    sent = time.monotonic()
    proc.send_signal(signum)
    text = proc.communicate(timeout=30)[0]
    assert time.monotonic() - sent < 5, text
    assert proc.returncode == status, text
    assert "stopping now" in text and "finishing this step" not in text and "Traceback" not in text
    assert not out.exists()  # the folder the run's lock created is gone again: nothing was written


def test_a_hub_that_never_answers_times_out_with_a_clear_message(tmp_path, monkeypatch):
    script = _SILENT_HUB.replace("from mesp_mlx.cli import main", "from mesp_mlx.cli import main\n"
                                 "from mesp_mlx.models import load\n"
                                 "load.HUB_TIMEOUTS.update(connect=0.5, read=0.5)")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "hf"), "train", "--model", "someone/m",
                           "--data", str(write_data(tmp_path / "data")), "--adapter-path", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "the Hugging Face hub cannot be reached" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_stop_while_the_data_loads_ends_at_once_and_leaves_nothing(tiny_models, tmp_path, signum):
    """A run stopped while tokenizing a large train.jsonl (SIGTERM: at once, exit 143; SIGKILL: killed) leaves no
    adapter folder, and the next run starts clean and completes."""
    data = tmp_path / "data"
    data.mkdir()
    line = json.dumps(CHAT[0]) + "\n"
    (data / "train.jsonl").write_text(line * 100_000)  # ~12 MB: seconds of tokenizing, with a progress line
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "mesp_mlx.cli", "train", "--model", str(tiny_models["qwen2"]), "--data", str(data),
            "--adapter-path", str(out), "--iters", "1", "--no-plot"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for text in proc.stdout:  # the data loader's first progress line: it is reading and tokenizing now
        if "reading and tokenizing" in text:
            break
    time.sleep(0.3)
    assert proc.poll() is None, "the data loaded too fast to be interrupted"
    sent = time.monotonic()
    proc.send_signal(signum)
    rest = proc.communicate(timeout=60)[0]
    assert time.monotonic() - sent < 10, rest
    assert proc.returncode == (143 if signum == signal.SIGTERM else -signal.SIGKILL), rest
    assert "Traceback" not in rest
    if signum == signal.SIGTERM:
        assert not out.exists()
    small = tmp_path / "small"
    small.mkdir()
    (small / "train.jsonl").write_text(line * 4)
    argv[argv.index(str(data))] = str(small)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "adapters.safetensors").is_file()


# --- I/O errors -------------------------------------------------------------------------------------------------------
def test_a_failed_write_keeps_the_previous_file_and_names_path_and_what(tmp_path):
    target = tmp_path / "adapters.safetensors"
    mx.save_safetensors(str(target), {"a": mx.ones((3,))})
    before = target.read_bytes()

    def full_disk(tmp):
        Path(tmp).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError) as e:
        atomic_write(target, full_disk, what="the adapters")
    assert str(e.value) == (f"cannot write the adapters to {target}: no space left on the device; the previous "
                            "complete file is kept")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapters.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_permissions_of_a_plain_write(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        with open(tmp_path / "plain.json", "w") as f:
            f.write("{}")
        assert plain_file_mode() == 0o666 & ~umask
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)


def _limited_file_size(limit):
    def preexec():  # a file system that is full after `limit` bytes of one file: write() fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def _iters(args, n):
    args = list(args)
    args[args.index("--iters") + 1] = str(n)
    return args


def test_a_full_disk_during_a_save_is_one_line_exit_74_and_the_state_resumes(run_setup, tmp_path):
    model, data, ref_adapters, ref_records = run_setup
    out = tmp_path / "full"
    assert main(_iters(_args(model, data, out), 4)) == 0  # a complete state at step 4
    adapters_size, state_size = (out / "adapters.safetensors").stat().st_size, (out / STATE_FILE).stat().st_size
    limit = (adapters_size + state_size) // 2  # the adapters fit, the training state does not
    assert adapters_size < limit < state_size
    state_before = (out / STATE_FILE).read_bytes()
    proc = subprocess.run([sys.executable, "-m", "mesp_mlx.cli", *_args(model, data, out, "--resume")],
                          capture_output=True, text=True, timeout=300, preexec_fn=_limited_file_size(limit))
    assert proc.returncode == 74, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mesp-mlx: error")]
    assert len(lines) == 1, proc.stderr  # one line
    assert lines[0].startswith(f"mesp-mlx: error: cannot write the training state to {out / STATE_FILE}: the "
                               "write failed ([write] Unable to write") and lines[0].endswith(
        "; the previous complete file is kept"), lines[0]
    assert (out / STATE_FILE).read_bytes() == state_before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp file, the lock released
    assert main(_args(model, data, out, "--resume")) == 0
    _assert_same(out, ref_adapters, ref_records)


def test_too_little_room_for_a_state_save_is_refused_before_anything_is_written(tiny_models, tmp_path, capsys,
                                                                                   monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    data = write_data(tmp_path / "d")
    out = tmp_path / "out"
    rc = main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "1",
               "--adapter-path", str(out), "--no-plot"])
    err = capsys.readouterr().err
    assert rc == 74 and "cannot write the training state to" in err and "MB free, a save needs" in err, err
    assert not out.exists()  # not even the folder: the lock that made it removed it again


# --- one run per folder -----------------------------------------------------------------------------------------------
def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(tiny_models, tmp_path, capsys):
    data = write_data(tmp_path / "d")
    out = tmp_path / "busy"
    args = ["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "1",
            "--adapter-path", str(out), "--no-plot"]
    with FolderLock(out):  # a live run (this process) holds the folder
        assert main(args) == 75
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {os.getpid()}" in err, err
        assert not (out / "adapters.safetensors").exists()
    assert main(args) == 0  # released: the folder is free again
    assert not (out / LOCK_FILE).exists()


def test_a_stale_lock_of_a_dead_run_is_taken_over_with_a_note(tiny_models, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    out = tmp_path / "stale"
    out.mkdir()
    (out / LOCK_FILE).write_text(f'{{"pid": {dead_pid}, "host": "h", "started": "then", "command": "mesp-mlx"}}')
    (out / ".adapters.safetensors.abcd1234.safetensors").write_bytes(b"half a save")  # left by a kill
    data = write_data(tmp_path / "d")
    assert main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "1",
                 "--adapter-path", str(out), "--no-plot"]) == 0
    text = capsys.readouterr().out
    assert f"was left by run pid {dead_pid}" in text and "taking it over" in text
    assert "removed 1 temp file(s)" in text
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_stale_temp_file_cleanup_touches_only_our_temp_names(tmp_path):
    keep = [".hidden", ".gitignore", "notes.txt", ".config.yaml.abcd1234", "adapters.safetensors"]
    drop = [".adapters.safetensors.ab_cd123.safetensors", ".metrics.jsonl.k2j4h5g6", ".adapter_config.json.zz11yy22"]
    for name in keep + drop:
        (tmp_path / name).write_text("x")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(drop)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


# --- bytes that are not what they should be -----------------------------------------------------------------------------
def test_data_that_is_not_utf8_is_refused_with_file_line_and_a_bom_is_fine(tiny_models, tmp_path, capsys):
    good = write_data(tmp_path / "good")
    lines = (good / "train.jsonl").read_bytes().splitlines(keepends=True)
    bad = tmp_path / "latin1"
    bad.mkdir()
    (bad / "train.jsonl").write_bytes(lines[0] + '{"text": "caf\u00e9"}\n'.encode("latin-1") + b"".join(lines[1:]))
    out = tmp_path / "o1"
    rc = main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(bad), "--iters", "1",
               "--adapter-path", str(out), "--no-plot"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad / 'train.jsonl'}:2: not UTF-8 text (byte 0xe9 at column 14)" in err, err
    assert not out.exists() or not any(out.iterdir())
    bom = tmp_path / "bom"
    bom.mkdir()
    (bom / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + b"".join(lines).replace(b"\n", b"\r\n"))
    assert main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(bom), "--iters", "1",
                 "--adapter-path", str(tmp_path / "o2"), "--no-plot"]) == 0


# --- chaos: SIGKILL at random moments ---------------------------------------------------------------------------------
CHAOS_ITERS = 90  # more than 20 kills can skip past on a fast machine (36 was finished after 12 kills there)


def test_random_sigkills_then_resume_end_bit_identical_to_the_uninterrupted_run(tiny_models, tmp_path):
    """20 seeded random kills (AdamW, LoRA dropout, 6 batches an epoch -> 15 epochs, a save every 3 steps), some of them
    SIGTERMs, a quarter of them while loading the model or the data; each run resumes the last (or starts again when
    nothing was saved yet); the end is the uninterrupted run's, bit for bit."""
    data = write_data(tmp_path / "data", records=CHAT * 4)
    (tmp_path / "dropout.yaml").write_text("lora_parameters:\n  rank: 4\n  dropout: 0.1\n")

    def args(out, *extra):
        a = _iters(_args(tiny_models["qwen3"], data, out, *extra), CHAOS_ITERS)
        a[a.index("--save-every") + 1] = "3"
        return a

    ref = tmp_path / "ref"
    ref_proc = subprocess.run([sys.executable, "-m", "mesp_mlx.cli", *args(ref)], capture_output=True, text=True,
                              timeout=300)
    assert ref_proc.returncode == 0, ref_proc.stdout + ref_proc.stderr

    rng = random.Random(20261130)
    out = tmp_path / "chaos"
    kills = resumed = terms = 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for _ in range(20):
        resume = ["--resume"] if (out / STATE_FILE).exists() else []
        resumed += bool(resume)
        proc = subprocess.Popen([sys.executable, "-m", "mesp_mlx.cli", *args(out, *resume)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if rng.random() < 0.25:  # a moment while loading, evaluating or in the first steps
            time.sleep(rng.uniform(0.05, 1.5))
        else:  # a moment within one of the next few steps (a save among them: every 3rd step saves)
            target, first = None, None
            for line in proc.stdout:
                if "] " in line and f"/{CHAOS_ITERS} " in line:
                    step = int(line.split("] ", 1)[1].split("/", 1)[0])
                    first = step if first is None else first
                    target = first + rng.randrange(4) if target is None else target
                    if step >= target:
                        break
            time.sleep(rng.uniform(0.0, 0.03))
        # mostly SIGKILL; some SIGTERMs, which end a run at once before step 1 (loading the model and the data) and
        # after the running step during the steps (before its handler is installed: the default action, -15)
        sig = signal.SIGTERM if rng.random() < 0.2 else signal.SIGKILL
        proc.send_signal(sig)
        text = proc.communicate(timeout=60)[0]
        kills += proc.returncode in (-signal.SIGKILL, -signal.SIGTERM, 143)
        terms += sig == signal.SIGTERM
        assert proc.returncode in ((0, -signal.SIGKILL) if sig == signal.SIGKILL else (0, -signal.SIGTERM, 143)), text
        assert "Traceback" not in text, text
    assert kills >= 15 and resumed >= 10 and terms >= 2  # nearly every draw stopped a run mid-way, most resumed
    resume = ["--resume"] if (out / STATE_FILE).exists() else []
    final = subprocess.run([sys.executable, "-m", "mesp_mlx.cli", *args(out, *resume)], capture_output=True,
                           text=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    got, want = mx.load(str(out / "adapters.safetensors")), mx.load(str(ref / "adapters.safetensors"))
    assert set(got) == set(want) and all(mx.array_equal(got[k], want[k]).item() for k in got)
    records, ref_records = MetricsLog.read(out / "metrics.jsonl"), MetricsLog.read(ref / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, CHAOS_ITERS + 1))
    assert [r["loss"] for r in records] == [r["loss"] for r in ref_records]


# --- every writer: one line, exit 74, nothing half-written ------------------------------------------------------------
def _fail_renames(monkeypatch):
    """The commit point of every atomic write (file or folder) fails as on a full disk."""
    import errno

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)


def test_convert_and_make_data_on_a_full_disk_end_in_one_line_and_exit_74(tiny_models, tmp_path, capsys, monkeypatch):
    from test_convert import _mlx_adapter

    src = _mlx_adapter(tiny_models["qwen2"], tmp_path / "mlx")
    _fail_renames(monkeypatch)
    out = tmp_path / "peft"
    assert main(["convert", str(src), str(out), "--to", "peft"]) == 74
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mesp-mlx: error: cannot write the converted adapter to {out}: no space left on the device; the "
                   "previous complete file is kept"]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    data = tmp_path / "data"
    assert main(["make-data", "--out", str(data)]) == 74
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mesp-mlx: error: cannot write ") and "no space left" in err[0]
    assert not data.exists() or not [p for p in data.iterdir()]


def test_folders_written_whole_get_the_permissions_of_a_plain_mkdir(tmp_path):
    from mesp_mlx.io import atomic_folder, plain_dir_mode

    old = os.umask(0o022)
    try:
        atomic_folder(tmp_path / "model", lambda d: (d / "config.json").write_text("{}"), "a model")
        assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == plain_dir_mode() == 0o755
        assert stat.S_IMODE((tmp_path / "model" / "config.json").stat().st_mode) == 0o644
    finally:
        os.umask(old)
