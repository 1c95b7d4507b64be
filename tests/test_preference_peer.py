"""DPO and ORPO one-step updates equal mlx-lm-lora's own trainer's (`train_dpo`, `train_orpo`, mlx-lm-lora 5.10.2 from
PyPI, installed by scripts/setup.sh) on the same 4-bit model, data and starting adapter (rel <= 1e-3)."""

import json
from importlib import metadata

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.tuner.utils import linear_to_lora_layers

from conftest import max_rel_err
from mesp_mlx.adapters.lora import DEFAULT_LORA
from mesp_mlx.cli import main

peer = pytest.importorskip("mlx_lm_lora", reason="the peer (mlx-lm-lora) is installed by scripts/setup.sh")
from mlx_lm_lora.trainer.datasets import DPODataset, ORPODataset  # noqa: E402
from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo  # noqa: E402
from mlx_lm_lora.trainer.orpo_trainer import ORPOTrainingArgs, train_orpo  # noqa: E402

PEER_VERSION = "5.10.2"
PAIRS = [
    {"prompt": "what is the capital of france?", "chosen": "paris.", "rejected": "i do not know, maybe rome."},
    {"prompt": "say hello", "chosen": "hello!", "rejected": "no."},
]
LORA = {**DEFAULT_LORA, "rank": 4, "scale": 10.0}


@pytest.fixture(scope="module")
def start(tiny_models, tmp_path_factory):
    """A starting adapter with random A and B (so the policy is not the reference) in mlx-lm's format."""
    folder = tmp_path_factory.mktemp("start")
    model, _ = load(str(tiny_models["qwen2"]))
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), LORA)
    mx.random.seed(7)
    weights = {k: 0.05 * mx.random.normal(v.shape) for k, v in tree_flatten(model.trainable_parameters())}
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    (folder / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": len(model.layers),
                                                            "lora_parameters": LORA}))
    data = folder / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return folder


def _peer_model(path, start):
    model, tokenizer = load(str(path))
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), LORA)
    model.load_weights(str(start / "adapters.safetensors"), strict=False)
    return model, tokenizer


@pytest.fixture
def cpu_device_info(monkeypatch):
    # the peer's trainers start with mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"]), a key
    # only Metal reports
    info = mx.device_info()
    monkeypatch.setattr(mx, "device_info", lambda: {**info, "max_recommended_working_set_size": 1 << 30})


def _ours(model, start, out, mode, method):
    assert main(["train", "--model", str(model), "--data", str(start / "data"), "--adapter-path", str(out),
                 "--train-mode", mode, "--beta", "0.5", "--iters", "1", "--batch-size", "2", "--optimizer", "sgd",
                 "--learning-rate", "0.1", "--method", method, "--steps-per-eval", "0", "--no-plot",
                 "--resume-adapter-file", str(start / "adapters.safetensors"), "--follow-adapter-config",
                 "--dtype", "float32"]) == 0
    return mx.load(str(out / "adapters.safetensors"))


@pytest.mark.parametrize("method", ["mesp", "mebp"])
def test_dpo_step_equals_mlx_lm_lora(tiny_models, start, tmp_path, cpu_device_info, method):
    assert metadata.version("mlx-lm-lora") == PEER_VERSION  # the pinned peer (scripts/setup.sh)
    model, tokenizer = _peer_model(tiny_models["qwen2"], start)
    reference, _ = load(str(tiny_models["qwen2"]))
    reference.freeze()
    args = DPOTrainingArgs(batch_size=2, iters=1, steps_per_eval=1000, steps_per_report=1, steps_per_save=1000,
                           adapter_file=str(tmp_path / "peer.safetensors"), max_seq_length=512, beta=0.5)
    train_dpo(model, reference, optim.SGD(learning_rate=0.1), DPODataset(PAIRS, tokenizer), None, args=args)
    theirs = dict(tree_flatten(model.trainable_parameters()))
    ours = _ours(tiny_models["qwen2"], start, tmp_path / "ours", "dpo", method)
    before = mx.load(str(start / "adapters.safetensors"))
    assert set(ours) == set(theirs)
    for k in theirs:
        assert max_rel_err(ours[k] - before[k], theirs[k] - before[k]) <= 1e-3, k


@pytest.mark.parametrize("method", ["mesp", "mebp"])
def test_orpo_step_equals_mlx_lm_lora(tiny_models, start, tmp_path, cpu_device_info, method):
    model, tokenizer = _peer_model(tiny_models["qwen2"], start)
    args = ORPOTrainingArgs(batch_size=2, iters=1, steps_per_eval=1000, steps_per_report=1, steps_per_save=1000,
                            adapter_file=str(tmp_path / "peer.safetensors"), max_seq_length=512, beta=0.5)
    train_orpo(model, optim.SGD(learning_rate=0.1), ORPODataset(PAIRS, tokenizer), None, args=args)
    theirs = dict(tree_flatten(model.trainable_parameters()))
    ours = _ours(tiny_models["qwen2"], start, tmp_path / "ours", "orpo", method)
    before = mx.load(str(start / "adapters.safetensors"))
    for k in theirs:
        assert max_rel_err(ours[k] - before[k], theirs[k] - before[k]) <= 1e-3, k
