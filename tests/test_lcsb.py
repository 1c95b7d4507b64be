"""LCSB: a subset of blocks per step, skipped blocks on the identity path; the forward loss stays the full model's."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest

from conftest import flat, masked_ce, max_rel_err
from mesp_mlx.engine import BlockEngine
from mesp_mlx.methods import LCSB
from mesp_mlx.models import ModelParts
from test_engine import _batch, _prepared


def _engine(model, method, opt=lambda: optim.SGD(learning_rate=0.05)):
    return BlockEngine(ModelParts(model), method, [opt() for _ in model.layers])


def test_cyclic_schedule_covers_every_block_within_k_steps():
    lcsb = LCSB(fraction=0.25)
    blocks = list(range(2, 24))
    groups = lcsb.groups(blocks)
    assert len(groups) == 4 and sorted(sum(groups, [])) == blocks
    seen = set().union(*(lcsb.selected_blocks(step, blocks) for step in range(4)))
    assert seen == set(blocks)


@pytest.mark.parametrize("schedule", ["random", "importance"])
def test_other_schedules_pick_the_fraction_and_starve_nobody(schedule):
    lcsb = LCSB(fraction=0.25, schedule=schedule, seed=1)
    blocks = list(range(8))
    seen = set()
    for step in range(8 if schedule == "importance" else 40):  # importance: all within 2K steps; random, in time
        chosen = lcsb.selected_blocks(step, blocks)
        assert len(chosen) == 2 and chosen <= set(blocks)
        for b in chosen:
            lcsb.observe(step, b, float(b))  # deeper blocks look more important
        seen |= chosen
    assert seen == set(blocks)
    restored = LCSB(fraction=0.25, schedule=schedule, seed=1)
    restored.load_state_dict(lcsb.state_dict())
    assert restored.selected_blocks(8, blocks) == lcsb.selected_blocks(8, blocks)


def test_importance_prefers_the_important_blocks_and_bounds_the_wait():
    """Not a relabelled cycle: the blocks with the larger gradient norms are chosen more often than the others,
    yet every block is back-propagated at least once in any 2K consecutive steps."""
    lcsb = LCSB(fraction=0.25, schedule="importance")
    blocks = list(range(8))  # K = 4 groups, 2 blocks a step
    counts, last, longest_wait = dict.fromkeys(blocks, 0), dict.fromkeys(blocks, 0), 0
    for step in range(64):
        chosen = lcsb.selected_blocks(step, blocks)
        assert len(chosen) == 2
        for b in chosen:
            lcsb.observe(step, b, 10.0 if b >= 6 else 1.0)  # blocks 6 and 7 carry the large gradients
            longest_wait, last[b] = max(longest_wait, step - last[b]), step
            counts[b] += 1
    assert longest_wait <= 8
    assert min(counts[6], counts[7]) > 2 * max(counts[b] for b in range(6))
    cyclic = LCSB(fraction=0.25)
    assert any(lcsb.selected_blocks(s, blocks) != cyclic.selected_blocks(s, blocks) for s in range(64, 72))


def test_sgd_changes_only_the_selected_blocks_and_the_loss_is_the_full_models(tiny_models):
    model, _ = _prepared(tiny_models["qwen2"])
    batch = _batch(384)
    before = {k: mx.array(v) for k, v in flat(model.trainable_parameters()).items()}
    full_loss = masked_ce(model, batch).item()
    lcsb = LCSB(fraction=1 / 3)
    stats, _ = _engine(model, lcsb).step(batch, step=1)  # group 1 of [[0], [1], [2]]
    assert abs(stats.loss - full_loss) <= 1e-6 * abs(full_loss)
    after = flat(model.trainable_parameters())
    changed = {k.split(".")[2] for k in after if not mx.array_equal(after[k], before[k]).item()}
    assert changed == {"1"} and stats.blocks_backpropagated == 1


def test_the_top_group_gets_the_exact_gradient(tiny_models):
    """Above the top group no block is skipped, so its gradient is the full gradient; below, identity replaces the
    skipped Jacobians and the gradient differs (block-coordinate descent, not backprop)."""
    model, _ = _prepared(tiny_models["llama"])
    batch = _batch(384)
    _, ref = nn.value_and_grad(model, masked_ce)(model, batch)
    ref = flat(ref)
    for step, block, exact in ((2, 2, True), (0, 0, False)):
        _, grads = BlockEngine(ModelParts(model), LCSB(fraction=1 / 3), None).step(batch, step, apply_update=False)
        assert set(grads) == {block}
        errs = [max_rel_err(v, ref[f"model.layers.{block}.{k}"]) for k, v in flat(grads[block]).items()]
        assert (max(errs) <= 1e-5) == exact


class _IdentityPath(nn.Module):
    """docs/design.md §5's definition of a skipped block: out = h + stop_gradient(block(h) - h)."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        self.use_sliding = getattr(block, "use_sliding", False)  # Llama's model asks its layers

    def __call__(self, h, mask=None, cache=None):
        return h + mx.stop_gradient(self.block(h, mask, cache) - h)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lower_groups_get_autodiff_of_the_identity_path_model(tiny_models, family):
    """Below the top group the gradient is not the full one, but it is exactly autodiff's gradient of the model whose
    skipped blocks are h + stop_gradient(block(h) - h): the identity path and nothing else."""
    model, _ = _prepared(tiny_models[family])
    batch = _batch(384)
    n = len(model.layers)
    for step in range(3):
        lcsb = LCSB(fraction=1 / 3)
        selected = lcsb.selected_blocks(step, list(range(n)))
        stats, grads = BlockEngine(ModelParts(model), lcsb, None).step(batch, step, apply_update=False)
        layers = model.model.layers
        originals = list(layers)
        for i in range(n):
            if i not in selected:
                layers[i] = _IdentityPath(layers[i])
        try:
            loss, ref = nn.value_and_grad(model, masked_ce)(model, batch)
        finally:
            layers[:] = originals
        ref = flat(ref)
        assert set(grads) == selected
        assert abs(stats.loss - loss.item()) <= 1e-5 * abs(loss.item())
        for i in selected:
            errs = [max_rel_err(v, ref[f"model.layers.{i}.{k}"]) for k, v in flat(grads[i]).items()]
            assert max(errs) <= 1e-5, (step, i, max(errs))


def test_momentum_mode_steps_the_skipped_blocks_optimizers(tiny_models):
    model, _ = _prepared(tiny_models["qwen2"])
    batch = _batch(384)
    opt = lambda: optim.AdamW(learning_rate=1e-2)  # noqa: E731
    eng = _engine(model, LCSB(fraction=1 / 3, skipped="momentum"), opt)
    eng.step(batch, step=0)
    eng.step(batch, step=1)
    assert [int(o.state["step"].item()) for o in eng.optimizers] == [2, 2, 2]
    model2, _ = _prepared(tiny_models["qwen2"])
    eng2 = _engine(model2, LCSB(fraction=1 / 3, skipped="freeze"), opt)
    eng2.step(batch, step=0)
    eng2.step(batch, step=1)
    assert [int(o.state["step"].item()) if "step" in o.state else 0 for o in eng2.optimizers] == [1, 1, 0]
