"""Personalization pipeline: scores on hand-checkable inputs, the byte-bounded buffer and its policies, annotation,
self-synthesis's filter, the stream format, and the whole pipeline on a tiny model."""

import json
import math

import numpy as np
import pytest

from mesp_mlx.data.datasets import DataError
from mesp_mlx.personalize import annotate as ann
from mesp_mlx.personalize import generation
from mesp_mlx.personalize.buffer import Candidate, SelectionBuffer, make_policy
from mesp_mlx.personalize.scores import (GENERAL, default_lexicon_dir, dominant_domain, dss, eoe, idd, load_lexicons,
                                         rouge1, unit, words)
from mesp_mlx.personalize.stream import read_dialogues

LEX = {"food": frozenset({"apple", "bread"}), "health": frozenset({"heart", "doctor"})}


# ---- scores ----

def test_eoe_by_hand():
    assert eoe([1, 1, 2, 2]) == pytest.approx(math.log(2) / math.log(4))  # 0.5
    assert eoe([1, 2, 3, 4]) == pytest.approx(1.0)
    assert eoe([7, 7, 7]) == 0.0
    assert eoe([5]) == 0.0 and eoe([]) == 0.0
    p = [3 / 6, 2 / 6, 1 / 6]  # ids 1,1,1,2,2,3
    assert eoe([1, 1, 1, 2, 2, 3]) == pytest.approx(-sum(x * math.log(x) for x in p) / math.log(6))


def test_dss_and_domain_by_hand():
    w = words("The heart doctor!")
    assert w == ["the", "heart", "doctor"]
    assert dss(w, LEX) == pytest.approx((0 / 3 + 2 / 3) / 2)
    assert dominant_domain(w, LEX) == "health"
    assert dominant_domain(words("apple heart"), LEX) == "food"  # a tie goes to the first name
    assert dominant_domain(words("nothing here"), LEX) == GENERAL
    assert dss([], LEX) == 0.0


def test_idd_by_hand():
    e = unit(np.array([1.0, 0.0]))
    same = np.stack([unit(np.array([0.0, 1.0])), unit(np.array([0.6, 0.8]))])
    assert idd(e, same) == pytest.approx(0.4)
    assert idd(e, np.zeros((0, 2))) == 1.0
    assert idd(e, e[None]) == pytest.approx(0.0)


def test_rouge1_by_hand():
    assert rouge1("the cat sat", "The cat ran away.") == pytest.approx(4 / 7)
    assert rouge1("a a a", "a") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))  # clipped counts
    assert rouge1("", "x") == 0.0 and rouge1("x y", "x y") == 1.0


def test_shipped_lexicons_have_provenance():
    lex = load_lexicons()
    assert len(lex) >= 8 and all(len(v) >= 30 for v in lex.values())
    assert "Provenance" in (default_lexicon_dir() / "README.md").read_text()
    assert dominant_domain(words("My laptop screen is black after the driver update"), lex) == "technology"


def test_lexicon_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no lexicon files"):
        load_lexicons(tmp_path)
    (tmp_path / "x.txt").write_text("# only a comment\n")
    with pytest.raises(ValueError, match="empty"):
        load_lexicons(tmp_path)


# ---- buffer ----

def cand(i, eoe_=0.5, dss_=0.1, emb=None, domain="d", size=100):
    emb = unit(np.asarray(emb if emb is not None else np.random.default_rng(i).normal(size=8))).astype(np.float16)
    text = "x" * (size - emb.nbytes - len(domain))
    return Candidate(index=i, prompt=text, response=None, domain=domain, embedding=emb, eoe=eoe_, dss=dss_)


def random_stream(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return [cand(i, float(rng.uniform()), float(rng.uniform()), rng.normal(size=8), f"d{rng.integers(3)}",
                 int(rng.integers(40, 160))) for i in range(n)]


@pytest.mark.parametrize("policy", ["quality", "random", "fifo", "kcenter"])
def test_buffer_never_exceeds_its_size(policy):
    buf = SelectionBuffer(1000, make_policy(policy, seed=1))
    for c in random_stream():
        buf.offer(c)
        assert buf.used <= buf.capacity
        assert buf.used == sum(x.nbytes for x in buf.items)
    assert buf.items and buf.evicted > 0
    assert not buf.offer(cand(999, size=1001))  # larger than the whole buffer: refused
    assert buf.used <= buf.capacity


@pytest.mark.parametrize("policy", ["quality", "random", "fifo", "kcenter"])
def test_replacement_is_deterministic(policy):
    def kept(seed):
        buf = SelectionBuffer(1000, make_policy(policy, seed=seed))
        for c in random_stream():
            buf.offer(c)
        return [c.index for c in buf.items]

    assert kept(3) == kept(3)
    if policy == "random":
        assert kept(3) != kept(4)


def test_quality_rule_by_hand():
    buf = SelectionBuffer(200, make_policy("quality"))
    a = cand(0, eoe_=0.5, dss_=0.1, emb=[1, 0, 0, 0])
    b = cand(1, eoe_=0.9, dss_=0.3, emb=[0, 1, 0, 0])
    assert buf.offer(a) and buf.offer(b)  # admitted while they fit
    assert [c.idd for c in buf.items] == [pytest.approx(1.0), pytest.approx(1.0)]  # orthogonal: nothing alike
    weak = cand(2, eoe_=0.4, dss_=0.05, emb=[0, 0, 1, 0])  # better only on IDD (1 vs 1: not better) -> beats none
    assert not buf.offer(weak)
    c = cand(3, eoe_=0.6, dss_=0.2, emb=[0, 0, 0, 1])  # beats a on EOE and DSS, not b
    assert buf.offer(c)
    assert [x.index for x in buf.items] == [1, 3]
    dup = cand(4, eoe_=0.95, dss_=0.05, emb=[0, 0, 0, 1])  # a repeat of c (cosine 1): counted on c, not stored
    assert not buf.offer(dup)
    assert dup.idd == pytest.approx(0.0) and buf.items[1].seen == 2 and buf.repeats == 1
    other = cand(5, eoe_=0.5, dss_=0.05, emb=[0, 0, 0.9, 0.44])  # cosine 0.44 to c: not a repeat
    assert not buf.offer(other) and buf.repeats == 1  # beats nothing (c is protected, b is stronger)


def test_quality_counts_repeats_and_protects_them():
    buf = SelectionBuffer(200, make_policy("quality"))
    for i in range(3):
        buf.offer(cand(i, eoe_=0.5, dss_=0.1, emb=[1, 0, 0, 0]))  # the same dialogue three times
    assert len(buf.items) == 1 and buf.items[0].seen == 3
    assert buf.offer(cand(3, eoe_=0.4, dss_=0.1, emb=[0, 1, 0, 0]))  # room left: admitted
    assert buf.offer(cand(5, eoe_=0.9, dss_=0.9, emb=[0, 0, 1, 0]))  # beats both on scores: only the one seen once goes
    assert [(c.index, c.seen) for c in buf.items] == [(0, 3), (5, 1)]


def test_fifo_and_kcenter_by_hand():
    fifo = SelectionBuffer(200, make_policy("fifo"))
    for i in range(3):
        fifo.offer(cand(i))
    assert [c.index for c in fifo.items] == [1, 2]
    kc = SelectionBuffer(200, make_policy("kcenter"))
    kc.offer(cand(0, emb=[1, 0, 0, 0]))
    kc.offer(cand(1, emb=[0.99, 0.14, 0, 0]))  # almost the same as 0
    assert kc.offer(cand(2, emb=[0, 0, 1, 0]))  # far from both: one of the close pair goes (the newer)
    assert [c.index for c in kc.items] == [0, 2]
    assert not kc.offer(cand(3, emb=[0, 0, 1, 0.01]))  # redundant with 2 and newer: refused


# ---- annotation ----

def test_annotation_picks_unanswered_then_strongest_and_asks_at_most_k(tmp_path):
    items = [cand(0, eoe_=0.9), cand(1, eoe_=0.2), cand(2, eoe_=0.5)]
    for c, r in zip(items, ["r0", None, "r2"]):
        c.response = r
    assert [c.index for c in ann.pick_for_annotation(items, 2)] == [1, 0]
    asked = []
    changed = ann.annotate(items, 2, lambda item: asked.append(item.index) or f"new{item.index}")
    assert asked == [1, 0] and [c.response for c in items] == ["new0", "new1", "r2"] and len(changed) == 2

    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"prompt": items[2].prompt, "response": "from file"}) + "\n")
    ann.annotate(items, 5, ann.file_annotator(f))
    assert items[2].response == "from file"
    f.write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:1: .*'prompt' and 'response'"):
        ann.read_annotations(f)

    shown, answers = [], iter(["typed answer", ""])
    ask = ann.interactive_annotator(lambda _: next(answers), shown.append)
    assert ask(items[0]) == "typed answer" and ask(items[1]) is None  # Enter keeps the current one
    assert items[0].prompt in shown[0]


# ---- stream format ----

def test_stream_formats_and_errors(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text("\n".join([
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "hello"}]}),
        json.dumps({"prompt": "q", "completion": "a"}),
        json.dumps({"prompt": "waiting"}),
    ]) + "\n")
    d = read_dialogues(f)
    assert [(x.prompt, x.response) for x in d] == [("hi", "hello"), ("q", "a"), ("waiting", None)]
    assert d[2].source.endswith("s.jsonl:3")
    with pytest.raises(DataError, match=r"s.jsonl:3: .*needs a response"):
        read_dialogues(f, need_response=True)
    f.write_text('{"messages": [{"role": "assistant", "content": "a"}]}\n')
    with pytest.raises(DataError, match=r"s.jsonl:1: the dialogue has no user turn"):
        read_dialogues(f)
    f.write_text('{"messages": [}\n')
    with pytest.raises(DataError, match=r"s.jsonl:1: malformed JSON"):
        read_dialogues(f)


# ---- self-synthesis filter ----

def test_paraphrase_filter(monkeypatch):
    outputs = iter(["Rewritten message: what is the capital of France?",  # a copy once the label is cleaned: dropped
                    "\"Which city is the capital of France?\"",  # kept
                    "Bananas are yellow.",  # ROUGE-1 0: drifted, dropped
                    "The rewritten message is: capital of France?",  # talks about the task: dropped
                    "which city is the capital of france",  # the same as the kept one: dropped
                    "Tell me the capital city of France."])  # kept
    calls = []

    def fake_batch(model, tokenizer, prompts, max_tokens, sampler=None):
        calls.append(len(prompts))
        return [next(outputs) for _ in prompts]

    monkeypatch.setattr(generation, "generate_batch", fake_batch)
    got = generation.paraphrase_all(None, None, ["What is the capital of France?"], n=2, seed=0, min_rouge=0.3,
                                    rounds=6)
    assert got == [["Which city is the capital of France?", "Tell me the capital city of France."]]
    assert calls == [2, 1, 1, 1, 1]  # each round asks only for what is still missing; none once all are in


# ---- the pipeline ----

DIALOGUES = [("hello, how are you today?", "i am fine, thank you."),
             ("what is the capital of france?", "paris is the capital of france."),
             ("what do low rank adapters do?", "low rank adapters fine tune large language models."),
             ("how much memory do phones have?", "a small model learns to answer questions about memory."),
             ("tell me about the quick brown fox", "the quick brown fox jumps over the lazy dog.")]


def test_personalize_end_to_end_on_a_tiny_model(tmp_path, tiny_models):
    from mesp_mlx.cli import main

    stream, held = tmp_path / "stream.jsonl", tmp_path / "heldout.jsonl"
    rows = [DIALOGUES[i % 5] for i in range(24)]
    stream.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": a}]}) + "\n"
                              for q, a in rows) + json.dumps({"prompt": "an unanswered question"}) + "\n")
    held.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in DIALOGUES[:2]))
    notes = tmp_path / "answers.jsonl"
    notes.write_text(json.dumps({"prompt": "an unanswered question", "response": "the user's answer"}) + "\n")
    out = tmp_path / "run"
    rc = main(["personalize", "--model", str(tiny_models["qwen2"]), "--stream", str(stream), "--eval", str(held),
               "--out", str(out), "--buffer-kb", "2.5", "--annotate-k", "2", "--annotations", str(notes),
               "--variants", "1", "--synth-min-rouge", "0", "--iters", "2", "--batch-size", "2",
               "--eval-max-tokens", "4", "--budget-mb", "400"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    sel = report["selection"]
    assert sel["used_bytes"] <= 2.5 * 1024 and 0 < sel["items"] < 25
    kept = [json.loads(x) for x in (out / "buffer.jsonl").read_text().splitlines()]
    assert len(kept) == sel["items"] and sum(k["bytes"] for k in kept) == sel["used_bytes"]
    assert sel["distinct_prompts"] == len({k["prompt"] for k in kept})
    train = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(train) == report["train_examples"] == sum(k["response"] is not None or
                                                          k["prompt"] == "an unanswered question"
                                                          for k in kept) + report["synthesis"]["kept"]
    assert report["train"]["status"] == "done" and report["train"]["steps"] == 2
    assert 0 <= report["rouge1_before"] <= 1 and 0 <= report["rouge1_after"] <= 1
    assert (out / "adapters" / "adapters.safetensors").is_file()
    assert len((out / "evaluation.jsonl").read_text().splitlines()) == 2


def test_batched_embeddings_equal_one_by_one(tiny_models):
    from mesp_mlx.personalize.pipeline import load_for_inference

    loaded = load_for_inference(str(tiny_models["llama"]))
    enc = generation.TextEncoder(loaded.model, loaded.tokenizer)
    ids = [enc.tokens(q + " " + a) for q, a in DIALOGUES] + [enc.tokens("hi")]
    batched = enc.embed_many(ids, batch_size=4)
    for i, e in zip(ids, batched):
        np.testing.assert_allclose(e.astype(np.float32), enc.embed(i).astype(np.float32), atol=2e-3)
        assert abs(np.linalg.norm(e.astype(np.float32)) - 1) < 2e-3


def test_shakespeare_user_stream_is_one_characters_replies():
    from mesp_mlx.data.corpora import shakespeare_speeches, shakespeare_user_stream

    speeches = shakespeare_speeches("hamlet")
    assert ("HAMLET", "A little more than kin, and less than kind.") in speeches
    stream, held = shakespeare_user_stream("HAMLET", "hamlet", seed=0, held_out=10)
    assert len(held) == 10 and not set(held) & set(stream)
    hamlet = {text[:100] for who, text in speeches if who == "HAMLET"}
    assert all(reply[:100] in hamlet or any(h.startswith(reply) for h in hamlet) for _, reply in stream + held)
    assert shakespeare_user_stream("HAMLET", "hamlet", seed=0, held_out=10) == (stream, held)
    with pytest.raises(ValueError, match="too few"):
        shakespeare_user_stream("HAMLET", "hamlet", held_out=10_000)


def test_personalize_refuses_a_budget_that_cannot_fit_before_any_work(tmp_path, tiny_models, capsys):
    from mesp_mlx.cli import main

    stream = tmp_path / "stream.jsonl"
    stream.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in DIALOGUES))
    out = tmp_path / "run"
    rc = main(["personalize", "--model", str(tiny_models["qwen2"]), "--stream", str(stream), "--out", str(out),
               "--budget-mb", "0.5", "--batch-size", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "predicted to need" in err and "over the budget" in err
    assert not out.exists()


def test_chatterbot_user_stream_splits():
    from mesp_mlx.data.corpora import chatterbot_user_stream

    stream, held = chatterbot_user_stream(seed=0, held_out=30)  # time split: the last 30 are the future
    assert len(held) == 30 and len(stream) > 1000
    assert chatterbot_user_stream(seed=0, held_out=30) == (stream, held)
    stream, held = chatterbot_user_stream(seed=0, held_out=30, split="prompt")
    assert len({q for q, _ in held}) == 30 and not {q for q, _ in held} & {q for q, _ in stream}
