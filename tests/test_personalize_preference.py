"""`personalize --preference-pairs`: the DPO pass after the fine-tune, preference accuracy on held-out pairs (checked
against a direct computation), and the refusals of bad pair files before anything is written."""

import json

import mlx.core as mx
import numpy as np
import pytest
from test_personalize import DIALOGUES

from mesp_mlx.cli import main
from mesp_mlx.data.datasets import DataError
from mesp_mlx.data.preference import load_pairs
from mesp_mlx.personalize.pipeline import load_for_inference, pair_batch_size
from mesp_mlx.personalize.preference import (
    held_out_indices,
    preference_accuracy,
    read_pair_rows,
)

PAIRS = [{"prompt": q, "chosen": a, "rejected": "no idea, sorry."} for q, a in DIALOGUES]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def personalize_args(tmp_path, model, pairs_file, *extra):
    stream = write_jsonl(tmp_path / "stream.jsonl", [{"prompt": q, "completion": a} for q, a in DIALOGUES * 2])
    held = write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": q, "completion": a} for q, a in DIALOGUES[:2]])
    return ["personalize", "--model", str(model), "--stream", str(stream), "--eval", str(held),
            "--out", str(tmp_path / "run"), "--preference-pairs", str(pairs_file), "--variants", "0",
            "--iters", "2", "--batch-size", "2", "--eval-max-tokens", "4", "--budget-mb", "400", *extra]


def test_sft_then_dpo_with_figures_before_and_after(tmp_path, tiny_models, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    rc = main(personalize_args(tmp_path, tiny_models["qwen2"], pairs, "--dpo-iters", "3", "--dpo-beta", "0.2",
                               "--preference-heldout", "0.4"))
    assert rc == 0
    out = tmp_path / "run"
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["status"] == "done" and report["train"]["steps"] == 2
    assert report["dpo"]["status"] == "done" and report["dpo"]["steps"] == 3 and report["status"] == "done"
    # 3 training pairs: a batch of 1, not 2 (which would drop the third pair every epoch)
    assert report["preference"] == {"pairs": 5, "train": 3, "held_out": 2, "beta": 0.2, "iters": 3, "batch_size": 1}
    for key in ("rouge1_before", "rouge1_after_sft", "rouge1_after_dpo", "rouge1_after"):
        assert 0 <= report[key] <= 1, key
    for key in ("preference_accuracy_before", "preference_accuracy_after_sft", "preference_accuracy_after_dpo"):
        assert report[key] in (0.0, 0.5, 1.0), key  # two held-out pairs
    assert report["rouge1_after"] == report["rouge1_after_dpo"]
    assert report["preference_accuracy_after"] == report["preference_accuracy_after_dpo"]
    # the split: the DPO pass trains on 3 pairs, the 2 others are measured
    train = [json.loads(x) for x in (out / "preference" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (out / "preference" / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 3 and len(held) == 2 and sorted(map(str, train + held)) == sorted(map(str, PAIRS))
    scores = [json.loads(x) for x in (out / "preference_evaluation.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in scores] == [h["prompt"] for h in held]
    for stage in ("before", "after_sft", "after_dpo"):
        assert report[f"preference_accuracy_{stage}"] == np.mean([s[f"margin_{stage}"] > 0 for s in scores])
    rows = [json.loads(x) for x in (out / "evaluation.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"reply", "reply_before", "reply_after_sft", "rouge1_after_sft"} <= set(rows[0])
    # the DPO pass started from the fine-tune's adapter (a fresh LoRA is the reference: margin 0 at step 1), moved it
    first = json.loads((out / "adapters_dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and abs(first["reward_margin"]) > 1e-6
    sft, dpo = (mx.load(str(out / d / "adapters.safetensors")) for d in ("adapters", "adapters_dpo"))
    assert set(sft) == set(dpo) and any(not mx.array_equal(sft[k], dpo[k]) for k in sft)
    log = capsys.readouterr().out
    assert log.index("preference accuracy before") < log.index("preference accuracy after the fine-tune") \
        < log.index("preference accuracy after the DPO pass")


def direct_logp(model, tokens, prompt_len):
    """Σ log p(token k | tokens before k) over the response tokens, from one forward of the whole sequence."""
    logits = model(mx.array(tokens)[None]).astype(mx.float32)[0]
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    return sum(float(logp[k - 1, tokens[k]]) for k in range(prompt_len, len(tokens)))


def test_preference_accuracy_equals_a_direct_computation(tmp_path, tiny_models):
    loaded = load_for_inference(str(tiny_models["qwen2"]))
    question, right, wrong = "what is the capital of france?", "paris.", "the capital is lyon, i think."
    rows = [{"prompt": question, "chosen": right, "rejected": wrong},
            {"prompt": question, "chosen": wrong, "rejected": right},  # the same pair swapped
            {"prompt": "hello", "chosen": "hi there, how are you today?", "rejected": "go away"}]
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows), loaded.tokenizer).pairs
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    assert pairs[0][0][:pairs[0][2]].tolist() == list(prompt)  # prompt tokens, then the response's
    got = preference_accuracy(loaded.model, pairs, 256)
    margins = [direct_logp(loaded.model, c.tolist(), p) - direct_logp(loaded.model, r.tolist(), p) for c, r, p in pairs]
    np.testing.assert_allclose(got["margins"], margins, rtol=1e-4, atol=1e-3)
    assert margins[0] == pytest.approx(-margins[1], abs=1e-3) and abs(margins[0]) > 1e-2  # a pair and its swap
    assert got["accuracy"] == pytest.approx(np.mean([m > 0 for m in margins]))
    assert got["accuracy"] in (1 / 3, 2 / 3)  # exactly one of the swapped pair counts


def test_dpo_batch_divides_the_pairs():
    assert [pair_batch_size(4, n) for n in (1, 2, 3, 4, 6, 7, 8, 9)] == [1, 2, 3, 4, 3, 1, 4, 3]


def test_held_out_share():
    assert held_out_indices(2, 0.2, 0) in ([0], [1])
    assert len(held_out_indices(10, 0.2, 0)) == 2 and len(held_out_indices(3, 0.9, 0)) == 2  # at most n - 1
    assert held_out_indices(10, 0.3, 5) == held_out_indices(10, 0.3, 5)


@pytest.mark.parametrize("bad, where, message", [
    ('{"prompt": "q", "chosen": "a"}', 2, "needs 'chosen' and 'rejected'"),
    ('{"prompt": "q", "chosen": "a", "rejected": "  "}', 2, "empty 'rejected' response"),
    ('{"prompt": "q", "chosen": "a", "rejected": ', 2, "malformed JSON"),
])
def test_a_bad_pair_row_is_refused_with_file_line_before_anything_is_written(tmp_path, tiny_models, capsys, bad,
                                                                               where, message):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], bad, PAIRS[1]])
    assert main(personalize_args(tmp_path, tiny_models["qwen2"], pairs)) == 2
    err = capsys.readouterr().err
    assert f"pairs.jsonl:{where}: " in err and message in err
    assert not (tmp_path / "run").exists()


def test_fewer_than_two_pairs_are_refused(tmp_path, tiny_models, capsys):
    one = write_jsonl(tmp_path / "one.jsonl", [PAIRS[0]])
    assert main(personalize_args(tmp_path, tiny_models["qwen2"], one)) == 2
    assert "1 preference pair(s); --preference-pairs needs at least 2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(DataError, match="0 preference pair"):
        read_pair_rows(write_jsonl(tmp_path / "blank.jsonl", [""]))


@pytest.mark.parametrize("flag, value, message", [
    ("--preference-heldout", "1", "--preference-heldout must be in (0, 1)"),
    ("--dpo-beta", "nan", "--dpo-beta must be a finite number > 0"),
    ("--dpo-iters", "0", "--dpo-iters must be >= 1"),
    ("--method", "mezo", "train mode dpo: MeZO has no backward"),
])
def test_bad_preference_settings_are_refused(tmp_path, tiny_models, capsys, flag, value, message):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert main(personalize_args(tmp_path, tiny_models["qwen2"], pairs, flag, value)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
