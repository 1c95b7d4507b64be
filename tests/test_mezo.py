"""MeZO: SPSA from two streamed forward passes; exact restore; the update is the SPSA formula; deterministic."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from conftest import flat, masked_ce
from mesp_mlx.engine import BlockEngine
from mesp_mlx.methods import MeZO
from mesp_mlx.models import ModelParts
from test_engine import _batch, _prepared


def test_perturbation_restores_every_parameter_bit_exactly(tiny_models):
    model, _ = _prepared(tiny_models["qwen3"])
    before = {k: mx.array(v) for k, v in flat(model.trainable_parameters()).items()}
    stats, grads = BlockEngine(ModelParts(model), MeZO(1e-3, eps=1e-2), None).step(_batch(384), 3, apply_update=False)
    after = flat(model.trainable_parameters())
    assert all(mx.array_equal(after[k], before[k]).item() for k in before)
    assert stats.blocks_backpropagated == 0 and set(grads) == {0, 1, 2}


@pytest.mark.parametrize("samples", [1, 2])
def test_update_equals_the_spsa_formula_computed_independently(tiny_models, samples):
    lr, eps, wd, step = 1e-2, 1e-2, 0.1, 5
    model, _ = _prepared(tiny_models["qwen2"])
    batch = _batch(384)
    theta = {k: mx.array(v) for k, v in flat(model.trainable_parameters()).items()}
    mezo = MeZO(lr, eps=eps, samples=samples, weight_decay=wd, seed=4)
    BlockEngine(ModelParts(model), mezo, None).step(batch, step)
    got = flat(model.trainable_parameters())

    # independently: the whole model's forward with theta +- eps z, z from the documented generator
    ref_model, _ = _prepared(tiny_models["qwen2"])
    names = [[k for k, _ in tree_flatten(layer.trainable_parameters())] for layer in ref_model.layers]

    def z_of(k):
        return {f"model.layers.{i}.{n}": zj for i in range(len(names))
                for n, zj in zip(names[i], mezo.noise(step, k, i, [theta[f"model.layers.{i}.{n}"].shape
                                                                   for n in names[i]]))}

    expected = {k: wd * v for k, v in theta.items()}
    for k in range(samples):
        z = z_of(k)
        losses = []
        for sign in (1, -1):
            ref_model.update(tree_unflatten([(n, theta[n] + sign * eps * z[n]) for n in theta]))
            losses.append(masked_ce(ref_model, batch).item())
        p = (losses[0] - losses[1]) / (2 * eps)
        expected = {n: expected[n] + (p / samples) * z[n] for n in theta}
    for n in theta:
        delta_ref = -lr * expected[n]
        delta = got[n] - theta[n]
        assert mx.abs(delta - delta_ref).max().item() <= 2e-3 * mx.abs(delta_ref).max().item() + 1e-7, n


def test_deterministic_under_the_seed_and_forward_only_memory(tiny_models):
    batch = _batch(384)
    runs = []
    for _ in range(2):
        model, _ = _prepared(tiny_models["llama"])
        eng = BlockEngine(ModelParts(model), MeZO(1e-2, eps=1e-2, samples=2, seed=9), None)
        for step in range(3):
            stats, _ = eng.step(batch, step)
        runs.append(flat(model.trainable_parameters()))
    assert all(mx.array_equal(runs[0][k], runs[1][k]).item() for k in runs[0])
    assert set(stats.phase_peak_mb) == {"forward", "loss", "update"}  # no backward phase at all


@pytest.mark.parametrize("method", ["mezo", "lcsb"])
def test_train_cli_runs_the_family_and_resumes_it(tiny_models, tmp_path, method):
    from mesp_mlx.cli import main
    from mesp_mlx.run.metrics import MetricsLog
    from test_train_cli import write_data

    data = write_data(tmp_path / "d")
    optimizer = ["--optimizer", "adamw"] if method == "lcsb" else []  # MeZO refuses an optimizer it cannot use
    args = ["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--method", method, *optimizer,
            "--learning-rate", "1e-2", "--save-every", "2", "--no-plot", "--lcsb-schedule", "importance",
            "--zo-samples", "2", "--zo-eps", "1e-2"]
    assert main([*args, "--iters", "5", "--adapter-path", str(tmp_path / "full")]) == 0
    assert main([*args, "--iters", "3", "--adapter-path", str(tmp_path / "part")]) == 0
    assert main([*args, "--iters", "5", "--adapter-path", str(tmp_path / "part"), "--resume"]) == 0
    a = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "part" / "adapters.safetensors"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)  # schedule state and seeds resume exactly
    records = MetricsLog.read(tmp_path / "full" / "metrics.jsonl")
    assert len(records) == 5 and all(r["loss"] > 0 for r in records)
