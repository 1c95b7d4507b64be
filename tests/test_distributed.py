"""Data-parallel training over mx.distributed (ring backend, 2 ranks on localhost): the same adapter as one process
running the whole batch, a dead rank ends the others with a clear error, a distributed run resumes.

Every launch is bounded by a timeout (mlx#4475: intermittent ring hangs on CPU streams)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import mlx.core as mx
import pytest

from mesp_mlx.cli import main
from mesp_mlx.distributed import localhost_hostfile
from mesp_mlx.run.metrics import MetricsLog
from test_train_cli import CHAT, write_data

pytestmark = pytest.mark.skipif(not mx.distributed.is_available(), reason="this MLX build has no distributed backend")
TIMEOUT = 180


def launch(args, tmp_path, world=2):
    """Start `mesp-mlx <args>` on `world` ranks of a ring on localhost (what mlx.launch -n world does)."""
    hostfile = localhost_hostfile(tmp_path / f"hosts-{time.monotonic_ns()}.json", world)
    procs = []
    for rank in range(world):
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile), "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "mesp_mlx.cli", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=TIMEOUT):
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def _args(model, data, out, method, iters, *extra):
    # SGD: the adapter is then a plain function of the gradients, so it shows their exactness. (Adam's m / sqrt(v)
    # turns the float rounding of a near-zero gradient element into a full +-lr step in either process alike.)
    return ["train", "--model", str(model), "--data", str(data), "--adapter-path", str(out), "--method", method,
            "--iters", str(iters), "--batch-size", "4", "--optimizer", "sgd", "--learning-rate", "0.5",
            "--steps-per-eval", "2", "--val-batches", "-1", "--no-plot", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = write_data(tmp_path_factory.mktemp("dist") / "data", records=CHAT * 3)
    (folder / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in CHAT[:3]) + "\n")
    return folder


def _max_rel(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((mx.abs(a[k] - b[k]).max() / (mx.abs(b[k]).max() + 1e-30)).item() for k in a)


# MeZO divides loss differences by 2 eps: exact only because the engine sums per-token losses in float64 (loss.py),
# and only up to the fp32 rounding of each row's logits, which a batch split changes (other GEMM shapes, on AVX-512
# OpenBLAS other kernels): at eps 1e-3 the 1/(2 eps) amplification left the adapters 2.1e-5 apart, at 1e-2 1.6e-6
METHOD_ARGS = {"mesp": [], "mebp": [], "lcsb": ["--lcsb-fraction", "0.5"],
               "mezo": ["--zo-eps", "1e-2", "--learning-rate", "1e-3"],
               "mesp-accumulated": ["--grad-accumulation-steps", "2"]}


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_two_ranks_end_with_the_adapter_of_one_process_with_the_whole_batch(tiny_models, tmp_path, data, method):
    model, extra, method = tiny_models["qwen2"], METHOD_ARGS[method], method.split("-")[0]
    one = tmp_path / "one"
    assert main(_args(model, data, one, method, 4, *extra)) == 0
    two = tmp_path / "two"
    results = finish(launch(_args(model, data, two, method, 4, *extra), tmp_path))
    assert [r[0] for r in results] == [0, 0], results
    ref, got = mx.load(str(one / "adapters.safetensors")), mx.load(str(two / "adapters.safetensors"))
    assert _max_rel(got, ref) <= 1e-5
    r1, r2 = MetricsLog.read(one / "metrics.jsonl"), MetricsLog.read(two / "metrics.jsonl")
    assert [r["tokens"] for r in r2] == [r["tokens"] for r in r1]  # the global token count
    assert all(abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]) for a, b in zip(r2, r1))
    assert all(abs(a["val_loss"] - b["val_loss"]) <= 1e-5 * b["val_loss"] for a, b in zip(r2, r1) if "val_loss" in b)
    assert all(r["world_size"] == 2 and r["comm_mb"] > 0 for r in r2)
    assert not (tmp_path / "two" / "rank1").exists() and results[1][1] == ""  # rank 1 writes and prints nothing


def test_a_distributed_run_resumes_to_the_adapter_of_an_uninterrupted_one(tiny_models, tmp_path, data):
    model = tiny_models["qwen2"]
    ref = tmp_path / "ref"
    assert main(_args(model, data, ref, "mesp", 6)) == 0
    out = tmp_path / "two"
    assert [r[0] for r in finish(launch(_args(model, data, out, "mesp", 3), tmp_path))] == [0, 0]
    results = finish(launch(_args(model, data, out, "mesp", 6, "--resume"), tmp_path))
    assert [r[0] for r in results] == [0, 0], results
    assert "resuming" in results[0][1]
    assert _max_rel(mx.load(str(out / "adapters.safetensors")), mx.load(str(ref / "adapters.safetensors"))) <= 1e-5
    assert [r["step"] for r in MetricsLog.read(out / "metrics.jsonl")] == list(range(1, 7))


def test_a_rank_that_dies_ends_the_others_with_a_clear_error(tiny_models, tmp_path, data):
    out = tmp_path / "dies"
    procs = launch(_args(tiny_models["qwen2"], data, out, "mesp", 100000, "--save-every", "2"), tmp_path)
    start = time.time()
    while not ((out / "metrics.jsonl").exists() and len(MetricsLog.read(out / "metrics.jsonl")) >= 3):
        assert time.time() - start < TIMEOUT and procs[0].poll() is None, finish(procs, 5)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    (code0, _, err0), (code1, _, _) = finish(procs, timeout=60)
    assert code1 == -signal.SIGKILL
    assert code0 == 76, err0
    assert "lost the connection to another rank" in err0 and "Traceback" not in err0
    assert (out / "training_state.safetensors").exists()  # the last saved state is kept for --resume


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(tiny_models, tmp_path, data):
    args = _args(tiny_models["qwen2"], data, tmp_path / "odd", "mesp", 2)
    args[args.index("--batch-size") + 1] = "3"
    results = finish(launch(args, tmp_path))
    assert [r[0] for r in results] == [2, 2]
    assert "not divisible by the 2 ranks" in results[0][2]


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_and_rank_0_saves(tiny_models, tmp_path, data):
    model = tiny_models["qwen2"]
    ref = tmp_path / "ref"
    assert main(_args(model, data, ref, "mesp", 12)) == 0
    out = tmp_path / "two"
    procs = launch(_args(model, data, out, "mesp", 12, "--save-every", "100"), tmp_path)
    start = time.time()
    while not ((out / "metrics.jsonl").exists() and len(MetricsLog.read(out / "metrics.jsonl")) >= 2):
        assert time.time() - start < TIMEOUT and procs[0].poll() is None, finish(procs, 5)
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)  # the other rank never sees a signal
    results = finish(procs)
    assert [r[0] for r in results] == [143, 143], results
    saved = len(MetricsLog.read(out / "metrics.jsonl"))
    assert 2 <= saved < 12 and "state saved" in results[0][1]
    results = finish(launch(_args(model, data, out, "mesp", 12, "--save-every", "100", "--resume"), tmp_path))
    assert [r[0] for r in results] == [0, 0], results
    assert _max_rel(mx.load(str(out / "adapters.safetensors")), mx.load(str(ref / "adapters.safetensors"))) <= 1e-5


def test_a_rank_that_hangs_ends_the_others_after_the_collective_timeout(tiny_models, tmp_path, data, monkeypatch):
    monkeypatch.setenv("MESP_MLX_COLLECTIVE_TIMEOUT", "3")
    out = tmp_path / "hangs"
    procs = launch(_args(tiny_models["qwen2"], data, out, "mesp", 100000), tmp_path)
    try:
        start = time.time()
        while not ((out / "metrics.jsonl").exists() and len(MetricsLog.read(out / "metrics.jsonl")) >= 2):
            assert time.time() - start < TIMEOUT and procs[0].poll() is None, finish(procs, 5)
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGSTOP)  # alive, connected, silent: what a hung ring looks like
        stopped = time.time()
        code0 = procs[0].wait(timeout=60)
        assert code0 == 76 and time.time() - stopped < 30
        assert "no answer from the other ranks for 3 s" in procs[0].stderr.read()
    finally:
        procs[1].send_signal(signal.SIGKILL)
        finish(procs, 10)


def test_a_budget_is_each_ranks_and_the_plan_is_made_for_its_share(tiny_models, tmp_path, data):
    out = tmp_path / "budget"
    results = finish(launch(_args(tiny_models["qwen2"], data, out, "mesp", 2, "--device-profile", "iphone-17-pro"),
                            tmp_path))
    assert [r[0] for r in results] == [0, 0], results
    plan = re.search(r"plan: predicted peak ([\d.]+) MB within profile iphone-17-pro", results[0][1])
    assert plan and "memory: budget 512 MB" in results[0][1]  # the plan, and the governor's report (rank 0's)
    assert all(r["peak_mb"] < 512 for r in MetricsLog.read(out / "metrics.jsonl"))
    # the plan is the one of a single process holding the rank's share (batch 4 / 2 ranks), not the whole batch's
    def planned(batch):
        proc = subprocess.run([sys.executable, "-m", "mesp_mlx.cli", "plan", "--model", str(tiny_models["qwen2"]),
                               "--data", str(data), "--batch-size", str(batch), "--device-profile", "iphone-17-pro"],
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr
        return float(re.search(r"predicted peak\s+([\d.]+) MB", proc.stdout).group(1))

    share, whole = planned(2), planned(4)
    assert abs(float(plan.group(1)) - share) <= 0.02 * share < abs(float(plan.group(1)) - whole), (plan.group(1),
                                                                                                   share, whole)


@pytest.mark.parametrize("mode", ["dpo", "grpo"])
def test_objectives_on_two_ranks(tiny_models, tmp_path, mode):
    """DPO on two ranks (one pair each) ends with the adapter of one process with both pairs; GRPO (each rank samples
    its prompts' groups) trains on two ranks to the end with the same global figures on both."""
    from test_grpo import _write_prompts
    from test_preference import _write_pairs

    model = tiny_models["qwen2"]
    common = ["--iters", "3", "--batch-size", "2", "--optimizer", "sgd", "--learning-rate", "0.5", "--no-plot",
              "--seed", "3", "--train-mode", mode, "--steps-per-eval", "0"]
    if mode == "dpo":
        data = _write_pairs(tmp_path / "pairs")
    else:
        data = _write_prompts(tmp_path / "prompts")
        common += ["--group-size", "2", "--max-completion-length", "4", "--reward-functions", "length:2"]
    base = ["train", "--model", str(model), "--data", str(data)]
    two = tmp_path / "two"
    results = finish(launch([*base, "--adapter-path", str(two), *common], tmp_path))
    assert [r[0] for r in results] == [0, 0], results
    records = MetricsLog.read(two / "metrics.jsonl")
    assert len(records) == 3 and all(r["world_size"] == 2 and r["comm_mb"] > 0 for r in records)
    if mode == "grpo":
        return
    one = tmp_path / "one"
    assert main([*base, "--adapter-path", str(one), *common]) == 0
    ref, got = mx.load(str(one / "adapters.safetensors")), mx.load(str(two / "adapters.safetensors"))
    assert _max_rel(got, ref) <= 1e-5
    r1 = MetricsLog.read(one / "metrics.jsonl")
    assert all(abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]) for a, b in zip(records, r1))
    assert all(abs(a["reward_margin"] - b["reward_margin"]) <= 1e-5 * max(abs(b["reward_margin"]), 1e-3)
               for a, b in zip(records, r1))
