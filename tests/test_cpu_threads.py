"""Work spread over CPU threads (cpu_threads.py) computes the very bits of the same work on one thread: a frozen
matrix's dequantization slices (lean_matmul), GELU-tanh's gating row blocks, and a whole MeSP step on a Gemma 3 block
whose slices and blocks are made small enough to be spread."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from conftest import flat, max_rel_err
from mesp_mlx import cpu_threads, fastmath, mesp_lora
from mesp_mlx.mesp_lora import lean_matmul
from mesp_mlx.methods.vjp import gated_forward
from mesp_mlx.models.compute import DequantLinear, dequantize


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setattr(cpu_threads, "cores", lambda: 2)  # spread even where the machine has one core
    monkeypatch.setattr(cpu_threads, "SPREAD", True)


def _serial(fn):
    old, cpu_threads.SPREAD = cpu_threads.SPREAD, False
    try:
        return fn()
    finally:
        cpu_threads.SPREAD = old


@pytest.mark.parametrize("transpose", [True, False])
def test_spread_slices_give_the_serial_bits(two_threads, transpose):
    mx.random.seed(0)
    lin = nn.QuantizedLinear(256, 192, bias=False, group_size=32, bits=4)
    lin.__class__ = DequantLinear
    x = mx.random.normal((1, 9, 256 if transpose else 192))
    mx.eval(lin.parameters(), x)
    slice_bytes = 16 * 256 * 4  # 16 rows a slice: 12 slices, 2 at a time
    spread = lean_matmul(x, lin, transpose, slice_bytes)
    serial = _serial(lambda: lean_matmul(x, lin, transpose, slice_bytes))
    assert mx.array_equal(spread, serial)  # the same slices, summed in the same order
    w = dequantize(lin["weight"], lin["scales"], lin["biases"], 32, 4)
    assert max_rel_err(spread, x @ (w.T if transpose else w)) <= 1e-5


def test_spread_gating_blocks_give_the_serial_bits(two_threads, monkeypatch):
    monkeypatch.setattr(fastmath, "CHUNK", 64)
    gate, up = mx.random.normal((2, 11, 48)) * 3, mx.random.normal((2, 11, 48))
    mx.eval(gate, up)
    a, t = gated_forward("gelu_tanh", gate, up)
    a1, t1 = _serial(lambda: gated_forward("gelu_tanh", gate, up))
    assert mx.array_equal(a, a1) and mx.array_equal(t, t1)
    assert mx.array_equal(a, nn.gelu_approx(gate) * up)


def test_no_spreading_inside_a_parallel_piece(two_threads):
    widths = cpu_threads.run_parallel(lambda k: mx.array(cpu_threads.spread_width()), [(), ()])
    assert [w.item() for w in widths] == [1, 1] and cpu_threads.spread_width() == 2


def test_an_error_in_a_piece_reaches_the_caller_after_every_piece_ended(two_threads):
    done = []

    def piece(k):
        if k == 1:
            raise ValueError("piece 1 failed")
        done.append(k)
        return mx.array(k)

    with pytest.raises(ValueError, match="piece 1 failed"):
        cpu_threads.run_parallel(piece, [(), ()])
    assert done == [0]


def test_mesp_gemma_step_with_spread_work_is_bitwise_the_serial_one(two_threads, monkeypatch, tmp_path):
    """A whole step of MeSP's Gemma 3 hand rule with dequantization slices and gating blocks small enough to be spread:
    the serial step's bits, and mlx-lm's autodiff within 1e-5."""
    import test_families as tf
    from mesp_mlx.mesp_lora import to_mesp_lora
    from mesp_mlx.methods import MeSP
    from mesp_mlx.models.families.tiny import tiny_config
    from mesp_mlx.models.synthetic import write_random_model
    from conftest import masked_ce

    monkeypatch.setattr(fastmath, "CHUNK", 256)
    monkeypatch.setattr(mesp_lora, "SLICE_BYTES", 8 * 64 * 4)  # 8 rows of a 64-wide matrix a slice
    path = write_random_model(tmp_path / "g", tiny_config("gemma3_text"), bits=4, group_size=32, seed=4,
                              weight_std=0.05)
    model, _ = tf._prepared(path)
    _, ref = nn.value_and_grad(model, masked_ce)(model, tf._batch())
    to_mesp_lora(model)
    _, spread = tf._engine(model, MeSP())
    _, serial = _serial(lambda: tf._engine(model, MeSP()))
    ref = flat(ref)
    assert set(spread) == set(ref)
    for k in ref:
        assert mx.array_equal(spread[k], serial[k]), k
        assert max_rel_err(spread[k], ref[k]) <= 1e-5, k
