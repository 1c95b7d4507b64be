"""--train-all-turns (issue 33, item 5): a chat's loss covers every assistant message, not only the last (mlx-lm's
--mask-prompt). Checked: the mask is exactly the assistant messages' tokens, its last turn is mlx-lm's mask_prompt
mask (reference: mlx-lm's ChatDataset on each prefix of the chat that ends on an assistant message), completions data
is --mask-prompt's, a template that does not render a chat's start as a prefix is refused with file:line; the engine's
LoRA gradients under MeSP and MeBP equal autodiff of the whole model's masked cross-entropy; `train` runs with it,
evaluates valid.jsonl with the same mask and keeps it across --resume; text data and other train modes are refused."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.tuner.datasets import ChatDataset
from mlx_lm.utils import load_tokenizer

from conftest import flat, masked_ce, max_rel_err
from mesp_mlx.cli import main
from mesp_mlx.data.datasets import BatchIterator, DataError, assistant_spans, load_splits
from mesp_mlx.engine import Batch
from mesp_mlx.methods.mesp import to_mesp_lora
from mesp_mlx.run.metrics import MetricsLog
from test_engine import _engine_grads, _prepared


def _chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


DIALOGUES = [
    _chat(("system", "be kind"), ("user", "hello, how are you today?"), ("assistant", "i am fine, thank you."),
          ("user", "what is the capital of france?"), ("assistant", "paris is the capital of france.")),
    _chat(("user", "the quick brown fox"), ("assistant", "jumps over"), ("user", "and then?"),
          ("assistant", "the lazy dog.")),
    # ends on a user turn: its tail is not trained (--mask-prompt would train that last user message)
    _chat(("user", "hello"), ("assistant", "hello, how are you today?"), ("user", "i am fine, thank you.")),
]
ASSISTANT_TEXT = ["i am fine, thank you.<|im_end|>\nparis is the capital of france.<|im_end|>\n",
                  "jumps over<|im_end|>\nthe lazy dog.<|im_end|>\n", "hello, how are you today?<|im_end|>\n"]


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return load_tokenizer(Path(tiny_models["qwen2"]))


def _write(folder: Path, records, valid=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if valid is not None:
        (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid))
    return folder


def _one_batch(examples, size=None) -> Batch:
    """The batch of all `examples` (BatchIterator: mlx-lm's, the cuts out of its mask), rows in file order (mlx-lm
    sorts by itemlen, a stable sort, and every record here has one key)."""
    item = next(BatchIterator(examples, size or len(examples), 2048))
    return item if isinstance(item, Batch) else Batch.from_mlx_lm(*item)


def reference_mask(tokenizer, record: dict, width: int) -> np.ndarray:
    """[width] mask over target positions from mlx-lm alone: each assistant message's tokens as mlx-lm's ChatDataset
    with mask_prompt finds them for the chat cut after it ([offset, len) of that prefix), and for the whole chat
    ending on an assistant message mlx-lm's own mask (default_loss's: offset <= t + 1 <= length)."""
    messages = record["messages"]
    mlx_lm = ChatDataset([], tokenizer, mask_prompt=True)
    tokens, _ = mlx_lm.process(record)
    mask = np.zeros(width, dtype=bool)
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            prefix, offset = mlx_lm.process({"messages": messages[:k + 1]})
            assert prefix == tokens[:len(prefix)]
            mask[offset - 1:len(prefix) - 1] = True  # token i is the target at position i - 1
    if messages[-1]["role"] == "assistant":
        steps = np.arange(1, width + 1)
        mask |= (steps >= mlx_lm.process(record)[1]) & (steps <= len(tokens))
    return mask


# --- (1) the mask: every assistant message, the last one as mlx-lm's mask_prompt ----------------------------------------
def test_the_mask_covers_every_assistant_message(tokenizer, tmp_path):
    examples = load_splits(_write(tmp_path / "d", DIALOGUES), tokenizer, all_turns=True)["train"]
    assert examples.has_cuts
    batch = _one_batch(examples)
    mask, targets = np.array(batch.mask), np.array(batch.targets)
    for row, record in enumerate(DIALOGUES):
        tokens, offset = examples[row]
        assert np.array_equal(mask[row], reference_mask(tokenizer, record, mask.shape[1])), row
        real = mask[row, :len(tokens) - 1]  # the targets that are tokens of the chat (not padding)
        assert tokenizer.decode(targets[row, :len(tokens) - 1][real].tolist()) == ASSISTANT_TEXT[row]
        spans = assistant_spans(tokenizer, record["messages"], None, tokens.tolist(), "here")
        assert [tokenizer.decode(tokens[a:b].tolist()) for a, b in spans] == \
            [m["content"] + "<|im_end|>\n" for m in record["messages"] if m["role"] == "assistant"]
        assert offset == spans[0][0]


def test_the_last_turn_is_mlx_lms_mask_prompt(tokenizer, tmp_path):
    """From the last assistant message's start on, the mask is mlx-lm's mask_prompt mask (its extra target after the
    end included); a one-turn chat's whole mask is, and completions data gives --mask-prompt's batches as they are."""
    records = DIALOGUES[:2] + [_chat(("user", "hello"), ("assistant", "i am fine, thank you."))]
    ours = _one_batch(load_splits(_write(tmp_path / "d", records), tokenizer, all_turns=True)["train"])
    masked = load_splits(tmp_path / "d", tokenizer, mask_prompt=True)["train"]
    theirs = _one_batch(masked)
    for row in range(len(records)):
        last = masked[row][1]  # mlx-lm's offset: where the last assistant message starts
        assert np.array_equal(np.array(ours.mask[row, last - 1:]), np.array(theirs.mask[row, last - 1:])), row
    assert np.array_equal(np.array(ours.mask[2]), np.array(theirs.mask[2]))
    completions = [{"prompt": "hello", "completion": "i am fine"}, {"prompt": "the quick", "completion": "brown fox"}]
    folder = _write(tmp_path / "c", completions)
    all_turns, masked = (load_splits(folder, tokenizer, **kw)["train"] for kw in ({"all_turns": True},
                                                                                  {"mask_prompt": True}))
    assert not all_turns.has_cuts
    a, b = next(BatchIterator(all_turns, 2, 2048)), next(BatchIterator(masked, 2, 2048))
    assert isinstance(a, tuple) and all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(a, b))


def test_a_template_that_is_not_prefix_consistent_is_refused(tiny_models, tmp_path):
    tokenizer = load_tokenizer(Path(tiny_models["qwen2"]))
    # the chat's first line counts its messages: the first k messages are not rendered as the whole chat's start
    tokenizer._tokenizer.chat_template = "{{ messages|length }}\n" + tokenizer._tokenizer.chat_template
    folder = _write(tmp_path / "d", DIALOGUES[:1])
    with pytest.raises(DataError, match=r"train\.jsonl:1: --train-all-turns: the chat template does not render"):
        load_splits(folder, tokenizer, all_turns=True)
    assert len(load_splits(folder, tokenizer, mask_prompt=True)["train"]) == 1  # the last turn alone still works


def test_a_chat_without_an_assistant_message_is_refused(tokenizer, tmp_path):
    folder = _write(tmp_path / "d", [DIALOGUES[0], _chat(("system", "be kind"), ("user", "hello"))])
    with pytest.raises(DataError, match=r"train\.jsonl:2: --train-all-turns: no assistant message"):
        load_splits(folder, tokenizer, all_turns=True)


# --- (2) the engine's gradients with this mask = autodiff of the whole model's masked cross-entropy --------------------
@pytest.mark.parametrize("method", ["mesp", "mebp"])
def test_gradients_equal_whole_model_autodiff(tiny_models, tokenizer, tmp_path, method):
    examples = load_splits(_write(tmp_path / "d", DIALOGUES), tokenizer, all_turns=True)["train"]
    batch = _one_batch(examples)
    reference = Batch(batch.inputs, batch.targets, mx.array(np.stack(
        [reference_mask(tokenizer, r, batch.mask.shape[1]) for r in DIALOGUES])))
    model, _ = _prepared(tiny_models["qwen2"])
    if method == "mesp":
        to_mesp_lora(model)
    stats, grads = _engine_grads(model, batch, method=method)
    loss, ref = nn.value_and_grad(model, masked_ce)(model, reference)
    ref = flat(ref)
    assert stats.ntoks == int(reference.mask.sum().item())
    assert abs(stats.loss - loss.item()) <= 1e-5 * abs(loss.item())
    assert set(grads) == set(ref)
    for k in ref:
        assert max_rel_err(grads[k], ref[k]) <= 1e-5, k


# --- (3) `train` with it: every turn's tokens, valid.jsonl with the same mask, kept across --resume -------------------
def test_train_with_every_turn_and_resume(tiny_models, tokenizer, tmp_path, capsys):
    data = _write(tmp_path / "d", DIALOGUES, valid=DIALOGUES)
    counted = [int(reference_mask(tokenizer, r, 256).sum()) for r in DIALOGUES]
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train_all_turns: true\n")
    base = ["train", "--model", str(tiny_models["qwen2"]), "--data", str(data), "--adapter-path", str(out),
            "--batch-size", "3", "--no-plot", "--save-every", "1", "--steps-per-eval", "1", "--val-batches", "-1",
            "--learning-rate", "1e-3"]
    assert main([*base, "--iters", "1", "--train-all-turns"]) == 0
    first = MetricsLog.read(out / "metrics.jsonl")
    assert first[0]["tokens"] == first[0]["val_tokens"] == sum(counted)  # one batch of the three chats, each turn
    assert json.loads((out / "adapter_config.json").read_text())["train_all_turns"] is True
    assert main([*base, "--iters", "2", "--resume"]) == 2  # without it: another run's settings
    assert "train_all_turns: True -> False" in capsys.readouterr().err
    assert main([*base, "--iters", "2", "--resume", "-c", str(recipe)]) == 0  # the YAML key
    records = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[1]["tokens"] == sum(counted)


# --- (4) refused: text data (no turns), other train modes ---------------------------------------------------------------
def test_text_data_and_other_train_modes_are_refused(tiny_models, tmp_path, capsys):
    data = _write(tmp_path / "d", [{"text": "the quick brown fox"}, {"text": "jumps over the lazy dog"}])
    base = ["train", "--model", str(tiny_models["qwen2"]), "--iters", "1", "--no-plot", "--train-all-turns",
            "--adapter-path", str(tmp_path / "out")]
    assert main([*base, "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"{data / 'train.jsonl'}: --train-all-turns needs chat or completions data (text has no turns)" in err
    assert main([*base, "--data", str(data), "--train-mode", "dpo"]) == 2
    assert "--train-all-turns: trains next-token targets (--train-mode sft)" in capsys.readouterr().err
