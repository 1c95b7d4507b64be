"""Gradient accumulation, mlx-lm's optimizers and its lr schedule in the block engine: a run saved in the middle of an
accumulation window and resumed ends bit for bit where the uninterrupted run ends, for every optimizer and for the
methods that share the engine; the learning rate of every step is in metrics.jsonl."""

import mlx.core as mx
import numpy as np
import pytest

from mesp_mlx.cli import main
from mesp_mlx.run.metrics import MetricsLog
from test_train_cli import CHAT, write_data

OPTIMIZERS = {"adam": "", "adamw": "{weight_decay: 0.05}", "sgd": "{momentum: 0.9}", "adafactor": "{beta_1: 0.9}",
              "muon": "{momentum: 0.9}"}


def _yaml(path, optimizer, method):
    config = OPTIMIZERS[optimizer]
    path.write_text(f"optimizer: {optimizer}\nmethod: {method}\nbatch_size: 2\ngrad_accumulation_steps: 3\n"
                    + (f"optimizer_config:\n  {optimizer}: {config}\n" if config else "")
                    + "lr_schedule:\n  name: cosine_decay\n  arguments: [1e-2, 3]\n  warmup: 1\n  warmup_init: 1e-3\n"
                    "lora_parameters:\n  rank: 4\n  dropout: 0.1\nsteps_per_eval: 0\nplot: false\nseed: 3\n")
    return path


@pytest.mark.parametrize("optimizer,method", [(o, "mesp") for o in OPTIMIZERS] + [("adamw", "mebp"), ("adam", "lcsb")])
def test_resume_mid_accumulation_is_bit_exact(tiny_models, tmp_path, optimizer, method):
    data = write_data(tmp_path / "data", records=CHAT * 2)  # 3 batches an epoch
    cfg = _yaml(tmp_path / "run.yaml", optimizer, method)
    base = ["train", "-c", str(cfg), "--model", str(tiny_models["qwen3"]), "--data", str(data)]
    assert main([*base, "--iters", "8", "--adapter-path", str(tmp_path / "full")]) == 0
    assert main([*base, "--iters", "4", "--adapter-path", str(tmp_path / "part")]) == 0  # stops 1 into a window
    assert main([*base, "--iters", "8", "--adapter-path", str(tmp_path / "part"), "--resume"]) == 0
    a = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "part" / "adapters.safetensors"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    full = MetricsLog.read(tmp_path / "full" / "metrics.jsonl")
    part = MetricsLog.read(tmp_path / "part" / "metrics.jsonl")
    np.testing.assert_array_equal([r["loss"] for r in full], [r["loss"] for r in part])
    # one learning rate per optimizer step (3 micro-batches each): warmup from 1e-3, then the cosine
    from mlx_lm.tuner.utils import build_schedule

    sched = build_schedule({"name": "cosine_decay", "arguments": [1e-2, 3], "warmup": 1, "warmup_init": 1e-3})
    expect = [sched(mx.array((s - 1) // 3, mx.uint64)).item() for s in range(1, 9)]
    assert [r["learning_rate"] for r in full] == pytest.approx(expect, rel=1e-6)
    s0 = mx.load(str(tmp_path / "part" / "adapters.safetensors"))
    assert any(k.endswith("lora_b") and mx.abs(s0[k]).max().item() > 0 for k in s0)


def test_accumulation_equals_one_big_batch_with_sgd(tiny_models, tmp_path):
    """SGD on the mean of 2 micro-batch gradients of equal token counts == the mean of those gradients: the same
    adapter as mlx-lm's rule computed by hand (sum, divide by N, one update)."""
    from mlx.utils import tree_flatten, tree_map, tree_unflatten

    from mesp_mlx.run.config import TrainConfig
    from mesp_mlx.engine import Batch, BlockEngine
    from mesp_mlx.methods import MeSP
    from mesp_mlx.run.optimizers import make_optimizer
    from mesp_mlx.run.prepare import prepare_model

    cfg = TrainConfig(model=str(tiny_models["qwen2"]), data="x", optimizer="sgd", learning_rate=0.1)
    batches = [Batch(mx.array([[1, 5, 9, 33, 70, 2]]), mx.array([[5, 9, 33, 70, 2, 8]]), mx.ones((1, 6))),
               Batch(mx.array([[7, 3, 3, 40, 11, 2]]), mx.array([[3, 3, 40, 11, 2, 9]]), mx.ones((1, 6)))]
    runs = []
    for accumulate in (True, False):
        prep = prepare_model(cfg)
        from conftest import randomize_lora

        randomize_lora(prep.model, seed=1)
        engine = BlockEngine(prep.parts, MeSP(), [make_optimizer(cfg) for _ in prep.parts.layers],
                             accumulation=2 if accumulate else 1)
        if accumulate:
            for step, b in enumerate(batches, 1):
                engine.step(b, step)
            assert not engine.accum  # the buffers are freed after the update
        else:  # by hand: gradients of both micro-batches, summed, / 2, one SGD step
            grads = [engine.step(b, 0, apply_update=False)[1] for b in batches]
            for i, layer in enumerate(prep.parts.layers):
                g = dict(tree_flatten(tree_map(lambda x, y: (x + y) / 2, grads[1][i], grads[0][i])))
                layer.update(tree_unflatten([(k, v - 0.1 * g[k]) for k, v in
                                             tree_flatten(layer.trainable_parameters())]))
        runs.append(dict(tree_flatten(prep.model.trainable_parameters())))
    for k in runs[0]:
        assert mx.allclose(runs[0][k], runs[1][k], rtol=1e-5, atol=1e-7).item(), k


def test_planner_counts_the_accumulation_buffers(tiny_models):
    from mesp_mlx.run.config import TrainConfig
    from mesp_mlx.run.prepare import predict_lean

    one = predict_lean(TrainConfig(model=str(tiny_models["qwen2"]), data="x", optimizer="sgd"))
    four = predict_lean(TrainConfig(model=str(tiny_models["qwen2"]), data="x", optimizer="sgd", grad_accumulation_steps=4))
    assert one.components_mb["optimizer"] == 0.0
    assert four.components_mb["optimizer"] == pytest.approx(four.components_mb["LoRA"])  # one LoRA-sized buffer


def test_mezo_follows_the_lr_schedule(tiny_models, tmp_path):
    data = write_data(tmp_path / "data")
    yml = tmp_path / "mezo.yaml"
    yml.write_text("method: mezo\nlr_schedule:\n  name: linear_schedule\n  arguments: [1e-3, 0.0, 4]\n")
    out = tmp_path / "out"
    assert main(["train", "-c", str(yml), "--model", str(tiny_models["qwen2"]), "--data", str(data), "--iters", "4",
                 "--adapter-path", str(out), "--no-plot"]) == 0
    assert [r["learning_rate"] for r in MetricsLog.read(out / "metrics.jsonl")] == pytest.approx(
        [1e-3, 7.5e-4, 5e-4, 2.5e-4])
