"""End-to-end `mesp-mlx train` on tiny models: adapters in mlx-lm's format, metrics contract, resume, mlx-lm parity."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_same_adapter
from mesp_mlx.cli import main
from mesp_mlx.run.metrics import MetricsLog

CHAT = [
    {"messages": [{"role": "user", "content": "hello, how are you today?"},
                  {"role": "assistant", "content": "i am fine, thank you."}]},
    {"messages": [{"role": "user", "content": "what is the capital of france?"},
                  {"role": "assistant", "content": "paris is the capital of france."}]},
    {"messages": [{"role": "user", "content": "the quick brown fox"},
                  {"role": "assistant", "content": "jumps over the lazy dog."}]},
]


def write_data(folder: Path, records=CHAT, valid=True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")
    if valid:
        with open(folder / "valid.jsonl", "w") as f:
            f.write(json.dumps(records[0]) + "\n")
    return folder


def test_train_writes_mlx_lm_adapters_and_metrics(tiny_models, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "adapters"
    rc = main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "4", "--batch-size", "2",
               "--learning-rate", "1e-2", "--adapter-path", str(out), "--save-every", "2", "--mask-prompt",
               "--optimizer", "adamw"])
    assert rc == 0
    assert (out / "adapters.safetensors").is_file() and (out / "metrics.png").is_file()
    assert (out / "0000002_adapters.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 3 and cfg["lora_parameters"]["rank"] == 8
    records = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"step", "loss", "tokens", "step_s", "peak_mb", "active_mb"} <= set(r)
        assert r["peak_mb"] > 0 and r["tokens"] > 0
    assert records[-1]["loss"] < records[0]["loss"]
    # no temp files left behind by the atomic writes
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    # mlx-lm loads the adapter as it is, and gives the same logits as our LoRA model
    from mlx_lm import load

    model, _ = load(str(tiny_models["qwen2"]), adapter_path=str(out))
    weights = mx.load(str(out / "adapters.safetensors"))
    assert any(k.endswith("lora_b") and mx.abs(v).max().item() > 0 for k, v in weights.items())
    from mesp_mlx.adapters.lora import apply_lora, load_adapter_weights
    from mesp_mlx.models import load_model

    ours = load_model(str(tiny_models["qwen2"])).model
    apply_lora(ours, -1, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    load_adapter_weights(ours, out / "adapters.safetensors")
    x = mx.array([[1, 5, 9, 33, 70]])
    assert mx.allclose(model(x), ours(x), atol=1e-5).item()


def test_resume_adapter_from_another_model_is_refused(tiny_models, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "a"
    assert main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "1",
                 "--adapter-path", str(out), "--no-plot"]) == 0
    # same model: resumes
    assert main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "1",
                 "--adapter-path", str(tmp_path / "b"), "--resume-adapter-file", str(out / "adapters.safetensors"),
                 "--no-plot"]) == 0
    # llama tiny has another MLP width: refused, naming a tensor
    rc = main(["train", "--model", str(tiny_models["llama"]), "--data", str(data), "--iters", "1",
               "--adapter-path", str(tmp_path / "c"), "--resume-adapter-file", str(out / "adapters.safetensors")])
    assert rc == 2


def test_yaml_config_with_mlx_lm_keys(tiny_models, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    yml = tmp_path / "run.yaml"
    yml.write_text(f"model: {tiny_models['llama']}\ndata: {data}\niters: 2\nbatch_size: 1\nlearning_rate: 1e-3\n"
                   f"optimizer: sgd\nlora_parameters:\n  rank: 4\n  scale: 10.0\n  keys: [q, v]\n"
                   f"adapter_path: {tmp_path / 'out'}\nsteps_per_eval: 50\nplot: false\n")
    assert main(["train", "-c", str(yml), "--iters", "3"]) == 0
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["iters"] == 3 and cfg["lora_parameters"]["rank"] == 4
    assert cfg["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    w = mx.load(str(tmp_path / "out" / "adapters.safetensors"))
    assert all(".q_proj." in k or ".v_proj." in k for k in w) and len(w) == 3 * 2 * 2


def test_stream_weights_and_mmap_run_the_same_losses(tiny_models, tmp_path):
    data = write_data(tmp_path / "data")
    losses = []
    for i, extra in enumerate([[], ["--stream-weights", "--checkpoint-storage", "mmap",
                                    "--checkpoint-dir", str(tmp_path / "ck")]]):
        out = tmp_path / f"o{i}"
        assert main(["train", "--model", str(tiny_models["qwen3"]), "--data", str(data), "--iters", "3",
                     "--optimizer", "sgd", "--learning-rate", "0.1", "--adapter-path", str(out), "--no-plot",
                     *extra]) == 0
        losses.append([r["loss"] for r in MetricsLog.read(out / "metrics.jsonl")])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    assert not list((tmp_path / "ck").glob("*"))  # checkpoint files are removed


def test_one_sgd_step_matches_mlx_lm_lora(tiny_models, tmp_path):
    """Acceptance: from the same adapter, one SGD step equals `python -m mlx_lm lora` (rel diff <= 1e-3), 4-bit Qwen2."""
    data = write_data(tmp_path / "data", records=CHAT[:1])
    start = tmp_path / "start"
    assert main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "2",
                 "--learning-rate", "1e-2", "--adapter-path", str(start), "--no-plot"]) == 0  # non-zero B
    common = ["--data", str(data), "--iters", "1", "--batch-size", "1", "--learning-rate", "0.5",
              "--optimizer", "sgd", "--num-layers", "3", "--max-seq-length", "512",
              "--resume-adapter-file", str(start / "adapters.safetensors")]
    theirs = tmp_path / "theirs"
    cfg = tmp_path / "lora.yaml"
    cfg.write_text("lora_parameters:\n  rank: 8\n  scale: 20.0\n  dropout: 0.0\n"
                   "  keys: [self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj, "
                   "mlp.gate_proj, mlp.up_proj, mlp.down_proj]\n")
    env = {k: v for k, v in os.environ.items()}
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "lora", "--train", "--model", str(tiny_models["qwen2"]),
                           "-c", str(cfg), "--adapter-path", str(theirs), "--steps-per-eval", "1000",
                           "--val-batches", "1", *common], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = tmp_path / "ours"
    assert main(["train", "--model", str(tiny_models["qwen2"]), "--method", "mebp", "--adapter-path", str(ours),
                 "--no-plot", *common]) == 0
    assert_same_adapter(ours / "adapters.safetensors", theirs / "adapters.safetensors", start / "adapters.safetensors")


@pytest.mark.slow
def test_mesp_and_mebp_train_the_real_smollm2_identically(smollm2, tmp_path):
    """20 SGD steps of MeSP and of MeBP on the real SmolLM2 (30 Llama blocks, 4-bit) with one seed: same losses."""
    from mesp_mlx.data.corpora import chatterbot_pairs, write_chat_jsonl

    data = tmp_path / "data"
    write_chat_jsonl(chatterbot_pairs(["botprofile"])[:40], data)
    losses = {}
    for method in ("mesp", "mebp"):
        out = tmp_path / method
        assert main(["train", "--model", str(smollm2), "--data", str(data), "--method", method, "--iters", "20",
                     "--batch-size", "1", "--optimizer", "sgd", "--learning-rate", "1e-3", "--max-seq-length", "48",
                     "--seed", "3", "--adapter-path", str(out), "--no-plot"]) == 0
        losses[method] = np.array([r["loss"] for r in MetricsLog.read(out / "metrics.jsonl")])
    assert losses["mesp"][-1] < losses["mesp"][0] - 0.1  # it learns: the comparison is not between two no-ops
    np.testing.assert_allclose(losses["mesp"], losses["mebp"], rtol=0, atol=1e-5)


def test_validation_and_test_loss_match_mlx_lm_evaluate(tiny_models, tmp_path, capsys):
    """Held-out loss before the first step, every --steps-per-eval steps and after the last, and --test at the end:
    each equals mlx-lm's own evaluate() of the model with the adapters saved at that point."""
    from mlx_lm import load
    from mlx_lm.tuner.trainer import evaluate

    from mesp_mlx.data.datasets import load_splits

    data = write_data(tmp_path / "data", CHAT + CHAT[:2])
    with open(data / "valid.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in CHAT[1:]) + "\n")
    with open(data / "test.jsonl", "w") as f:
        f.write(json.dumps(CHAT[2]) + "\n")
    out = tmp_path / "adapters"
    rc = main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "5", "--batch-size", "1",
               "--learning-rate", "1e-2", "--optimizer", "adamw", "--adapter-path", str(out), "--steps-per-eval", "2",
               "--val-batches", "-1", "--test", "--no-plot", "--mask-prompt"])
    assert rc == 0
    records = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 5]
    assert "val_loss_at_start" in records[0]

    model, tokenizer = load(str(tiny_models["qwen2"]))
    splits = load_splits(data, tokenizer, mask_prompt=True)
    base = evaluate(model, splits["valid"], 1, -1, max_seq_length=2048)
    model, _ = load(str(tiny_models["qwen2"]), adapter_path=str(out))
    final = evaluate(model, splits["valid"], 1, -1, max_seq_length=2048)
    test = evaluate(model, splits["test"], 1, -1, max_seq_length=2048)
    assert records[0]["val_loss_at_start"] == pytest.approx(base, rel=1e-5)
    assert records[-1]["val_loss"] == pytest.approx(final, rel=1e-5)
    assert records[-1]["val_loss"] < records[0]["val_loss_at_start"]
    printed = capsys.readouterr().out
    assert f"test loss {test:.4f}" in printed and "step 0: val loss" in printed

    # --steps-per-eval 0: no evaluation at all; --test without test.jsonl: a warning, not a failure
    (data / "test.jsonl").unlink()
    assert main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "2", "--adapter-path",
                 str(tmp_path / "b"), "--steps-per-eval", "0", "--test", "--no-plot"]) == 0
    assert not any("val_loss" in r for r in MetricsLog.read(tmp_path / "b" / "metrics.jsonl"))
    assert "no test.jsonl" in capsys.readouterr().out
    assert main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "2", "--adapter-path",
                 str(tmp_path / "c"), "--val-batches", "0"]) == 2


def test_test_evaluation_over_budget_stops_cleanly(tiny_models, tmp_path, monkeypatch, capsys):
    """A --test evaluation that the governor stops ends the run with exit 4 and a message, the adapters saved."""
    import mesp_mlx.run.heldout as heldout_module
    from mesp_mlx.plan.governor import BudgetExceeded

    def over(*args, **kwargs):
        raise BudgetExceeded("forward", 1, 900 * 2**20, 512)

    data = write_data(tmp_path / "data")
    (data / "test.jsonl").write_text(json.dumps(CHAT[2]) + "\n")
    monkeypatch.setattr(heldout_module, "evaluate", over)
    out = tmp_path / "a"
    rc = main(["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "2", "--adapter-path",
               str(out), "--steps-per-eval", "0", "--test", "--no-plot"])
    assert rc == 4
    assert (out / "adapters.safetensors").is_file()
    assert "--test: MLX peak 900.0 MB in the forward of block 1" in capsys.readouterr().out
