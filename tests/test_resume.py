"""Crash-safe training: SIGKILL / Ctrl-C at any point, then --resume, ends with the uninterrupted run's adapter."""

import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from mesp_mlx.cli import main
from mesp_mlx.run.config import TrainConfig
from mesp_mlx.run.metrics import MetricsLog
from mesp_mlx.run.state import STATE_FILE
from test_train_cli import CHAT, write_data

ITERS = 14


def _args(model, data, out, *extra):
    # AdamW (optimizer state to restore), LoRA dropout (randomness to reproduce), batch 2 over 6 examples (3 batches
    # an epoch: the data position and the per-epoch shuffle must be restored too)
    return ["train", "--model", str(model), "--data", str(data), "--iters", str(ITERS), "--batch-size", "2",
            "--optimizer", "adamw", "--learning-rate", "1e-2", "--save-every", "2", "--steps-per-report", "1",
            "--adapter-path", str(out), "--no-plot", "--seed", "5", "-c", str(out.parent / "dropout.yaml"), *extra]


@pytest.fixture()
def run_setup(tiny_models, tmp_path):
    data = write_data(tmp_path / "data", records=CHAT * 2)
    (tmp_path / "dropout.yaml").write_text("lora_parameters:\n  rank: 4\n  dropout: 0.1\n")
    ref = tmp_path / "ref"
    assert main(_args(tiny_models["qwen3"], data, ref)) == 0
    return tiny_models["qwen3"], data, mx.load(str(ref / "adapters.safetensors")), MetricsLog.read(ref / "metrics.jsonl")


def _spawn(args):
    return subprocess.Popen([sys.executable, "-m", "mesp_mlx.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_steps(proc, metrics, n, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if metrics.exists() and len(MetricsLog.read(metrics)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError("the run ended before it could be interrupted:\n" + proc.stdout.read())
        time.sleep(0.02)
    raise AssertionError("timeout")


def _assert_same(out, ref_adapters, ref_records):
    got = mx.load(str(out / "adapters.safetensors"))
    assert set(got) == set(ref_adapters)
    assert all(mx.array_equal(got[k], ref_adapters[k]).item() for k in got)  # bit for bit
    records = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, ITERS + 1))
    np.testing.assert_array_equal([r["loss"] for r in records], [r["loss"] for r in ref_records])


@pytest.mark.parametrize("kill_after", [1, 4, 9])
def test_sigkill_then_resume_equals_uninterrupted(run_setup, tmp_path, kill_after, capsys):
    model, data, ref_adapters, ref_records = run_setup
    out = tmp_path / "killed"
    proc = _spawn(_args(model, data, out))
    _wait_for_steps(proc, out / "metrics.jsonl", kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resume = ["--resume"] if (out / STATE_FILE).exists() else []  # killed before the first save: start again
    assert resume or kill_after < 4
    assert main(_args(model, data, out, *resume)) == 0
    if resume:
        assert "resuming" in capsys.readouterr().out  # continued from the saved step, not started over
    _assert_same(out, ref_adapters, ref_records)


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_ctrl_c_sigterm_sighup_save_exit_cleanly_and_resume(run_setup, tmp_path, signum, status):
    model, data, ref_adapters, ref_records = run_setup
    out = tmp_path / "int"
    proc = _spawn(_args(model, data, out))
    _wait_for_steps(proc, out / "metrics.jsonl", 3)
    proc.send_signal(signum)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == status, text
    assert "state saved; continue with --resume" in text
    saved_step = len(MetricsLog.read(out / "metrics.jsonl"))
    assert 3 <= saved_step < ITERS
    assert main(_args(model, data, out, "--resume")) == 0
    _assert_same(out, ref_adapters, ref_records)


def test_resume_continues_with_the_interrupted_runs_lanes(run_setup, tmp_path, capsys):
    """A run on one lane, interrupted and resumed without --lanes on a machine whose default is another count, keeps
    its one lane (engine/lanes.py): the continuation equals the uninterrupted one-lane run bit for bit."""
    model, data, _, _ = run_setup
    ref, out = tmp_path / "ref1", tmp_path / "one"
    assert main(_args(model, data, ref, "--lanes", "1")) == 0
    assert json.loads((ref / "adapter_config.json").read_text())["lanes"] == 1
    ref_adapters, ref_records = mx.load(str(ref / "adapters.safetensors")), MetricsLog.read(ref / "metrics.jsonl")
    proc = _spawn(_args(model, data, out, "--lanes", "1"))
    _wait_for_steps(proc, out / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGINT)
    assert proc.communicate(timeout=120)[0] and proc.returncode == 130
    capsys.readouterr()
    assert main(_args(model, data, out, "--resume")) == 0
    assert "lanes 1 |" in capsys.readouterr().out
    _assert_same(out, ref_adapters, ref_records)


def test_a_kill_during_the_state_write_leaves_the_previous_state(run_setup, tmp_path, monkeypatch):
    """os.replace is the commit point: fail it on the third state save and the second save's state still loads."""
    model, data, ref_adapters, ref_records = run_setup
    out = tmp_path / "crash"
    real_replace, calls = os.replace, {"n": 0}

    def failing_replace(src, dst):
        if str(dst).endswith(STATE_FILE):
            calls["n"] += 1
            if calls["n"] == 3:
                raise SystemExit("simulated power loss")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(SystemExit):
        main(_args(model, data, out))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not [p.name for p in out.iterdir() if p.name.startswith(f".{STATE_FILE}")]  # temp file removed
    assert main(_args(model, data, out, "--resume")) == 0
    _assert_same(out, ref_adapters, ref_records)


def test_resume_refuses_changed_settings_and_missing_state(run_setup, tmp_path, capsys):
    model, data, _, _ = run_setup
    out = tmp_path / "r"
    assert main(_args(model, data, out, "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(_args(model, data, out)) == 0
    args = _args(model, data, out, "--resume")
    args[args.index("--learning-rate") + 1] = "5e-3"
    assert main(args) == 2
    assert "learning_rate: 0.01 -> 0.005" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_gradient_stops_or_skips_naming_step_and_block(tiny_models, tmp_path, monkeypatch, policy):
    from mesp_mlx.methods.mesp import MeSP
    from mesp_mlx.run.train import train

    real = MeSP.block_backward
    state = {"calls": 0}

    def poisoned(self, block, h_in, g_out, mask, lane=0):
        g, grads = real(self, block, h_in, g_out, mask, lane)
        state["calls"] += 1
        if state["calls"] == 5:  # step 2 (3 blocks a step), block 1
            grads["mlp"]["up_proj"]["lora_b"] = grads["mlp"]["up_proj"]["lora_b"] * float("nan")
        return g, grads

    monkeypatch.setattr(MeSP, "block_backward", poisoned)
    data = write_data(tmp_path / "data")
    out = tmp_path / policy
    logs = []
    cfg = TrainConfig(model=str(tiny_models["qwen2"]), data=str(data), iters=4, save_every=1, optimizer="sgd",
                      learning_rate=0.1, adapter_path=str(out), plot=False, on_nonfinite=policy,
                      keep_activations=0, keep_attention=False, keep_dequantized=0,  # no speed probes: calls count
                      lanes=1)
    result = train(cfg, log=logs.append)
    text = "\n".join(logs)
    assert "step 2: NaN or inf in the LoRA gradient of block 1" in text
    adapters = mx.load(str(out / "adapters.safetensors"))
    assert all(mx.all(mx.isfinite(v)).item() for v in adapters.values())
    if policy == "stop":
        assert result.status == "nonfinite"
        assert [r["step"] for r in MetricsLog.read(out / "metrics.jsonl")] == [1]
    else:
        assert result.status == "done"
        assert [r["step"] for r in MetricsLog.read(out / "metrics.jsonl")] == [1, 3, 4]
