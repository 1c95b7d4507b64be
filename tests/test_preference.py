"""Preference objectives on the block engine: DPO (sigmoid, hinge, IPO) and ORPO gradients equal autodiff of a plain
whole-model implementation (fp32, rel <= 1e-5) under mesp and mebp, with streaming and accumulation."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from conftest import flat, max_rel_err
from mesp_mlx.engine import Batch, BlockEngine
from mesp_mlx.methods import make_method
from mesp_mlx.methods.mesp import to_mesp_lora
from mesp_mlx.models import ModelParts
from mesp_mlx.objectives import DPO, ORPO, adapters_off
from test_engine import _prepared


def _pair_batch(vocab, seed=2):
    """2 pairs: rows 0-1 chosen, rows 2-3 rejected; prompts of 4 and 6 tokens, padding on rows 1 and 3."""
    mx.random.seed(seed)
    tokens = mx.random.randint(0, vocab, (4, 17))
    prompt = mx.array([4, 6, 4, 6])[:, None]
    length = mx.array([17, 12, 15, 17])[:, None]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    t = mx.arange(1, 17)[None]  # target k predicts token k + 1
    mask = mx.logical_and(t >= prompt, t < length)
    return Batch(inputs, targets, mask)


def _plain_scores(model, batch, mean, clip=False):
    """Per-row response log-probability sums (or means) from the whole model's logits: mlx-lm-lora's get_logps."""
    logits = model(batch.inputs).astype(mx.float32)
    logp = -nn.losses.cross_entropy(logits, batch.targets, reduction="none")
    if clip:
        logp = mx.clip(logp, -1000.0, 0.0)
    mask = batch.mask.astype(mx.float32)
    sums = (logp * mask).sum(-1)
    return sums / mask.sum(-1) if mean else sums


def _plain_dpo(model, batch, beta, loss_type):
    with adapters_off(model):
        ref = mx.stop_gradient(_plain_scores(model, batch, loss_type == "ipo"))
    pol = _plain_scores(model, batch, loss_type == "ipo")
    z = (pol[:2] - pol[2:]) - (ref[:2] - ref[2:])
    if loss_type == "sigmoid":
        return (-nn.log_sigmoid(beta * z)).mean()
    if loss_type == "hinge":
        return nn.relu(1 - beta * z).mean()
    return ((z - 1 / (2 * beta)) ** 2).mean()


def _plain_orpo(model, batch, beta):
    s = _plain_scores(model, batch, True, clip=True)
    c, r = s[:2], s[2:]
    lo = (c - r) - (mx.log(-mx.expm1(c)) - mx.log(-mx.expm1(r)))
    return (-c - beta * nn.log_sigmoid(lo)).mean()


def _engine_grads(model, batch, objective, method, streamer=None, by_rows=True):
    engine = BlockEngine(ModelParts(model, streamer=streamer), make_method(method), None, streamer=streamer,
                         objective=objective)
    assert engine._by_rows(batch)  # no dropout: the chosen rows, then the rejected rows (SFT's memory)
    if not by_rows:
        engine._by_rows = lambda b: False  # the whole batch at once (what a LoRA dropout needs)
    stats, grads = engine.step(batch, apply_update=False)
    out = {}
    for i, g in grads.items():
        out.update({f"model.layers.{i}.{k}": v for k, v in flat(g).items()})
    return stats, out


CASES = [("dpo", "sigmoid"), ("dpo", "hinge"), ("dpo", "ipo"), ("orpo", None)]


@pytest.mark.parametrize("by_rows", [True, False])
@pytest.mark.parametrize("method", ["mebp", "mesp"])
@pytest.mark.parametrize("name,loss_type", CASES)
def test_preference_gradients_equal_whole_model_autodiff(tiny_models, method, name, loss_type, by_rows):
    model, _ = _prepared(tiny_models["qwen2"])
    if method == "mesp":
        to_mesp_lora(model)
    batch = _pair_batch(384)
    beta = 0.5
    if name == "dpo":
        # a policy away from the reference, so the DPO terms are not all at their starting point
        objective, plain = DPO(beta, loss_type), lambda m, b: _plain_dpo(m, b, beta, loss_type)
    else:
        objective, plain = ORPO(beta), lambda m, b: _plain_orpo(m, b, beta)
    stats, grads = _engine_grads(model, batch, objective, method, by_rows=by_rows)
    loss, ref = nn.value_and_grad(model, plain)(model, batch)
    ref = flat(ref)
    assert abs(stats.loss - loss.item()) <= 1e-5 * max(abs(loss.item()), 1e-3)
    assert set(grads) == set(ref)
    for k in ref:
        assert max_rel_err(grads[k], ref[k]) <= 1e-5, (k, max_rel_err(grads[k], ref[k]))
    assert sum(mx.abs(g).max().item() for g in grads.values()) > 0  # a real gradient, not zeros on both sides
    assert {"reward_margin", "reward_accuracy"} <= set(stats.extra)


def test_the_reference_pass_is_the_base_model(tiny_models):
    """Adapters off = the model before LoRA: the LoRA branch contributes exactly nothing."""
    model, _ = _prepared(tiny_models["llama"])
    x = mx.array([[1, 2, 3, 4, 5]])
    with adapters_off(model):
        off = model(x)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.zeros_like(m.lora_b)
    assert mx.array_equal(off, model(x)).item()


PAIRS = [
    {"prompt": "what is the capital of france?", "chosen": "paris.", "rejected": "i do not know, maybe rome."},
    {"prompt": "say hello", "chosen": "hello!", "rejected": "no."},
    {"prompt": "two plus two?", "chosen": "four.", "rejected": "five, probably."},
    {"system": "be brief", "prompt": "colour of the sky?", "chosen": "blue.", "rejected": "it depends a lot on it."},
]


def _write_pairs(folder, rows=PAIRS):
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return folder


def _train_args(model, data, out, mode, iters=6, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--adapter-path", str(out), "--train-mode", mode,
            "--iters", str(iters), "--batch-size", "2", "--learning-rate", "5e-3", "--beta", "0.5", "--no-plot",
            "--steps-per-eval", "3", "--save-every", "2", "--optimizer", "adamw", *extra]


@pytest.mark.parametrize("mode", ["dpo", "orpo"])
def test_train_mode_runs_end_to_end_and_records_its_figures(tiny_models, tmp_path, mode, capsys):
    from mesp_mlx.cli import main
    from mesp_mlx.run.metrics import MetricsLog

    data = _write_pairs(tmp_path / "pairs")
    out = tmp_path / "out"
    assert main(_train_args(tiny_models["qwen2"], data, out, mode)) == 0
    records = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all("reward_margin" in r and "reward_accuracy" in r for r in records)
    assert "val_loss" in records[2] and "margin" in capsys.readouterr().out
    if mode == "dpo":  # at step 1 the policy is the reference (LoRA B = 0): z = 0, loss = log 2
        assert abs(records[0]["loss"] - 0.6931471805599453) < 1e-5 and records[0]["reward_margin"] == 0.0
        assert records[-1]["reward_margin"] > 0  # the policy moved towards the chosen responses


def test_a_preference_run_resumes_bit_identically(tiny_models, tmp_path):
    import mlx.core as mx

    from mesp_mlx.cli import main
    from mesp_mlx.run.metrics import MetricsLog

    data = _write_pairs(tmp_path / "pairs")
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(_train_args(tiny_models["llama"], data, ref, "dpo", 8)) == 0
    assert main(_train_args(tiny_models["llama"], data, out, "dpo", 4)) == 0
    assert main(_train_args(tiny_models["llama"], data, out, "dpo", 8, "--resume")) == 0
    got, want = mx.load(str(out / "adapters.safetensors")), mx.load(str(ref / "adapters.safetensors"))
    assert all(mx.array_equal(got[k], want[k]).item() for k in want)
    assert [r["loss"] for r in MetricsLog.read(out / "metrics.jsonl")] == \
        [r["loss"] for r in MetricsLog.read(ref / "metrics.jsonl")]


@pytest.mark.parametrize("row,message", [
    ({"prompt": "x", "chosen": "a"}, "needs 'chosen' and 'rejected'"),
    ({"prompt": "x", "chosen": "a", "rejected": "  "}, "empty 'rejected' response"),
    ({"chosen": "a", "rejected": "b"}, "must all be strings"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "share every message but the last"),
])
def test_bad_preference_rows_are_refused_with_file_line(tiny_models, tmp_path, capsys, row, message):
    from mesp_mlx.cli import main

    data = _write_pairs(tmp_path / "pairs", PAIRS[:2] + [row])
    out = tmp_path / "out"
    assert main(_train_args(tiny_models["qwen2"], data, out, "dpo")) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:3" in err and message in err and "Traceback" not in err
    assert not out.exists()


def test_dpo_reference_scores_are_computed_once_per_pair_and_saved(tiny_models, tmp_path, monkeypatch):
    """The reference policy never changes: each training pair's reference scores come from one forward (its first
    epoch), later epochs reuse them, and the run is the same as one that recomputes them every step."""
    from mesp_mlx.cli import main
    from mesp_mlx.io import load_tensors
    from mesp_mlx.objectives.base import SequenceObjective
    from mesp_mlx.run.metrics import MetricsLog

    data = _write_pairs(tmp_path / "pairs")
    calls = []
    plain = SequenceObjective.reference_scores

    def counted(self, engine, batch, step):
        calls.append(step)
        return plain(self, engine, batch, step)

    monkeypatch.setattr(SequenceObjective, "reference_scores", counted)
    args = ["--steps-per-eval", "0"]
    assert main(_train_args(tiny_models["qwen2"], data, tmp_path / "cached", "dpo", 6, *args)) == 0
    assert calls == [1, 2]  # 4 pairs in 2 batches: epoch 1 computes, epochs 2 and 3 reuse
    saved, _ = load_tensors(tmp_path / "cached" / "reference_scores.safetensors")
    assert sorted(saved["pair_ids"].tolist()) == [0, 1, 2, 3]
    monkeypatch.setattr(DPO, "reference_scores", plain)  # recomputed every step
    assert main(_train_args(tiny_models["qwen2"], data, tmp_path / "fresh", "dpo", 6, *args)) == 0
    assert len(calls) == 2 and not (tmp_path / "fresh" / "reference_scores.safetensors").exists()
    assert [r["loss"] for r in MetricsLog.read(tmp_path / "cached" / "metrics.jsonl")] == \
        [r["loss"] for r in MetricsLog.read(tmp_path / "fresh" / "metrics.jsonl")]


def test_the_plan_of_a_step_by_rows(tiny_models):
    """A preference step trains half its rows at a time: the plan's checkpoints are those of half the rows (SFT's
    for B rows), the scoring forward over all 2B rows is its own component, and the first half's gradients are held."""
    from mesp_mlx.run.config import TrainConfig
    from mesp_mlx.run.prepare import predict_lean

    common = dict(model=str(tiny_models["qwen2"]), data="x", optimizer="sgd", max_seq_length=64)
    sft = predict_lean(TrainConfig(batch_size=2, **common)).components_mb
    dpo = predict_lean(TrainConfig(batch_size=4, train_mode="dpo", **common)).components_mb  # 2 pairs = 4 rows
    assert dpo["checkpoints"] == pytest.approx(sft["checkpoints"])
    assert dpo["scoring"] > 0 and dpo["optimizer"] == pytest.approx(dpo["LoRA"])
    dropout = {"rank": 8, "scale": 20.0, "dropout": 0.1}  # a dropout: the whole batch at once
    whole = predict_lean(TrainConfig(batch_size=4, train_mode="dpo", lora_parameters=dropout, **common)).components_mb
    assert "scoring" not in whole and whole["checkpoints"] == pytest.approx(2 * sft["checkpoints"])
