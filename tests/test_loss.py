"""Chunked cross-entropy equals mlx-lm's masked mean CE in value and gradient, without full logits."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from conftest import max_rel_err
from mesp_mlx.engine.loss import auto_vocab_chunk, chunked_cross_entropy
from mesp_mlx.models import ModelParts, cast_float_params, load_model, set_compute_path


def _full_ce(parts, x, targets, mask):
    logits = parts.model.model.embed_tokens.as_linear(x) if parts.head is parts.inner.embed_tokens else parts.head(x)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets) * mask
    return ce.sum() / mask.sum()


@pytest.mark.parametrize("chunk", [None, 64, 100, 384])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_chunked_ce_equals_full_ce(tiny_models, family, chunk):
    lm = load_model(str(tiny_models[family]))
    set_compute_path(lm.model, "dequant")
    cast_float_params(lm.model, "float32")
    parts = ModelParts(lm.model)
    mx.random.seed(3)
    x = mx.random.normal((2, 9, 64))
    targets = mx.random.randint(0, 384, (2, 9))
    mask = mx.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0, 0]]).astype(mx.bool_)
    loss, g, n = chunked_cross_entropy(parts, x, targets, mask, chunk)
    ref_loss, ref_g = mx.value_and_grad(lambda x: _full_ce(parts, x, targets, mask))(x)
    assert n == 12
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert max_rel_err(g, ref_g) <= 1e-5
    assert mx.all(g[0, :2] == 0).item()  # masked positions get no gradient


def test_auto_chunk_bounds_logits_and_rows():
    assert auto_vocab_chunk(256, 151936, 896) * 896 <= (1 << 21) + 256 * 896
    assert auto_vocab_chunk(256, 151936, 896) * 256 <= 1 << 21
    assert auto_vocab_chunk(4, 300, 64) == 300
