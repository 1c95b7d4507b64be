"""MeSP's hand-written VJPs: every primitive and every block family against autodiff (fp32, rel <= 1e-5)."""

import warnings

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.rope_utils import Llama3RoPE

from conftest import flat, max_rel_err
from mesp_mlx.methods import MeBP, MeSP
from mesp_mlx.methods.mesp import unsupported_reason
from mesp_mlx.methods.vjp import attention_backward, rms_norm_backward, rope_backward, swiglu_backward
from test_engine import _batch, _engine_grads, _prepared

TOL = 1e-5


def test_rms_norm_backward():
    mx.random.seed(0)
    norm = nn.RMSNorm(48, eps=1e-5)
    norm.weight = mx.random.normal((48,))
    x, g = mx.random.normal((2, 5, 48)), mx.random.normal((2, 5, 48))
    _, (ref,) = mx.vjp(norm, [x], [g])
    assert max_rel_err(rms_norm_backward(norm, x, g), ref) <= TOL


def test_swiglu_backward():
    mx.random.seed(1)
    gate, up, g = (mx.random.normal((3, 7, 40)) * 3 for _ in range(3))
    _, ref = mx.vjp(lambda a, b: nn.silu(a) * b, [gate, up], [g])
    for ours, theirs in zip(swiglu_backward(gate, up, g), ref):
        assert max_rel_err(ours, theirs) <= TOL


@pytest.mark.parametrize("rope", [nn.RoPE(16, traditional=False, base=10000), nn.RoPE(16, traditional=True, base=500),
                                  Llama3RoPE(16, 512, False, 10000.0, {"factor": 8.0, "low_freq_factor": 1.0,
                                                                       "high_freq_factor": 4.0,
                                                                       "original_max_position_embeddings": 64})])
def test_rope_backward_is_the_inverse_rotation(rope):
    mx.random.seed(2)
    x, g = mx.random.normal((1, 3, 11, 16)), mx.random.normal((1, 3, 11, 16))
    _, (ref,) = mx.vjp(lambda t: rope(t), [x], [g])
    assert max_rel_err(rope_backward(rope, g), ref) <= TOL


def _masks(L):
    keep = mx.tril(mx.ones((L, L), dtype=mx.bool_), k=0) & ~mx.tril(mx.ones((L, L), dtype=mx.bool_), k=-4)
    return {"none": None, "causal": "causal", "window-bool": keep,
            "additive": mx.where(keep, 0.0, -1e9).astype(mx.float32)}


@pytest.mark.parametrize("mask_name", ["none", "causal", "window-bool", "additive"])
@pytest.mark.parametrize("budget", [1 << 21, 1])  # one chunk per KV group / one head at a time
def test_attention_backward_gqa(mask_name, budget):
    mx.random.seed(3)
    B, H, Hkv, L, D = 2, 6, 2, 9, 8
    q, g = mx.random.normal((B, H, L, D)), mx.random.normal((B, H, L, D))
    k, v = mx.random.normal((B, Hkv, L, D)), mx.random.normal((B, Hkv, L, D))
    mask = _masks(L)[mask_name]
    scale = D ** -0.5

    def attn(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    _, ref = mx.vjp(attn, [q, k, v], [g])
    for ours, theirs in zip(attention_backward(q, k, v, g, scale, mask, budget_elems=budget), ref):
        assert max_rel_err(ours, theirs) <= TOL


def _block_vjp(method, block, x, g, mask):
    gx, grads = method.block_backward(block, x, g, mask)
    mx.eval(gx, grads)
    return gx, flat(grads)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("store_h", [False, True])
@pytest.mark.parametrize("chunk", [None, 1 << 10])
def test_block_vjp_equals_autodiff(tiny_models, monkeypatch, family, store_h, chunk):
    """chunk 1 KB: the recompute's attention probabilities (3.2 KB here) are over one lean slice, so the attention's
    backward computes them again; the 4-row weight slices miss the down matrix's groups: the whole-tensor MLP rule."""
    from mesp_mlx.methods import mesp_lora

    if chunk:
        monkeypatch.setattr(mesp_lora, "LEAN_CHUNK", chunk)
    model, _ = _prepared(tiny_models[family])
    block = model.layers[1]
    assert unsupported_reason(block) is None
    mx.random.seed(4)
    x = mx.random.normal((2, 10, 64))
    g = mx.random.normal((2, 10, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hand rule itself, not the fallback
        gx, grads = _block_vjp(MeSP(store_h=store_h), block, x, g, "causal")
    gx_ref, grads_ref = _block_vjp(MeBP(), block, x, g, "causal")
    assert set(grads) == set(grads_ref) and len(grads) == 14
    assert max_rel_err(gx, gx_ref) <= TOL
    for k in grads_ref:
        assert max_rel_err(grads[k], grads_ref[k]) <= TOL, k


@pytest.fixture
def spy_sliced(monkeypatch):
    """Counts the MLP backwards the sliced rule (mlp_slices.py) takes."""
    from mesp_mlx.methods import mesp as mesp_module

    calls = []
    real = mesp_module.sliced_mlp_backward
    monkeypatch.setattr(mesp_module, "sliced_mlp_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("chunk", [None, 8 << 10])  # one ffn slice / five (32 rows of a 64-wide matrix in 8 KB)
@pytest.mark.parametrize("keys", [None, ["mlp.up_proj", "mlp.down_proj", "self_attn.v_proj"], ["mlp.gate_proj"]])
@pytest.mark.parametrize("store_h", [False, True])
def test_sliced_mlp_backward_equals_autodiff(tiny_models, monkeypatch, spy_sliced, chunk, keys, store_h):
    """The MLP backward slice by slice of the ffn axis (each frozen matrix dequantized once): every gradient as
    autodiff's, with LoRA on all, some or one of the MLP's projections, and the slices cutting the packed down
    matrix's columns on its quantization groups."""
    from mesp_mlx.methods import mesp_lora

    if chunk:
        monkeypatch.setattr(mesp_lora, "LEAN_CHUNK", chunk)
    model, _ = _prepared(tiny_models["llama"], keys=keys)
    block = model.layers[1]
    if chunk:
        gate = block.mlp.gate_proj
        assert len(mesp_lora.lean_slices(getattr(gate, "linear", gate))) == 5  # ffn 160 in slices of 32
    mx.random.seed(4)
    x, g = mx.random.normal((2, 10, 64)), mx.random.normal((2, 10, 64))
    gx, grads = _block_vjp(MeSP(store_h=store_h), block, x, g, "causal")
    gx_ref, grads_ref = _block_vjp(MeBP(), block, x, g, "causal")
    assert spy_sliced, "the sliced MLP rule did not run"
    assert set(grads) == set(grads_ref) and grads
    assert max_rel_err(gx, gx_ref) <= TOL
    for k in grads_ref:
        assert max_rel_err(grads[k], grads_ref[k]) <= TOL, k


@pytest.mark.parametrize("chunk", [None, 8 << 10])
def test_dropout_masks_are_reproduced(tiny_models, monkeypatch, chunk):
    from mesp_mlx.methods import mesp_lora

    if chunk:
        monkeypatch.setattr(mesp_lora, "LEAN_CHUNK", chunk)
    _dropout_masks_are_reproduced(tiny_models)


def _dropout_masks_are_reproduced(tiny_models):
    """With LoRA dropout the hand rule's recompute draws the forward's Bernoulli masks (engine seeds per block)."""
    batch = _batch(384)
    grads = {}
    for method in ("mebp", "mesp"):
        model, _ = _prepared(tiny_models["qwen2"])
        for layer in model.layers:
            for _, m in layer.named_modules():
                if hasattr(m, "dropout"):
                    m.dropout = nn.Dropout(0.3)
        model.train()
        grads[method] = _engine_grads(model, batch, method=method)[1]
    for k in grads["mebp"]:
        assert max_rel_err(grads["mesp"][k], grads["mebp"][k]) <= TOL, k


def test_unknown_block_falls_back_to_mebp_with_a_warning(tiny_models):
    model, _ = _prepared(tiny_models["qwen2"])
    block = model.layers[2]
    block.input_layernorm.unfreeze()  # a trainable norm weight: the hand rule does not form that gradient
    assert "other than LoRA" in unsupported_reason(block)
    mx.random.seed(5)
    x, g = mx.random.normal((1, 6, 64)), mx.random.normal((1, 6, 64))
    with pytest.warns(UserWarning, match="using MeBP's autodiff rule"):
        gx, grads = _block_vjp(MeSP(), block, x, g, "causal")
    gx_ref, grads_ref = _block_vjp(MeBP(), block, x, g, "causal")
    assert "input_layernorm.weight" in grads
    assert max_rel_err(gx, gx_ref) <= TOL


def test_a_block_whose_forward_changed_is_caught(tiny_models):
    """If mlx-lm's block computed something else than the rule assumes, the once-per-class check sends it to MeBP."""
    model, _ = _prepared(tiny_models["llama"])
    block = model.layers[0]

    class Patched(type(block)):
        def __call__(self, x, mask=None, cache=None):
            return super().__call__(x, mask, cache) * 1.5

    Patched.__module__ = type(block).__module__
    Patched.__name__ = "TransformerBlock"
    block.__class__ = Patched
    mx.random.seed(6)
    x, g = mx.random.normal((1, 6, 64)), mx.random.normal((1, 6, 64))
    with pytest.warns(UserWarning, match="forward differs"):
        gx, _ = _block_vjp(MeSP(), block, x, g, "causal")
    gx_ref, _ = _block_vjp(MeBP(), block, x, g, "causal")
    assert max_rel_err(gx, gx_ref) <= TOL
