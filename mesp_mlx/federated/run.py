"""`mesp-mlx federate`: personalization across a fleet of emulated devices on Flower's deployment engine."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .aggregation import SCHEMES
from .device import Settings
from .launch import DeviceSpec, LaunchError, run_deployment
from .server_app import ServerConfig


class FederateError(RuntimeError):
    pass


def federate(out: str | Path, devices: list[DeviceSpec], settings: Settings, rounds: int = 2,
             aggregation: str = "flexlora", timeout: float = 3600.0, round_timeout: float | None = None,
             log=print) -> dict:
    """Run the federation and return out/summary.json; raise FederateError (one line) when it did not complete."""
    if aggregation not in SCHEMES:
        raise FederateError(f"--aggregation {aggregation!r}: one of {', '.join(SCHEMES)}")
    if rounds < 1 or not devices:
        raise FederateError("need at least one round and one device")
    for d in devices:
        for name in ("stream.jsonl", "heldout.jsonl"):
            if not (Path(d.folder) / name).is_file():
                raise FederateError(f"device folder {d.folder} lacks {name}")
    out = Path(out).resolve()
    summary_file = out / "summary.json"
    if summary_file.exists():
        summary_file.unlink()  # a previous run's summary must not pass for this one's
    cfg = ServerConfig(out=str(out), rounds=rounds, clients=len(devices), aggregation=aggregation,
                       round_timeout=float(round_timeout or timeout))
    run_config = {**{k: v for k, v in asdict(cfg).items()}, **settings.record()}
    try:
        rc = run_deployment(out, devices, run_config, timeout, log)
    except LaunchError as e:
        raise FederateError(str(e)) from None
    if not summary_file.is_file():
        raise FederateError(f"the ServerApp wrote no summary (flwr run exited {rc}; see {out / 'logs'})")
    summary = json.loads(summary_file.read_text())
    if summary["status"] != "done":
        raise FederateError(summary.get("error") or f"federation {summary['status']}: "
                            f"{summary.get('failures', ['?'])[0]}")
    return summary
