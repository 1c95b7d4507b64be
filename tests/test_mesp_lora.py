"""MeSP's hand-written LoRA VJP equals autodiff of mlx-lm's LoRALinear (fp32, rel <= 1e-5), quantized and dense."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from conftest import max_rel_err
from mesp_mlx.methods.mesp import to_mesp_lora
from mesp_mlx.methods.mesp_lora import MeSPLoRALinear
from mesp_mlx.models.compute import DequantLinear


def _layers(quantized: bool, fused: bool, bias: bool):
    mx.random.seed(0)
    base = nn.Linear(128, 96, bias=bias)
    if quantized:
        base = nn.QuantizedLinear.from_linear(base, group_size=32, bits=4)
        if not fused:
            base.__class__ = DequantLinear
    ref = LoRALinear.from_base(base, r=8, scale=20.0)
    ref.lora_b = 0.05 * mx.random.normal(ref.lora_b.shape)
    ours = LoRALinear.from_base(base, r=8, scale=20.0)
    ours.update(ref.parameters())
    to_mesp_lora(ours)
    assert isinstance(ours, MeSPLoRALinear)
    return ref, ours


@pytest.mark.parametrize("quantized,fused,bias", [(True, False, False), (True, True, False), (False, False, True),
                                                  (True, False, True)])
def test_mesp_lora_vjp_equals_autodiff(quantized, fused, bias):
    ref, ours = _layers(quantized, fused, bias)
    x = mx.random.normal((2, 7, 128))
    g = mx.random.normal((2, 7, 96))

    def run(layer):
        def f(x, a, b):
            layer.lora_a, layer.lora_b = a, b
            return layer(x)

        return mx.vjp(f, [x, layer.lora_a, layer.lora_b], [g])

    (y_ref,), grads_ref = run(ref)
    (y, ), grads = run(ours)
    tol = 1e-3 if fused else 1e-5  # fused: quantized_matmul vs dequantize+GEMM summation order
    assert max_rel_err(y, y_ref) <= tol
    for a, b in zip(grads, grads_ref):
        assert max_rel_err(a, b) <= tol


def test_mesp_lora_in_value_and_grad_training():
    ref, ours = _layers(True, False, False)
    x = mx.random.normal((3, 5, 128))

    def loss(model, x):
        return (model(x) ** 2).mean()

    l1, g1 = nn.value_and_grad(ref, loss)(ref, x)
    l2, g2 = nn.value_and_grad(ours, loss)(ours, x)
    assert abs(l1.item() - l2.item()) <= 1e-6 * abs(l1.item())
    g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert set(g2) == set(g1) == {"lora_a", "lora_b"}  # nothing formed for the frozen base
    for k in g1:
        assert max_rel_err(g2[k], g1[k]) <= 1e-5
