"""Speed levers and the plan that picks them: results bit-identical across plans, slices bit-identical to whole
products, the compiled exp, the search, and `mesp-mlx plan --sweep`."""
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import flat
from mesp_mlx.engine import fastmath
from mesp_mlx.cli import main
from mesp_mlx.engine import Batch, BlockEngine
from mesp_mlx.adapters.lora import apply_lora
from mesp_mlx.methods.mesp import to_mesp_lora
from mesp_mlx.methods.mesp_lora import lean_matmul
from mesp_mlx.methods import LCSB, MeSP
from mesp_mlx.models import ModelParts, cast_float_params, load_model, set_compute_path
from mesp_mlx.models.families import family_lora_parameters
from mesp_mlx.models.compute import dequantized_weight, keep_dequantized, keep_dequantized_blocks
from mesp_mlx.run.optimizers import make_optimizer
from mesp_mlx.plan.speed import LeverCosts, Levers, fastest
from test_train_cli import write_data


def _model(path, dropout=0.0):
    mx.random.seed(0)  # the same LoRA initialisation for every plan
    model = load_model(str(path)).model
    set_compute_path(model, "dequant")
    cast_float_params(model, "float32")
    apply_lora(model, -1, family_lora_parameters(model, {"rank": 4, "scale": 20.0, "dropout": dropout}))
    to_mesp_lora(model)
    mx.eval(model.parameters())
    return model


def _batches(vocab, n=3):
    out = []
    for s in range(n):
        mx.random.seed(10 + s)
        tokens = mx.random.randint(0, vocab, (2, 40))  # longer than the tiny models' sliding window
        out.append(Batch.from_mlx_lm(tokens, mx.array([[3, 40], [0, 31]])))
    return out


def _train(path, keep_activations, keep_attention, keep_dequantized, method="mesp", dropout=0.0, lanes=1,
           storage="memory", tmp=None):
    """Three AdamW steps; returns (losses, final adapter as numpy)."""
    model = _model(path, dropout)
    model.train()
    parts = ModelParts(model)
    if keep_dequantized:
        keep_dequantized_blocks(parts.layers, keep_dequantized)
    rule = MeSP(keep_attention=keep_attention)
    chosen = rule if method == "mesp" else LCSB(0.5, inner=rule)
    opts = [make_optimizer(_Cfg()) for _ in parts.layers]
    engine = BlockEngine(parts, chosen, opts, checkpoint_storage=storage, checkpoint_dir=tmp,
                         keep_activations=keep_activations, lanes=lanes)
    losses = [engine.step(b, s + 1)[0].loss for s, b in enumerate(_batches(parts.vocab_size))]
    return losses, {k: np.array(v) for k, v in flat(model.trainable_parameters()).items()}


class _Cfg:
    optimizer, learning_rate, optimizer_config = "adamw", 1e-3, {}


@pytest.fixture(scope="module")
def plan_models(tmp_path_factory):
    """Tiny random 4-bit models of three block layouts: Llama, Gemma 3 (sliding window, four norms, GELU) and Phi-3
    (fused projections)."""
    from mesp_mlx.models.families.tiny import tiny_config
    from mesp_mlx.models.synthetic import write_random_model

    root = tmp_path_factory.mktemp("plan_models")
    return {name: write_random_model(root / name, tiny_config(name), bits=4, group_size=32, seed=3)
            for name in ("llama", "gemma3_text", "phi3")}


@pytest.mark.parametrize("dropout,lanes", [(0.1, 1), (0.1, 2), (0.0, 2)])
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_every_plan_trains_bit_identically(plan_models, family, dropout, lanes):
    """Kept contexts, kept attention probabilities and kept fp32 weights change time and memory, never a bit; also
    with the rows split over two threads (engine/lanes.py; with dropout the lanes run one after the other)."""
    lean_losses, lean = _train(plan_models[family], 0, False, 0, dropout=dropout, lanes=lanes)
    for levers in [(-1, False, 0), (-1, True, 0), (0, False, -1), (1, True, 1), (-1, True, -1)]:
        losses, adapter = _train(plan_models[family], *levers, dropout=dropout, lanes=lanes)
        assert losses == lean_losses, levers
        assert all(np.array_equal(adapter[k], lean[k]) for k in lean), levers


def test_plans_are_bit_identical_with_the_mlp_in_ffn_slices(plan_models, monkeypatch):
    """The sliced MLP backward (five ffn slices here) recomputes gate and up slice by slice where a kept context holds
    the forward's whole tensors: the same bits either way, and with kept fp32 weights."""
    from mesp_mlx.methods import mesp_lora

    monkeypatch.setattr(mesp_lora, "LEAN_CHUNK", 8 << 10)
    lean_losses, lean = _train(plan_models["llama"], 0, False, 0, dropout=0.1)
    for levers in [(-1, False, 0), (0, False, -1), (-1, True, -1)]:
        losses, adapter = _train(plan_models["llama"], *levers, dropout=0.1)
        assert losses == lean_losses, levers
        assert all(np.array_equal(adapter[k], lean[k]) for k in lean), levers


@pytest.mark.parametrize("dropout,lanes", [(0.1, 1), (0.0, 2)])
def test_gemma_with_mmap_checkpoints_takes_the_sliced_mlp_rule_bit_identically_in_every_plan(
        plan_models, monkeypatch, tmp_path, dropout, lanes):
    """With mmap'd checkpoints MeSP keeps Gemma 3's post-MLP norm input beside them (outside MLX memory), so its MLP
    backward runs in ffn slices too: the same bits in every plan."""
    from mesp_mlx.methods import mesp_lora
    from mesp_mlx.methods import mesp as mesp_module

    monkeypatch.setattr(mesp_lora, "LEAN_CHUNK", 8 << 10)  # several ffn slices
    calls = []
    real = mesp_module.sliced_mlp_backward
    monkeypatch.setattr(mesp_module, "sliced_mlp_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = plan_models["gemma3_text"]
    lean_losses, lean = _train(path, 0, False, 0, dropout=dropout, lanes=lanes, storage="mmap", tmp=str(tmp_path))
    assert calls
    for levers in [(-1, True, 0), (0, False, -1), (1, True, 1)]:
        losses, adapter = _train(path, *levers, dropout=dropout, lanes=lanes, storage="mmap", tmp=str(tmp_path))
        assert losses == lean_losses, levers
        assert all(np.array_equal(adapter[k], lean[k]) for k in lean), levers


def test_gemma_sliced_mlp_gradients_equal_autodiff(plan_models, monkeypatch, tmp_path):
    """Gemma 3 with mmap'd checkpoints (post-MLP norm input, attention output and residual from the side store, MLP in
    ffn slices): one step's gradients as MeBP's autodiff (fp32, rel <= 1e-5)."""
    from conftest import max_rel_err
    from mesp_mlx.methods import MeBP
    from mesp_mlx.methods import mesp_lora

    from mesp_mlx.methods import mesp as mesp_module

    monkeypatch.setattr(mesp_lora, "LEAN_CHUNK", 8 << 10)
    calls, attention = [], []
    real = mesp_module.sliced_mlp_backward
    monkeypatch.setattr(mesp_module, "sliced_mlp_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_attention = mesp_module.attention_forward
    monkeypatch.setattr(mesp_module, "attention_forward",
                        lambda *a, **k: attention.append(1) or real_attention(*a, **k))
    batch = _batches(384, 1)[0]
    grads = {}
    for name, rule, storage in (("mebp", MeBP(), "memory"), ("mesp", MeSP(), "mmap")):
        model = _model(plan_models["gemma3_text"])
        parts = ModelParts(model)
        engine = BlockEngine(parts, rule, None, checkpoint_storage=storage, checkpoint_dir=str(tmp_path))
        attention.clear()
        _, g = engine.step(batch, 0, apply_update=False)
        grads[name] = {f"{i}.{k}": v for i, t in g.items() for k, v in flat(t).items()}
    assert len(calls) == 3  # every block's MLP in slices
    # the forward's three and the once-per-class check's one: the recompute read o and h from beside the checkpoints
    assert len(attention) == 4
    assert set(grads["mesp"]) == set(grads["mebp"]) and grads["mebp"]
    for k, ref in grads["mebp"].items():
        assert max_rel_err(grads["mesp"][k], ref) <= 1e-5, k


def test_sliced_mlp_is_taken_only_where_it_applies(plan_models, monkeypatch):
    """Llama on the dequantizing path takes the sliced MLP rule; Gemma 3 (a norm after the MLP), Phi-3 (fused gate_up)
    and the fused quantized path (Metal's) keep the whole-tensor rule."""
    from mesp_mlx.methods import mesp as mesp_module

    calls = []
    real = mesp_module.sliced_mlp_backward
    monkeypatch.setattr(mesp_module, "sliced_mlp_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    for family, compute, expected in (("llama", "dequant", 1), ("gemma3_text", "dequant", 0), ("phi3", "dequant", 0),
                                      ("llama", "fused", 0)):
        model = _model(plan_models[family])
        set_compute_path(model, compute)
        mx.random.seed(4)
        x, g = mx.random.normal((1, 6, 64)), mx.random.normal((1, 6, 64))
        calls.clear()
        mx.eval(MeSP().block_backward(model.layers[1], x, g, "causal"))
        assert len(calls) == expected, (family, compute)


def test_lcsb_with_kept_contexts_is_bit_identical(tiny_models):
    lean_losses, lean = _train(tiny_models["qwen3"], 0, False, 0, method="lcsb")
    losses, adapter = _train(tiny_models["qwen3"], -1, True, -1, method="lcsb")
    assert losses == lean_losses
    assert all(np.array_equal(adapter[k], lean[k]) for k in lean)


@pytest.mark.parametrize("bits,group", [(4, 64), (8, 32), (3, 64), (2, 32)])
def test_lean_matmul_kept_weights_give_the_same_bits_as_packed_slices(bits, group):
    """Slices follow the quantized layout, so the kept fp32 copy is multiplied (and summed) in exactly the same pieces."""
    lin = nn.QuantizedLinear.from_linear(nn.Linear(256, 384, bias=False), group, bits)
    set_compute_path(lin, "dequant")
    x, g = mx.random.normal((2, 9, 256)), mx.random.normal((2, 9, 384))
    w = dequantized_weight(lin)
    packed = {c: (lean_matmul(x, lin, True, c), lean_matmul(g, lin, False, c)) for c in (1 << 12, 1 << 15, 1 << 30)}
    for y, gx in packed.values():  # every slicing is the whole product up to rounding
        assert np.allclose(np.array(y), np.array(x @ w.T), rtol=1e-5, atol=1e-5)
        assert np.allclose(np.array(gx), np.array(g @ w), rtol=1e-5, atol=1e-5)
    kept = keep_dequantized(lin)
    assert kept == w.nbytes and "_kept_dense" not in dict(lin)  # an attribute, never a parameter
    for c, (y, gx) in packed.items():
        assert mx.array_equal(lean_matmul(x, lin, True, c), y).item()
        assert mx.array_equal(lean_matmul(g, lin, False, c), gx).item()
    assert mx.array_equal(lin(x), x @ w.T).item()  # the module's own call (MeBP's autodiff) uses the copy too
    keep_dequantized(lin, keep=False)
    assert "_kept_dense" not in lin.__dict__


def test_compiled_exp_matches_mlx_and_keeps_nan_and_limits():
    x = mx.array(np.random.default_rng(0).normal(0, 10, 100_000).astype(np.float32))
    ref = np.exp(np.array(x, dtype=np.float64))
    ours = np.array(fastmath.exp(x), dtype=np.float64)
    assert (np.abs(ours - ref) / ref).max() < 3e-6  # MLX's own CPU exp: 2.6e-6
    edge = np.array(fastmath.exp(mx.array([np.nan, np.inf, -np.inf, -100.0, 0.0], mx.float32)))
    assert np.isnan(edge[0]) and edge[1] > 1e38 and edge[2] == 0 and edge[3] == 0 and edge[4] == 1
    gate, up = mx.random.normal((64, 32)), mx.random.normal((64, 32))
    assert np.allclose(np.array(fastmath.silu_mul(gate, up)), np.array(nn.silu(gate) * up), rtol=1e-5, atol=1e-7)


def _costs(n=4):
    # per block: forward 1.0 s (0.8 dense); backward 2.0 s recomputing, 1.2 keeping the context, 1.0 with probs;
    # dense saves 0.3 s more in the backward
    bwd = {}
    for dense in (False, True):
        base = 2.0 - (0.3 if dense else 0)
        bwd.update({(False, False, dense): base, (True, False, dense): base - 0.8, (True, True, dense): base - 1.0})
    return LeverCosts(n, n, {False: 1.0, True: 0.8}, bwd, 0.5, context_mb=10, probs_mb=5, dense_mb=8,
                      activations_apply=True, dense_applies=True)


def test_fastest_plan_fits_its_room_and_is_never_slower_with_more():
    costs = _costs()
    previous = None
    for room in (0, 9, 10, 20, 40, 60, 100, 1000):
        lv = fastest(costs, room)
        assert costs.extra_mb(lv) <= room
        if previous is not None:
            assert costs.step_s(lv) <= previous
        previous = costs.step_s(lv)
    assert fastest(costs, 0) == Levers(0, False, 0)
    assert fastest(costs, 1000) == Levers(4, True, 4)
    assert costs.step_s(Levers(4, True, 4)) == pytest.approx(0.5 + 4 * (0.8 + 0.7))
    # a lever the user set is kept as set; the others are still chosen
    assert fastest(costs, 1000, {"keep_dequantized": 0}) == Levers(4, True, 0)
    assert fastest(costs, 1000, {"keep_activations": -1, "keep_attention": False, "keep_dequantized": 1}) == \
        Levers(4, False, 1)


def test_train_picks_levers_records_them_and_respects_flags(tiny_models, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    out = tmp_path / "auto"
    assert main(["train", "--model", str(tiny_models["llama"]), "--data", str(data), "--iters", "2",
                 "--batch-size", "2", "--adapter-path", str(out), "--no-plot"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    n = config["num_layers"]
    # which levers are worth their memory on a tiny model is the probes' timing call (load-dependent); that the
    # choice is the one printed and recorded, and that it changes no bit, is not
    chosen = Levers(config["keep_activations"], config["keep_attention"], config["keep_dequantized"])
    assert 0 <= chosen.keep_activations <= n and 0 <= chosen.keep_dequantized <= n
    text = capsys.readouterr().out
    assert config["predicted_step_s"] > 0 and "speed levers (fastest under the default budget" in text
    assert f"): {chosen.flags()}" in text
    lean = tmp_path / "lean"
    assert main(["train", "--model", str(tiny_models["llama"]), "--data", str(data), "--iters", "2",
                 "--batch-size", "2", "--adapter-path", str(lean), "--no-plot", "--keep-activations", "0",
                 "--no-keep-attention", "--keep-dequantized", "0"]) == 0
    assert "speed levers (as set)" in capsys.readouterr().out
    a = mx.load(str(out / "adapters.safetensors"))
    b = mx.load(str(lean / "adapters.safetensors"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_plan_prints_levers_and_sweeps(tiny_models, tmp_path, capsys):
    png = tmp_path / "sweep.png"
    data = write_data(tmp_path / "data")
    assert main(["plan", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--batch-size", "2",
                 "--max-seq-length", "64", "--sweep", "--sweep-out", str(png)]) == 0
    text = capsys.readouterr().out
    for lever in ("keep activations", "keep attention", "keep dequantized", "predicted step", "memory <-> step time"):
        assert lever in text
    rows = [line.split() for line in text.splitlines()[text.splitlines().index(
        next(l for l in text.splitlines() if l.strip().startswith("budget MB"))) + 1:]]
    assert len(rows) == 10
    seconds = [float(r[2]) for r in rows]
    # more room never makes the fastest plan slower (by construction); whether it makes it faster on a tiny model is
    # the probes' timing on a loaded box, so it is not asserted
    assert seconds == sorted(seconds, reverse=True)
    assert png.read_bytes()[:4] == b"\x89PNG"
    # a budget below every lever: the leanest plan
    assert main(["plan", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--batch-size", "2",
                 "--max-seq-length", "64", "--budget-mb", "1"]) == 5


def test_plan_and_train_resolve_the_same_run_and_leave_the_config_alone(tiny_models, tmp_path, capsys):
    """`plan` resolves through train's own code: for short data and the default --max-seq-length it plans for the
    data's longest batch (not the 2048-token maximum), as train does; train returns what it resolved without writing
    into the user's config."""
    import dataclasses
    import json
    import re

    from mesp_mlx.data.datasets import BatchIterator, load_splits
    from mesp_mlx.run.config import build_config
    from mesp_mlx.run.prepare import prepare_model
    from mesp_mlx.run.train import train

    data = write_data(tmp_path / "data")
    flags = ["--model", str(tiny_models["qwen2"]), "--data", str(data), "--batch-size", "2"]
    assert main(["plan", *flags]) == 0
    text = capsys.readouterr().out
    planned = re.search(r"plan for mesp, seq (\d+) \(the data's longest batch; --max-seq-length 2048\)", text)
    assert planned, text
    prep = prepare_model(build_config(None, {"model": str(tiny_models["qwen2"]), "data": str(data)}))
    longest = BatchIterator(load_splits(str(data), prep.tokenizer)["train"], 2, 2048).longest_batch_length()
    assert int(planned.group(1)) == longest - 1 < 100
    step_s = float(re.search(r"predicted step ([\d.]+) s", text).group(1))

    cfg = build_config(None, {"model": str(tiny_models["qwen2"]), "data": str(data), "batch_size": 2, "iters": 1,
                              "adapter_path": str(tmp_path / "out"), "plot": False, "steps_per_eval": 0})
    before = dataclasses.asdict(cfg)
    logged = []
    train(cfg, log=logged.append)
    assert dataclasses.asdict(cfg) == before  # nothing written back
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["max_seq_length"] == 2048 and config["lanes"] >= 1 and config["keep_activations"] is not None
    assert config["predicted_step_s"] > 0
    # the same shapes probed: the two predictions are of one step, not of 2048 vs ~40 tokens (50x apart)
    assert 0.2 < config["predicted_step_s"] / step_s < 5, (config["predicted_step_s"], step_s)
    assert any("speed levers (fastest under the default budget" in line for line in logged)
