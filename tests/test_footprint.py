"""The emulated phone is the whole process: the footprint reader (plan/footprint.py), footprint_mb per step in
metrics.jsonl, the planner's footprint prediction and --footprint-limit (flag, YAML key, profiles)."""

import ctypes
import sys

import numpy as np
import pytest
from test_train_cli import write_data

from mesp_mlx.cli import main
from mesp_mlx.plan import footprint
from mesp_mlx.plan import governor as governor_module
from mesp_mlx.plan.governor import PROFILES, FootprintExceeded, Governor
from mesp_mlx.plan.governor import resolve_footprint_limit as resolve
from mesp_mlx.run.config import ConfigError, build_config
from mesp_mlx.run.metrics import MetricsLog

linux = pytest.mark.skipif(footprint.SOURCE is None or not sys.platform.startswith("linux"),
                           reason="reads /proc/self/status")


def _train(model, data, out, *extra):
    return main(["train", "--model", str(model), "--data", str(data), "--optimizer", "sgd", "--learning-rate", "0.1",
                 "--adapter-path", str(out), "--no-plot", "--iters", "2", "--max-seq-length", "64", *extra])


@linux
def test_the_footprint_is_plausible_and_grows_with_a_touched_array():
    before = footprint.footprint_mb()
    assert 5 < before < 64 * 1024  # Python + numpy + mlx: some MB, less than any machine's RAM
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MB, every page written
    grown = footprint.footprint_mb()
    assert grown - before > 0.9 * 64, (before, grown)
    del block
    assert footprint.footprint_mb() < grown - 32  # freed: numpy's large buffers go back to the OS at once


def test_the_linux_figure_is_anonymous_rss_plus_swap():
    status = b"Name:\tpython\nVmRSS:\t  900 kB\nRssAnon:\t  300 kB\nRssFile:\t  600 kB\nVmSwap:\t  20 kB\n"
    assert footprint.linux_footprint(status) == (300 + 20) * 1024
    assert footprint.linux_footprint(b"VmRSS:\t 900 kB\n") is None  # a kernel without RssAnon: no figure


def test_the_macos_reader_takes_phys_footprint_from_task_vm_info():
    # <mach/task_info.h>: phys_footprint follows 18 64-bit fields and two 32-bit ones; TASK_VM_INFO_REV1_COUNT is 38
    assert footprint.TaskVMInfo.phys_footprint.offset == 144 and footprint.TASK_VM_INFO_REV1_COUNT == 38
    seen = {}

    def task_info(task, flavor, info, count):  # what the kernel does with the call the reader makes
        seen.update(task=task, flavor=flavor, count=count._obj.value)
        info._obj.phys_footprint, count._obj.value = 123 * 2**20, 38
        return 0

    assert footprint.phys_footprint(task_info, 7) == 123 * 2**20
    assert seen == {"task": 7, "flavor": footprint.TASK_VM_INFO, "count": 38}
    assert footprint.phys_footprint(lambda *a: 5, 7) is None  # a failed call (kern_return_t != 0)

    def old_kernel(task, flavor, info, count):
        count._obj.value = 30  # rev0 only: no phys_footprint
        return 0

    assert footprint.phys_footprint(old_kernel, 7) is None
    assert isinstance(footprint.TaskVMInfo().phys_footprint, int) and ctypes.sizeof(footprint.TaskVMInfo) == 152


def test_the_meter_keeps_each_window_peak_and_the_run_peak():
    meter = footprint.FootprintMeter()
    for mb in (100.0, 140.0, 120.0):
        meter.record(mb)
    assert meter.window == 140.0
    window = meter.take()  # with one sample now: the process's own figure where there is one
    assert window >= 140.0 and meter.window is None and meter.peak >= 140.0
    meter.record(None)  # a platform with no figure changes nothing
    assert meter.peak >= 140.0


@linux
def test_the_governor_stops_over_the_footprint_limit_and_only_then():
    governor = Governor(None, footprint_limit_mb=footprint.footprint_mb() + 4096)
    governor("forward", 0, 0, 0)  # under: nothing happens, the sample is kept
    assert governor.footprint.window is not None
    governor.close()  # no budget: MLX's limits were never touched
    with pytest.raises(FootprintExceeded, match=r"process footprint \(anonymous RSS \+ swap\) [\d.]+ MB after the "
                                                r"backward of block 2 exceeds the footprint limit of 1 MB"):
        Governor(None, footprint_limit_mb=1)("backward", 2, 0, 0)


def test_over_the_limit_the_governor_first_returns_the_free_heap_then_measures_again(monkeypatch):
    readings, released = iter([600.0, 400.0, 700.0, 650.0]), []
    monkeypatch.setattr(governor_module, "footprint_mb", lambda: next(readings))
    monkeypatch.setattr(governor_module, "release_free_heap", lambda: released.append(1))
    governor = Governor(None, footprint_limit_mb=512)
    governor("forward", 0, 0, 0)  # 600 over, 400 once glibc's free pages went back: the run goes on
    assert released == [1] and governor.footprint.window == 400.0
    with pytest.raises(FootprintExceeded, match="650.0 MB after the loss"):  # still over after the release
        governor("loss", None, 0, 0)
    assert released == [1, 1]


def test_phone_profiles_set_a_footprint_limit_equal_to_their_budget_and_macs_none():
    for name in ("iphone-17-pro", "iphone-15-pro-max", "phone-6gb-background", "phone-8gb-foreground"):
        assert PROFILES[name].footprint_limit_mb == PROFILES[name].budget_mb
    assert PROFILES["mac-16gb"].footprint_limit_mb is None and PROFILES["paper-1gb"].footprint_limit_mb is None
    if footprint.SOURCE is not None:
        assert resolve("iphone-17-pro", None) == (512, "profile iphone-17-pro (512 MB)")
        assert resolve("iphone-17-pro", 900)[0] == 900  # the flag wins over the profile
    assert resolve("mac-8gb", None)[0] is None


def test_a_footprint_limit_must_be_a_positive_number(tmp_path):
    for value in (0, -5.0, float("nan"), "lots"):
        with pytest.raises(ConfigError, match="footprint_limit|footprint-limit"):
            build_config(None, {"data": str(tmp_path), "footprint_limit": value}).validate()


@linux
def test_every_step_records_the_footprint_and_a_generous_limit_lets_the_run_finish(tiny_models, tmp_path, capsys):
    data, out = write_data(tmp_path / "d"), tmp_path / "o"
    assert _train(tiny_models["qwen2"], data, out, "--footprint-limit", "60000") == 0
    text = capsys.readouterr().out
    records = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:  # MLX's memory lives in the process: its footprint holds it and the interpreter besides
        assert r["footprint_mb"] > r["active_mb"] and r["footprint_mb"] > 20
    assert "| footprint " in text  # the progress line
    assert "predicted process footprint" in text and "within the footprint limit (--footprint-limit 60000)" in text
    assert "process footprint peak" in text and "limit 60000 MB" in text  # the end-of-run report


@linux
def test_a_limit_below_the_process_is_refused_before_step_1_and_stops_the_run_when_skipped(tiny_models, tmp_path,
                                                                                           capsys):
    data, out = write_data(tmp_path / "d"), tmp_path / "o"
    assert _train(tiny_models["qwen2"], data, out, "--footprint-limit", "2") == 2  # the planner: nothing runs
    err = capsys.readouterr().err
    assert "predicted to need a process footprint of" in err and "over the footprint limit (--footprint-limit 2)" in err
    assert "no setting of the run fits" in err and not (out / "metrics.jsonl").exists()
    # --skip-plan: the governor stops it at the first block, as the phone would end the app (exit 4)
    assert _train(tiny_models["qwen2"], data, out, "--footprint-limit", "2", "--skip-plan") == 4
    text = capsys.readouterr().out
    assert "step 0: process footprint (anonymous RSS + swap)" in text or "step 1: process footprint" in text
    assert "exceeds the footprint limit of 2 MB" in text and "stopped as the device would stop the app" in text


@linux
def test_the_yaml_key_sets_the_limit_and_plan_shows_the_prediction(tiny_models, tmp_path, capsys):
    data = write_data(tmp_path / "d")
    yml = tmp_path / "run.yaml"
    yml.write_text(f"model: {tiny_models['qwen2']}\ndata: {data}\nfootprint_limit: 3\nmax_seq_length: 64\n"
                   f"adapter_path: {tmp_path / 'o'}\n")
    assert main(["plan", "-c", str(yml)]) == 5  # `plan` says it does not fit
    text = capsys.readouterr().out
    assert "over the budget" in text and "predicted footprint" in text and "(footprint limit 3 MB: OVER)" in text
    yml.write_text(yml.read_text().replace("footprint_limit: 3", "footprint_limit: 60000"))
    assert main(["plan", "-c", str(yml)]) == 0
    text = capsys.readouterr().out
    assert "(footprint limit 60000 MB: fits)" in text and "predicted peak with them" in text
    assert "(process footprint" in text
