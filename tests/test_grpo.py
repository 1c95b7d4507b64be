"""GRPO on the block engine: its gradients equal autodiff of a plain whole-model implementation (fp32, rel <= 1e-5)
under mesp and mebp, by rows and whole; its loss equals mlx-lm-lora's _grpo_objective; rewards, data and the run
end to end (figures, held-out reward, resume, refusals)."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import flat, max_rel_err
from mesp_mlx.engine import BlockEngine
from mesp_mlx.methods import make_method
from mesp_mlx.methods.mesp import to_mesp_lora
from mesp_mlx.models import ModelParts
from mesp_mlx.objectives import GRPO, adapters_off
from mesp_mlx.objectives.rewards import RewardError, Rewards, group_advantages, load_reward
from mesp_mlx.run.rollouts import RolloutBatch, rollout_rows
from test_engine import _prepared


def _rollout(vocab, old=False, seed=3):
    """2 prompts x 2 completions: prompts of 4 and 6 tokens, completions of 9, 5, 7 and 11 tokens."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, 4), rng.integers(0, vocab, 4), rng.integers(0, vocab, 6),
               rng.integers(0, vocab, 6)]
    completions = [list(rng.integers(0, vocab, n)) for n in (9, 5, 7, 11)]
    inputs, targets, mask = rollout_rows(prompts, completions)
    advantages = mx.array(group_advantages(np.array([1.0, 0.0, 0.3, 0.9]), 2), dtype=mx.float32)
    batch = RolloutBatch(inputs, targets, mask, advantages=advantages)
    if old:  # a rollout from an older policy: ratios away from 1, so the clip acts on some tokens
        n = int(mask.sum().item())
        batch.old_logp = mx.array(rng.normal(-6.1, 0.2, n).astype(np.float32))
    return batch


def _plain_token_logp(model, batch):
    logits = model(batch.inputs).astype(mx.float32)
    return -nn.losses.cross_entropy(logits, batch.targets, reduction="none")  # [rows, T]


def _plain_grpo(model, batch, beta, eps, eps_high, loss_type, level, max_tokens):
    """mlx-lm-lora's _grpo_objective on the whole model's [rows, T] log-probabilities, written plainly."""
    mask = batch.mask
    with adapters_off(model):
        ref = mx.stop_gradient(_plain_token_logp(model, batch))
    logp = _plain_token_logp(model, batch)
    old = mx.stop_gradient(logp) if batch.old_logp is None else _scatter(mask, batch.old_logp)
    log_ratio = mx.where(mask, logp - old, 0)
    counts = mask.sum(axis=1)
    if level == "sequence":
        log_ratio = (log_ratio.sum(axis=1) / mx.maximum(counts, 1))[:, None]
    ratio = mx.exp(log_ratio)
    clipped = mx.clip(ratio, 1 - eps, 1 + eps_high)
    adv = batch.advantages[:, None]
    per_token = -mx.minimum(ratio * adv, clipped * adv)
    delta = mx.minimum(ref - logp, 20.0)
    per_token = per_token + beta * mx.maximum(mx.expm1(delta) - delta, 0)
    token_loss = mx.where(mask, per_token, 0).sum(axis=1)
    if loss_type == "grpo":
        return (token_loss / mx.maximum(counts, 1)).mean()
    if loss_type == "bnpo":
        return token_loss.sum() / mx.maximum(counts.sum(), 1)
    return token_loss.sum() / (mask.shape[0] * max_tokens)


def _scatter(mask, flat_values):
    """[rows, T] with the counted positions (row-major, as the engine orders them) holding `flat_values`."""
    m = np.array(mask)
    out = np.zeros(m.shape, np.float32)
    out[m] = np.array(flat_values)
    return mx.array(out)


CASES = [("grpo", "token", True, True), ("grpo", "token", True, False), ("bnpo", "sequence", True, True),
         ("dr_grpo", "token", False, False)]  # (loss, importance level, an older policy's rollout, by rows)


@pytest.mark.parametrize("method", ["mebp", "mesp"])
@pytest.mark.parametrize("loss_type,level,old,by_rows", CASES)
def test_grpo_gradients_equal_whole_model_autodiff(tiny_models, method, loss_type, level, old, by_rows):
    model, _ = _prepared(tiny_models["qwen2"])
    if method == "mesp":
        to_mesp_lora(model)
    # a policy away from the reference (LoRA B != 0), so the KL term has a gradient
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape, key=mx.random.key(7))
    batch = _rollout(384, old=old)
    beta, eps, eps_high = 0.2, 0.1, 0.05
    objective = GRPO(beta, eps, eps_high, loss_type, level, max_completion_length=16)
    engine = BlockEngine(ModelParts(model), make_method(method), None, objective=objective)
    assert engine._by_rows(batch)
    if not by_rows:
        engine._by_rows = lambda b: False
    stats, grads = engine.step(batch, apply_update=False)
    got = {}
    for i, g in grads.items():
        got.update({f"model.layers.{i}.{k}": v for k, v in flat(g).items()})
    loss, ref = nn.value_and_grad(model, lambda m, b: _plain_grpo(m, b, beta, eps, eps_high, loss_type, level, 16))(
        model, batch)
    ref = flat(ref)
    assert abs(stats.loss - loss.item()) <= 1e-5 * max(abs(loss.item()), 1e-3)
    assert set(got) == set(ref)
    for k in ref:
        assert max_rel_err(got[k], ref[k]) <= 1e-5, (k, max_rel_err(got[k], ref[k]))
    assert sum(mx.abs(g).max().item() for g in got.values()) > 0
    assert stats.extra["kl"] > 0 and 0 <= stats.extra["clip_fraction"] <= 1
    if old:
        assert stats.extra["clip_fraction"] > 0  # the clip acted: the test covers both branches of the min


def test_grpo_loss_equals_mlx_lm_lora_objective():
    """The objective on flat token log-probabilities equals mlx-lm-lora 5.10.2's _grpo_objective on the padded ones."""
    peer = pytest.importorskip("mlx_lm_lora.trainer.grpo_trainer")
    rng = np.random.default_rng(0)
    mask = mx.array(np.array([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], bool))
    logp_full = mx.array(rng.normal(-3, 1, (3, 5)).astype(np.float32))
    ref_full = mx.array(rng.normal(-3, 1, (3, 5)).astype(np.float32))
    adv = mx.array([0.7, -1.2, 0.4])
    m = np.array(mask)
    rows = mx.array(np.nonzero(m)[0].astype(np.int32))
    flat_logp, flat_ref = mx.array(np.array(logp_full)[m]), mx.array(np.array(ref_full)[m])
    batch = RolloutBatch(None, None, mask, advantages=adv)
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        for level in ("token", "sequence"):
            ours, metrics = GRPO(0.1, 1e-4, None, loss_type, level, 8).loss(flat_logp, rows, 3, flat_ref, batch)
            theirs, _, their_metrics = peer._grpo_objective(logp_full, ref_full, mask, adv, 0.1, 1e-4, 1e-4, 8,
                                                            level, loss_type)
            assert abs(ours.item() - theirs.item()) <= 1e-6 * max(1.0, abs(theirs.item())), (loss_type, level)
            assert abs(metrics["kl"].item() - their_metrics["kl"].item()) <= 1e-6


def test_rewards_builtins_callables_and_errors(tmp_path):
    assert load_reward("exact_match")(None, [" 12 ", "13"], ["12", "12"]) == [1.0, 0.0]
    assert load_reward("number_match")(None, ["3 + 4 = 1,024.", "no", "-3", "7 = 7 + 1"], ["1024", "1", "-3.0", "7"]) \
        == [1.0, 0.0, 1.0, 0.0]
    assert load_reward(r"regex:^\d+$")(None, ["42", "x42"], [None, None]) == [1.0, 0.0]
    assert load_reward("length:4")(None, ["a b c d", "a b"], [None, None]) == [1.0, 0.5]
    module = tmp_path / "my_rewards.py"
    module.write_text("def shout(prompts, completions, answer, types=None):\n"
                      "    return [float(c.isupper()) for c in completions]\n"
                      "def broken(prompts, completions, answer, types=None):\n    raise KeyError('score')\n"
                      "def words(prompts, completions, answer, types=None):\n    return ['high'] * len(completions)\n"
                      "def short(prompts, completions, answer, types=None):\n    return [1.0]\n"
                      "def none(prompts, completions, answer, types=None):\n    return [None] * len(completions)\n")
    rewards = Rewards([f"{module}:shout", "exact_match"], [2.0, 1.0])
    values, figures = rewards(["p", "p"], ["YES", "no"], ["no", "no"], [None, None], [5, 5])
    assert values.tolist() == [2.0, 1.0] and figures[f"reward_{module}:shout"] == 0.5
    for name, message in [("broken", "raised KeyError"), ("words", "'high', not a number"),
                          ("short", "returned 1 values for 2 completions"), ("none", "no reward function scored")]:
        with pytest.raises(RewardError, match=message) as e:
            Rewards([f"{module}:{name}"])(["p", "q"], ["a", "b"], ["a", "b"], [None, None], [3, 4])
        assert "prompt" in str(e.value)
    for spec, message in [("nope", "not a built-in"), ("regex:(", "bad regular expression"),
                          ("length:0", "positive word count"), (f"{tmp_path}/missing.py:f", "is not a file"),
                          (f"{module}:absent", "no callable 'absent'"), ("no_such_module_xyz:f", "cannot load")]:
        with pytest.raises(RewardError, match=message):
            load_reward(spec)
    adv = group_advantages(np.array([1.0, 0.0, 2.0, 2.0]), 2)
    assert np.allclose(adv, [0.5 / 0.5001, -0.5 / 0.5001, 0, 0], atol=1e-6)  # (r - mean) / (std + 1e-4)


PROMPTS = [{"prompt": f"say {w}", "answer": w} for w in ("yes", "no", "hi", "ok", "up", "go")]


def _write_prompts(folder, rows=PROMPTS):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:4]))
    return folder


def _grpo_args(model, data, out, iters=4, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--adapter-path", str(out), "--train-mode", "grpo",
            "--iters", str(iters), "--batch-size", "2", "--group-size", "3", "--max-completion-length", "6",
            "--learning-rate", "5e-3", "--no-plot", "--steps-per-eval", "2", "--val-batches", "1", "--save-every",
            "2", "--reward-functions", "length:3,exact_match", "--reward-weights", "1,2", *extra]


def test_grpo_runs_end_to_end_records_its_figures_and_resumes_bit_identically(tiny_models, tmp_path, capsys):
    from mesp_mlx.cli import main
    from mesp_mlx.run.metrics import MetricsLog

    data = _write_prompts(tmp_path / "prompts")
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(_grpo_args(tiny_models["qwen2"], data, ref, 4, "--test")) == 0
    records = MetricsLog.read(ref / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"reward_mean", "reward_std", "kl", "clip_fraction", "generate_s", "generate_peak_mb",
                "completion_tokens"} <= set(r)
        assert r["phase_peak_mb"]["generate"] == r["generate_peak_mb"] > 0 and r["peak_mb"] >= r["generate_peak_mb"]
        assert {"reference", "forward", "backward"} <= set(r["phase_peak_mb"])
    assert "val_reward" in records[1] and "val_reward_at_start" in records[0]
    printed = capsys.readouterr().out
    assert "reward" in printed and "test reward" in printed  # --test: the mean reward on test.jsonl's prompts
    assert main(_grpo_args(tiny_models["qwen2"], data, out, 2)) == 0
    assert main(_grpo_args(tiny_models["qwen2"], data, out, 4, "--resume")) == 0
    got, want = mx.load(str(out / "adapters.safetensors")), mx.load(str(ref / "adapters.safetensors"))
    assert all(mx.array_equal(got[k], want[k]).item() for k in want)
    assert [r["reward_mean"] for r in MetricsLog.read(out / "metrics.jsonl")] == [r["reward_mean"] for r in records]


def test_grpo_plan_counts_the_generation(tiny_models, tmp_path, capsys):
    from mesp_mlx.cli import main

    data = _write_prompts(tmp_path / "prompts")
    args = _grpo_args(tiny_models["qwen2"], data, tmp_path / "out")
    assert main(["plan", *args[1:], "--budget-mb", "1000"]) == 0
    assert "generation" in capsys.readouterr().out


@pytest.mark.parametrize("row,message", [
    ({"prompt": "x"}, "needs 'prompt' and 'answer'"),
    ({"prompt": " ", "answer": "a"}, "'prompt' must be a non-empty string"),
    ({"prompt": "x", "answer": ["a"]}, "'answer' must be a string"),
])
def test_bad_grpo_rows_are_refused_with_file_line(tiny_models, tmp_path, capsys, row, message):
    from mesp_mlx.cli import main

    data = _write_prompts(tmp_path / "prompts", PROMPTS[:2] + [row])
    out = tmp_path / "out"
    assert main(_grpo_args(tiny_models["qwen2"], data, out)) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:3" in err and message in err and "Traceback" not in err
    assert not out.exists()


def test_a_reward_function_that_fails_is_refused_before_anything_is_written(tiny_models, tmp_path, capsys):
    from mesp_mlx.cli import main

    module = tmp_path / "bad_reward.py"
    module.write_text("def score(prompts, completions, answer, types=None):\n    return ['?' for _ in completions]\n")
    data = _write_prompts(tmp_path / "prompts")
    out = tmp_path / "out"
    args = _grpo_args(tiny_models["qwen2"], data, out)
    args[args.index("length:3,exact_match")] = f"{module}:score"
    args[args.index("1,2")] = "1"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not a number" in err and "prompt 0" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("method", ["mebp", "lcsb"])
def test_grpo_trains_under_every_method_with_a_backward(tiny_models, tmp_path, method):
    from mesp_mlx.cli import main
    from mesp_mlx.run.metrics import MetricsLog

    data = _write_prompts(tmp_path / "prompts")
    out = tmp_path / "out"
    assert main(_grpo_args(tiny_models["llama"], data, out, 2, "--method", method, "--stream-weights")) == 0
    records = MetricsLog.read(out / "metrics.jsonl")
    assert len(records) == 2 and all(r["generate_peak_mb"] > 0 for r in records)


def test_grpo_is_refused_under_mezo(tiny_models, tmp_path, capsys):
    from mesp_mlx.cli import main

    data = _write_prompts(tmp_path / "prompts")
    assert main(_grpo_args(tiny_models["llama"], data, tmp_path / "out", 2, "--method", "mezo")) == 2
    assert "MeZO has no backward" in capsys.readouterr().err


def test_the_plot_carries_each_objectives_figures(tmp_path):
    from mesp_mlx.run.metrics import objective_series, plot_metrics

    base = {"loss": 1.0, "learning_rate": 1e-4, "peak_mb": 10.0, "active_mb": 5.0}
    grpo = [{**base, "step": 1, "reward_mean": 0.2, "val_reward_at_start": 0.1},
            {**base, "step": 2, "reward_mean": 0.4, "val_reward": 0.3}]
    assert objective_series(grpo) == {"reward (sampled completions)": [(1, 0.2), (2, 0.4)],
                                      "held-out reward (greedy)": [(0, 0.1), (2, 0.3)]}
    dpo = [{**base, "step": 1, "reward_margin": 0.0, "reward_accuracy": 0.5}]
    assert set(objective_series(dpo)) == {"reward margin (chosen - rejected)", "reward accuracy"}
    assert objective_series([{**base, "step": 1}]) == {}  # SFT: two panels as before
    for records in (grpo, dpo):
        assert plot_metrics(records, tmp_path / "m.png").stat().st_size > 1000


@pytest.mark.parametrize("name", ["dpo", "grpo"])
def test_objectives_with_lanes_streaming_and_accumulation(tiny_models, name):
    """Two lanes, streamed weights, two accumulated micro-batches: the update is the mean of the two batches'
    whole-model autodiff gradients (SGD, learning rate 1)."""
    import mlx.optimizers as optim

    from mesp_mlx.objectives import DPO
    from test_preference import _pair_batch, _plain_dpo

    model, streamer = _prepared(tiny_models["qwen2"], stream=True)
    to_mesp_lora(model)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape, key=mx.random.key(5))
    if name == "dpo":
        objective, batches = DPO(0.5, "sigmoid"), [_pair_batch(384, seed=2), _pair_batch(384, seed=4)]
        plain = lambda m, b: _plain_dpo(m, b, 0.5, "sigmoid")  # noqa: E731
    else:
        objective, batches = GRPO(0.2, 0.1, 0.05, "grpo"), [_rollout(384, seed=3), _rollout(384, old=True, seed=4)]
        plain = lambda m, b: _plain_grpo(m, b, 0.2, 0.1, 0.05, "grpo", "token", 16)  # noqa: E731
    before = flat(model.trainable_parameters())
    want = [flat(nn.value_and_grad(model, plain)(model, b)[1]) for b in batches]
    parts = ModelParts(model, streamer=streamer)
    engine = BlockEngine(parts, make_method("mesp"), [optim.SGD(learning_rate=1.0) for _ in parts.layers],
                         streamer=streamer, objective=objective, accumulation=2, lanes=2)
    for step, batch in enumerate(batches, start=1):
        engine.step(batch, step)
    after = flat(model.trainable_parameters())
    for k in want[0]:
        expected = (want[0][k] + want[1][k]) / 2
        assert max_rel_err(before[k] - after[k], expected) <= 1e-5, k


def test_generation_rows_come_first_and_fit_the_room():
    from mesp_mlx.plan.generation import GenerationCost
    from mesp_mlx.plan.memory import PlanResult, reserve_generation

    components = {"frozen weights": 100.0, "LoRA": 10.0, "optimizer": 20.0, "checkpoints": 50.0,
                  "block forward": 5.0, "block backward": 8.0, "loss": 4.0, "generation": 0.0}
    plan = PlanResult({"batch_size": 32}, dict(components), generation=GenerationCost(100.0, 25.0))
    reserve_generation(plan, 400.0)  # 400 - 130 resident = 270 = 100 + 6.8 rows: 6 rows
    assert plan.generation_rows == 6 and plan.components_mb["generation"] == 250.0
    assert plan.peak_mb == 130.0 + 250.0  # the generation is the phase that sets the peak
    reserve_generation(plan, None)  # no budget: every row at once
    assert plan.generation_rows == 32
    reserve_generation(plan, 150.0)  # too little room: one row (the plan then reports it over)
    assert plan.generation_rows == 1
