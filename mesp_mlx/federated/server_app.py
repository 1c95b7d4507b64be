"""The Flower ServerApp: rounds of on-device fine-tuning, LoRA aggregation, and a final evaluation on every device.

Each round the server sends every device the global adapter (none in round 1) and the training settings, waits for
all of them, checks each reply (LoRA tensors and scalar metrics only, messages.py), aggregates with FlexLoRA (or
FedIT) weighted by the devices' training examples, and writes atomically:
  rounds/round-NNN/  adapters.safetensors + adapter_config.json (mlx-lm's format) — the global adapter of round NNN
  global/            the same for the last complete round (what `mlx_lm.generate --adapter-path` should take)
  rounds.jsonl       one record per round: clients, examples, per-client losses, peaks and budgets, aggregation error
  messages.jsonl     what Flower carried in every device reply (record types, array names/dtypes/shapes, metric types)
A round in which a device fails (an error reply, a reply that breaks the privacy rule, or no reply within the
timeout) is incomplete: nothing of it is aggregated or written over global/, the run stops and summary.json says so.
After the last round every device scores the final global adapter and its personal one on its held-out dialogues
(evaluation.json).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..adapters.lora import write_adapter_config
from ..io import atomic_write_json, write_jsonl
from .aggregation import aggregate, measured_error
from .device import Settings, save_weights
from .messages import PrivacyError, arrays_record, check_reply, describe, weights_of

app = ServerApp()


@dataclass
class ServerConfig:
    out: str
    rounds: int = 2
    clients: int = 2
    aggregation: str = "flexlora"
    connect_timeout: float = 120.0  # seconds to wait for the devices to connect
    round_timeout: float = 1800.0  # seconds to wait for a round's replies

    @classmethod
    def from_run_config(cls, rc: dict) -> ServerConfig:
        types = {"int": int, "float": float, "str": str}
        return cls(**{f.name: types[f.type](rc[f.name]) for f in fields(cls) if f.name in rc})


class FederationError(RuntimeError):
    pass


def _wait_for_nodes(grid: Grid, n: int, timeout: float, log) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            log(f"[federate] {len(nodes)} devices connected")
            return nodes[:n]
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of {n} devices connected within {timeout:g} s")
        time.sleep(0.5)


def _send(grid: Grid, nodes, kind: str, arrays: dict | None, config: dict, group: str, timeout: float):
    msgs = []
    for node in nodes:
        content = RecordDict({"config": ConfigRecord(config)})
        if arrays:
            content["arrays"] = arrays_record(arrays)
        msgs.append(Message(content=content, message_type=kind, dst_node_id=node, group_id=group))
    return list(grid.send_and_receive(msgs, timeout=timeout))


def _reason(text: str) -> str:
    """Flower's error reason ("<class 'pkg.DeviceError'>:<'message'>") as one line: "DeviceError: message"."""
    m = re.search(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>", text, re.DOTALL)
    line = f"{m.group(1)}: {m.group(2)}" if m else text
    return " ".join(line.split())[:300]


def _sort_replies(replies, nodes, round_, with_arrays: bool, audit: list, log) -> tuple[list, list]:
    """(good replies as (node, content), failures as one-line texts); each reply is described into `audit`."""
    good, failed = [], []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            failed.append(f"device node {node}: {_reason(reply.error.reason)}")
            audit.append({"round": round_, "node": node, "error": True})
            continue
        audit.append({"round": round_, "node": node, "records": describe(reply.content)})
        try:
            check_reply(reply.content, with_arrays)
        except PrivacyError as e:
            failed.append(f"device node {node}: reply refused: {e}")
            continue
        good.append((node, reply.content))
    missing = set(nodes) - {r.metadata.src_node_id for r in replies}
    failed += [f"device node {n}: no reply in time" for n in sorted(missing)]
    for f in failed:
        log(f"[federate] round {round_}: {f}")
    return good, failed


def save_global(out: Path, round_: int, weights: dict, settings: Settings) -> None:
    for folder in (out / "rounds" / f"round-{round_:03d}", out / "global"):
        write_adapter_config(folder, settings.num_layers, settings.lora_parameters(), extra={"round": round_})
        save_weights(weights, folder, f"the global adapter of round {round_}")


def serve(grid: Grid, cfg: ServerConfig, settings: Settings, log=print) -> dict:
    out = Path(cfg.out)
    rounds_log, audit = [], []
    summary = {"status": "running", "rounds_complete": 0, "config": asdict(cfg), "settings": asdict(settings)}
    nodes = _wait_for_nodes(grid, cfg.clients, cfg.connect_timeout, log)
    global_weights = None
    for r in range(1, cfg.rounds + 1):
        t = time.perf_counter()
        log(f"[federate] round {r}/{cfg.rounds}: training on {len(nodes)} devices")
        replies = _send(grid, nodes, "train", global_weights, {**settings.record(), "round": r}, f"round-{r}",
                        cfg.round_timeout)
        good, failed = _sort_replies(replies, nodes, r, True, audit, log)
        write_jsonl(out / "messages.jsonl", audit, what="the message audit")
        if failed:
            rounds_log.append({"round": r, "complete": False, "failures": failed})
            write_jsonl(out / "rounds.jsonl", rounds_log, what="the round metrics")
            error = f"round {r} incomplete ({failed[0]}); global/ keeps round {r - 1}'s adapter"
            summary.update(status="failed", failed_round=r, failures=failed, error=error)
            atomic_write_json(out / "summary.json", summary)
            raise FederationError(error)
        clients = [weights_of(c["arrays"]) for _, c in good]
        metrics = [dict(c["metrics"]) for _, c in good]
        counts = [m["num_examples"] for m in metrics]
        new, report = aggregate(clients, counts, settings.scale, settings.rank, cfg.aggregation)
        report["measured_rel_error"] = measured_error(new, clients, counts, settings.scale)
        save_global(out, r, new, settings)
        global_weights = new
        rounds_log.append({"round": r, "complete": True, "clients": len(good), "examples": sum(counts),
                           "aggregation": report, "seconds": round(time.perf_counter() - t, 1),
                           "devices": [{"node": n, **m} for (n, _), m in zip(good, metrics)]})
        write_jsonl(out / "rounds.jsonl", rounds_log, what="the round metrics")
        summary["rounds_complete"] = r
        atomic_write_json(out / "summary.json", summary)
        log(f"[federate] round {r}: {len(good)} devices, {sum(counts)} examples, loss "
            + ", ".join(f"{m['loss_first']:.3f}->{m['loss_last']:.3f}" for m in metrics)
            + "; peaks " + ", ".join(f"{m['peak_mb']:.0f}/{m['budget_mb']:.0f} MB" for m in metrics)
            + f"; {cfg.aggregation} error vs exact mean of dW {report['rel_error']:.2e}")
    log("[federate] evaluating the final global and the personal adapters on every device")
    replies = _send(grid, nodes, "evaluate", global_weights, settings.record(), "evaluate", cfg.round_timeout)
    good, failed = _sort_replies(replies, nodes, "evaluate", False, audit, log)
    write_jsonl(out / "messages.jsonl", audit, what="the message audit")
    evaluation = sorted(({"node": n, **dict(c["metrics"])} for n, c in good), key=lambda e: e["partition_id"])
    atomic_write_json(out / "evaluation.json", evaluation)
    summary.update(status="done" if not failed else "evaluation_incomplete", evaluation=evaluation)
    if failed:
        summary.update(failures=failed, error=f"evaluation incomplete ({failed[0]}); global/ holds the final adapter")
    atomic_write_json(out / "summary.json", summary)
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = dict(context.run_config)
    cfg = ServerConfig.from_run_config(rc)
    serve(grid, cfg, Settings.from_record(rc), log=lambda m: print(m, flush=True))
