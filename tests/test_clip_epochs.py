"""SFT's objective grown past mlx-lm: global-norm gradient clipping over every block (equal to autodiff of the whole
model, clipped as torch's clip_grad_norm_), and --epochs."""

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest

from conftest import flat, masked_ce, max_rel_err
from mesp_mlx.engine import BlockEngine
from mesp_mlx.methods import make_method
from mesp_mlx.methods.mesp import to_mesp_lora
from mesp_mlx.models import ModelParts
from test_engine import _batch, _prepared


@pytest.mark.parametrize("method", ["mebp", "mesp"])
@pytest.mark.parametrize("max_norm", [1e-3, 1e6])  # clipping active; a bound never reached
def test_global_norm_clipping_equals_whole_model_autodiff(tiny_models, method, max_norm):
    model, _ = _prepared(tiny_models["qwen2"])
    if method == "mesp":
        to_mesp_lora(model)
    batch = _batch(384)
    before = {k: mx.array(v) for k, v in flat(model.trainable_parameters()).items()}
    _, ref = nn.value_and_grad(model, masked_ce)(model, batch)
    ref = flat(ref)
    norm = math.sqrt(sum(mx.sum(g * g).item() for g in ref.values()))
    scale = min(1.0, max_norm / (norm + 1e-6))
    lr = 0.5 / scale  # an update as large as the gradient: (after - before) keeps fp32's precision
    engine = BlockEngine(ModelParts(model), make_method(method), [optim.SGD(learning_rate=lr) for _ in model.layers],
                         max_grad_norm=max_norm)
    stats, _ = engine.step(batch, 1)
    assert abs(stats.extra["grad_norm"] - norm) <= 1e-5 * norm
    after = flat(model.trainable_parameters())
    for k, g in ref.items():
        assert max_rel_err(after[k] - before[k], -lr * scale * g) <= 1e-5, k


def test_epochs_set_the_iterations_from_the_data(tiny_models, tmp_path, capsys):
    from mesp_mlx.cli import main
    from mesp_mlx.run.metrics import MetricsLog
    from test_train_cli import CHAT, write_data

    data = write_data(tmp_path / "d", records=CHAT * 2)  # 6 examples: 3 batches of 2 an epoch
    out = tmp_path / "o"
    assert main(["train", "--model", str(tiny_models["llama"]), "--data", str(data), "--adapter-path", str(out),
                 "--batch-size", "2", "--epochs", "2", "--no-plot", "--max-grad-norm", "1.0"]) == 0
    assert "--epochs 2: 6 iterations (3 batches per epoch)" in capsys.readouterr().out
    records = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7)) and all("grad_norm" in r for r in records)


def test_planner_counts_the_gradients_held_for_the_global_norm(tiny_models):
    from mesp_mlx.run.config import TrainConfig
    from mesp_mlx.run.prepare import predict_lean

    plain = predict_lean(TrainConfig(model=str(tiny_models["qwen2"]), data="x", optimizer="sgd"))
    clipped = predict_lean(TrainConfig(model=str(tiny_models["qwen2"]), data="x", optimizer="sgd", max_grad_norm=1.0))
    assert plain.components_mb["optimizer"] == 0.0
    assert clipped.components_mb["optimizer"] == pytest.approx(clipped.components_mb["LoRA"])  # every block's held
