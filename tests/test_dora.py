"""DoRA (mlx-lm's DoRALinear): MeSP's hand VJP equals autodiff (fp32, rel <= 1e-5) per projection and per block in
every family with a hand rule; trained adapters are mlx-lm's (load in mlx_lm.load / mlx_lm fuse)."""

import json
import subprocess
import sys
import warnings

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.dora import DoRALinear

from conftest import FAMILIES, flat, max_rel_err, randomize_lora
from mesp_mlx.cli import main
from mesp_mlx.methods.mesp_dora import DoRAProj, dora_norm


def _dora_layer(bits=4, seed=0):
    mx.random.seed(seed)
    lin = nn.Linear(96, 80, bias=False)
    base = nn.QuantizedLinear.from_linear(lin, group_size=32, bits=bits) if bits else lin
    base.freeze()  # the base is frozen, as apply_lora leaves it
    layer = DoRALinear.from_base(base, r=4, scale=3.0)
    layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape)
    layer.m = layer.m * (1 + 0.1 * mx.random.normal(layer.m.shape))
    mx.eval(layer.parameters())
    return layer


@pytest.mark.parametrize("bits", [4, None])
def test_dora_projection_vjp_equals_autodiff(bits):
    layer = _dora_layer(bits)
    x = mx.random.normal((2, 7, 96))
    g = mx.random.normal((2, 7, 80))
    adapted = layer._dequantized_weight() + (layer.scale * layer.lora_b.T) @ layer.lora_a.T
    assert max_rel_err(dora_norm(layer), mx.linalg.norm(adapted, axis=1)) <= 1e-5

    names = ["lora_a", "lora_b", "m"]

    def f(x, a, b, m):
        layer.update({"lora_a": a, "lora_b": b, "m": m})
        return layer(x)

    own = {k: getattr(layer, k) for k in names}
    ref_y, ref = mx.vjp(f, [x, *own.values()], [g])
    layer.update(own)  # the module holds its own arrays again, not the traced ones
    p = DoRAProj(layer, x, store_h=False)
    grads = {}
    dx = p.backward(g, grads, "proj")
    assert max_rel_err(p.y, ref_y[0]) <= 1e-5
    assert max_rel_err(dx, ref[0]) <= 1e-5
    for name, r in zip(names, ref[1:]):
        assert max_rel_err(grads[f"proj.{name}"], r) <= 1e-5, name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mesp_dora_block_rule_equals_mebp(tiny_models, family):
    from mesp_mlx.run.config import TrainConfig
    from mesp_mlx.methods import MeBP, MeSP
    from mesp_mlx.run.prepare import prepare_model

    prep = prepare_model(TrainConfig(model=str(tiny_models[family]), data="x", method="mesp", fine_tune_type="dora"))
    randomize_lora(prep.model, seed=2)
    block = prep.parts.layers[1]
    assert {k.rsplit(".", 1)[1] for k, _ in tree_flatten(block.trainable_parameters())} == {"lora_a", "lora_b", "m"}
    x = mx.random.normal((2, 9, prep.parts.inner.norm.weight.shape[0]))
    g = mx.random.normal(x.shape)
    mask = prep.parts.block_mask(block, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hand rule must take the block (no fallback to autodiff)
        ours = MeSP().block_backward(block, x, g, mask)
    ref = MeBP().block_backward(block, x, g, mask)
    assert max_rel_err(ours[0], ref[0]) <= 1e-5
    o, r = flat(ours[1]), flat(ref[1])
    assert set(o) == set(r)
    for k in r:
        assert max_rel_err(o[k], r[k]) <= 1e-5, k


def test_dora_adapters_load_and_fuse_in_mlx_lm(tiny_models, tmp_path):
    from mlx_lm import load

    from mesp_mlx.adapters.lora import apply_lora, load_adapter_weights
    from mesp_mlx.models import load_model
    from test_train_cli import write_data

    data = write_data(tmp_path / "data")
    out = tmp_path / "dora"
    assert main(["train", "--model", str(tiny_models["llama"]), "--data", str(data), "--iters", "3",
                 "--fine-tune-type", "dora", "--learning-rate", "1e-2", "--adapter-path", str(out), "--no-plot"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "dora"
    w = mx.load(str(out / "adapters.safetensors"))
    assert any(k.endswith(".m") for k in w)
    theirs, _ = load(str(tiny_models["llama"]), adapter_path=str(out))
    ours = load_model(str(tiny_models["llama"])).model
    apply_lora(ours, -1, {"rank": 8, "scale": 20.0, "dropout": 0.0}, dora=True)
    load_adapter_weights(ours, out / "adapters.safetensors")
    x = mx.array([[1, 5, 9, 33, 70]])
    assert mx.allclose(theirs(x), ours(x), atol=1e-4).item()
    fused = tmp_path / "fused"
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "fuse", "--model", str(tiny_models["llama"]),
                           "--adapter-path", str(out), "--save-path", str(fused)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (fused / "config.json").is_file()


@pytest.mark.parametrize("bits", [4, None])
def test_generic_tier_dora_linear_vjp_equals_autodiff(bits):
    """MeSPDoRALinear (the custom-function VJP used where no block rule exists) == autodiff of mlx-lm's DoRALinear."""
    from mesp_mlx.methods.mesp_dora import MeSPDoRALinear

    layer = _dora_layer(bits, seed=3)
    x = mx.random.normal((2, 5, 96))
    g = mx.random.normal((2, 5, 80))

    def grads_of(module):
        def loss(params, x):
            module.update(params)
            return (module(x) * g).sum()

        params = module.trainable_parameters()
        value, (gp, gx) = mx.value_and_grad(loss, argnums=(0, 1))(params, x)
        module.update(params)
        return value, flat(gp), gx

    ref = grads_of(layer)
    layer.__class__ = MeSPDoRALinear
    ours = grads_of(layer)
    assert max_rel_err(ours[0], ref[0]) <= 1e-5 and max_rel_err(ours[2], ref[2]) <= 1e-5
    for k in ref[1]:
        assert max_rel_err(ours[1][k], ref[1][k]) <= 1e-5, k
