"""Memory budgets: profiles, the per-block check that stops a run over budget, and the emulation report."""

import mlx.core as mx
from mlx_lm import load as mlx_lm_load

from mesp_mlx.cli import main
from mesp_mlx.governor import PROFILES
from mesp_mlx.metrics import MetricsLog
from test_train_cli import write_data


def _train(model, data, out, *extra):
    return main(["train", "--model", str(model), "--data", str(data), "--optimizer", "sgd", "--learning-rate", "0.1",
                 "--save-every", "1", "--adapter-path", str(out), "--no-plot", *extra])


def test_profiles_are_listed_with_their_provenance(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PROFILES) and "arXiv 2510.03425" in out and "assumption" in out


def test_a_run_within_its_budget_reports_headroom(tiny_models, tmp_path, capsys):
    before = mx.set_memory_limit(1 << 40)  # the setter returns the current limit: read it, then put it back
    mx.set_memory_limit(before)
    assert _train(tiny_models["qwen2"], write_data(tmp_path / "d"), tmp_path / "o", "--iters", "2",
                  "--device-profile", "iphone-17-pro") == 0
    out = capsys.readouterr().out
    assert "budget 512 MB (profile iphone-17-pro" in out and "headroom" in out and "process max RSS" in out
    assert mx.set_memory_limit(before) == before  # the process-wide limit is given back


def test_a_run_over_budget_stops_naming_phase_and_block_and_leaves_a_valid_adapter(tiny_models, tmp_path, capsys):
    data, out = write_data(tmp_path / "d"), tmp_path / "o"
    assert _train(tiny_models["qwen2"], data, out, "--iters", "2") == 0
    saved = mx.load(str(out / "adapters.safetensors"))
    # the same run continued on a device with 0.2 MB: step 3 goes over in its first block and stops there
    rc = _train(tiny_models["qwen2"], data, out, "--iters", "4", "--resume", "--budget-mb", "0.2")
    text = capsys.readouterr().out
    assert rc == 4
    assert "step 3: MLX peak" in text and "in the forward of block 0 exceeds the budget of 0.2 MB" in text
    assert [r["step"] for r in MetricsLog.read(out / "metrics.jsonl")] == [1, 2]
    kept = mx.load(str(out / "adapters.safetensors"))
    assert all(mx.array_equal(kept[k], saved[k]).item() for k in saved)  # the last good adapter, untouched
    mlx_lm_load(str(tiny_models["qwen2"]), adapter_path=str(out))  # and it loads in mlx-lm
    assert _train(tiny_models["qwen2"], data, out, "--iters", "4", "--resume") == 0  # resumable with room
