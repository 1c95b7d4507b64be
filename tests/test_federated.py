"""Federated personalization on Flower's deployment engine (a SuperLink and SuperNodes on localhost) with a tiny model:
2 devices x 2 rounds end to end, what the devices' messages carried, and a device failing mid-round."""

import json
import socket

import mlx.core as mx
import numpy as np
import pytest

from mesp_mlx.federated.device import Settings
from mesp_mlx.federated.launch import DeviceSpec
from mesp_mlx.federated.messages import PrivacyError, check_reply, reply_content
from mesp_mlx.federated.run import FederateError, federate

QA = [("hello, how are you today?", "i am fine, thank you."),
      ("what is the capital of france?", "paris is the capital of france."),
      ("what do low rank adapters do?", "low rank adapters fine tune large language models."),
      ("how much memory do phones have?", "a small model learns to answer questions about memory."),
      ("tell me about the quick brown fox", "the quick brown fox jumps over the lazy dog."),
      ("which river runs through london?", "the thames runs through london.")]
SETTINGS = dict(iters=2, batch_size=2, rank=4, buffer_kb=2.0, eval_max_tokens=4)


def devices(tmp_path, fail_at_round=0):
    out = []
    for i, (profile, budget) in enumerate([("iphone-17-pro", None), (None, 300.0)]):
        folder = tmp_path / f"user{i}"
        folder.mkdir()
        own = QA[3 * i:3 * i + 3]  # each user has their own dialogues
        rows = [own[j % 3] for j in range(9)]
        (folder / "stream.jsonl").write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n"
                                                     for q, a in rows))
        (folder / "heldout.jsonl").write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n"
                                                      for q, a in own[:2]))
        out.append(DeviceSpec(folder, profile, budget, fail_at_round if i == 1 else 0))
    return out


def raw_texts():
    return [t for qa in QA for t in qa]


def test_two_devices_two_rounds_on_flower(tmp_path, tiny_models, capsys):
    from mesp_mlx.cli import main

    out = tmp_path / "fed"
    d = devices(tmp_path)
    rc = main(["federate", "--device", f"{d[0].folder}:iphone-17-pro", "--device", f"{d[1].folder}:300",
               "--model", str(tiny_models["qwen2"]), "--out", str(out), "--rounds", "2", "--iters", "2",
               "--batch-size", "2", "--rank", "4", "--buffer-kb", "2", "--eval-max-tokens", "4", "--timeout", "300"])
    assert rc == 0
    assert "| federated global | federated + personal |" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["rounds_complete"] == 2
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["complete"] and r["clients"] == 2 for r in rounds)
    for r in rounds:
        devs = sorted(r["devices"], key=lambda d: d["partition_id"])
        assert [d["budget_mb"] for d in devs] == [512.0, 300.0]  # each device under its own budget
        assert all(0 < d["peak_mb"] <= d["budget_mb"] and d["steps"] == 2 and np.isfinite(d["loss_last"])
                   for d in devs)
        assert r["examples"] == sum(d["num_examples"] for d in devs) > 0
        agg = r["aggregation"]  # two different users: a real rank-8 average cut to rank 4, its error reported
        assert 0 < agg["rel_error"] < 1 and agg["measured_rel_error"] == pytest.approx(agg["rel_error"], rel=1e-3)
    # the global adapter of each round, in mlx-lm's format; global/ is the last one
    final = mx.load(str(out / "global" / "adapters.safetensors"))
    assert all(k.endswith((".lora_a", ".lora_b")) for k in final) and final[next(iter(final))].dtype == mx.float32
    assert (out / "global" / "adapters.safetensors").read_bytes() == \
        (out / "rounds" / "round-002" / "adapters.safetensors").read_bytes()
    assert (out / "rounds" / "round-001" / "adapter_config.json").is_file()
    cfg = json.loads((out / "global" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["lora_parameters"]["rank"] == 4
    from mlx_lm.utils import load
    load(str(tiny_models["qwen2"]), adapter_path=str(out / "global"))  # mlx-lm takes it as it is
    # per-device held-out ROUGE-1; each device keeps its personal adapter beside the global one
    ev = json.loads((out / "evaluation.json").read_text())
    assert [e["partition_id"] for e in ev] == [0, 1]
    assert all(0 <= e[k] <= 1 for e in ev for k in ("rouge1_base", "rouge1_global", "rouge1_personal"))
    for d in devices_dirs(tmp_path):
        assert (d / "personal" / "adapters.safetensors").is_file() and (d / "global_final").is_dir()
    # what Flower carried from the devices: LoRA tensors of the adapter's names and shapes, scalar metrics, no more
    audit = [json.loads(x) for x in (out / "messages.jsonl").read_text().splitlines()]
    assert len(audit) == 2 * 2 + 2 and not any(a.get("error") for a in audit)
    shapes = {k: list(v.shape) for k, v in final.items()}
    for a in audit:
        recs = a["records"]
        if a["round"] == "evaluate":
            assert set(recs) == {"metrics"}
        else:
            assert set(recs) == {"arrays", "metrics"} and recs["arrays"]["type"] == "ArrayRecord"
            assert {k: v[1] for k, v in recs["arrays"]["arrays"].items()} == shapes
        assert recs["metrics"]["type"] == "MetricRecord"
        assert set(recs["metrics"]["values"].values()) <= {"int", "float"}
    # no raw dialogue reached the server's files
    server_files = "".join(p.read_text() for p in out.glob("*.json*"))
    assert not [t for t in raw_texts() if t in server_files]
    assert not port_in_use(out)


def devices_dirs(tmp_path):
    return [tmp_path / "user0", tmp_path / "user1"]


def port_in_use(out) -> bool:
    """Is anything still listening on the SuperLink's port (the launcher must have stopped it)?"""
    address = (out / "flower_home" / "config.toml").read_text().split('address = "')[1].split('"')[0]
    host, port = address.split(":")
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


def test_a_device_failing_mid_round_keeps_the_last_complete_global(tmp_path, tiny_models):
    out = tmp_path / "fed"
    with pytest.raises(FederateError, match="round 2 incomplete.*injected failure"):
        federate(out, devices(tmp_path, fail_at_round=2), Settings(model=str(tiny_models["qwen2"]), **SETTINGS),
                 rounds=3, timeout=300)
    assert (out / "global" / "adapters.safetensors").read_bytes() == \
        (out / "rounds" / "round-001" / "adapters.safetensors").read_bytes()
    assert json.loads((out / "global" / "adapter_config.json").read_text())["round"] == 1
    assert not (out / "rounds" / "round-002").exists()
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["complete"]) for r in rounds] == [(1, True), (2, False)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_complete"] == 1 and summary["failed_round"] == 2
    assert not port_in_use(out)


def test_replies_hold_only_lora_tensors_and_scalar_metrics():
    lora = {"model.layers.0.self_attn.q_proj.lora_a": np.zeros((4, 2), np.float32),
            "model.layers.0.self_attn.q_proj.lora_b": np.zeros((2, 4), np.float32)}
    content = reply_content(lora, {"num_examples": 3, "loss_last": 1.5})
    check_reply(content, with_arrays=True)
    with pytest.raises(PrivacyError, match="not a LoRA tensor"):
        reply_content({**lora, "model.embed_tokens.weight": np.zeros((2, 2))}, {})
    with pytest.raises(PrivacyError, match="not a scalar number"):
        reply_content(lora, {"last_prompt": "my password is hunter2"})
    from flwr.app import ConfigRecord
    content["extra"] = ConfigRecord({"text": "a user's dialogue"})
    with pytest.raises(PrivacyError, match="holds records"):
        check_reply(content, with_arrays=True)
    with pytest.raises(PrivacyError, match="holds records"):
        check_reply(reply_content(lora, {}), with_arrays=False)

