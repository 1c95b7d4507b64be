"""What travels between a device and the server, in Flower's records, and the privacy rule on it.

A device's reply holds nothing but LoRA tensors (an ArrayRecord whose names end in .lora_a / .lora_b) and scalar
metrics (a MetricRecord of ints and floats): no ConfigRecord, no strings, no other arrays. The device builds its replies
with `reply_content`, which refuses anything else; the server checks every reply it receives with `check_reply` (and
drops a reply that breaks the rule) and writes `describe` of it to messages.jsonl, the audit of what Flower carried.
"""

from __future__ import annotations

import numbers

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

LORA_SUFFIXES = (".lora_a", ".lora_b")


class PrivacyError(ValueError):
    pass


def _check_arrays(names) -> None:
    bad = [n for n in names if not n.endswith(LORA_SUFFIXES)]
    if bad:
        raise PrivacyError(f"array {bad[0]!r} is not a LoRA tensor; a device sends only LoRA tensors")


def _check_metrics(metrics: dict) -> None:
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise PrivacyError(f"metric {k!r} = {v!r} is not a scalar number; a device sends only scalar metrics")


def arrays_record(weights: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def weights_of(record: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in record.items()}


def reply_content(weights: dict | None, metrics: dict) -> RecordDict:
    """A device's reply: {"arrays": LoRA tensors (train replies only), "metrics": scalar metrics}."""
    _check_metrics(metrics)
    content = {"metrics": MetricRecord({k: (int(v) if isinstance(v, (int, np.integer)) else float(v))
                                        for k, v in metrics.items()})}
    if weights is not None:
        _check_arrays(weights)
        content["arrays"] = arrays_record(weights)
    return RecordDict(content)


def check_reply(content: RecordDict, with_arrays: bool) -> None:
    """Raise PrivacyError unless `content` is exactly what a device may send."""
    expected = {"metrics", "arrays"} if with_arrays else {"metrics"}
    if set(content.keys()) != expected:
        raise PrivacyError(f"a reply holds records {sorted(content.keys())}, expected {sorted(expected)}")
    if not isinstance(content["metrics"], MetricRecord):
        raise PrivacyError(f"'metrics' is a {type(content['metrics']).__name__}, not a MetricRecord")
    _check_metrics(dict(content["metrics"]))
    if with_arrays:
        if not isinstance(content["arrays"], ArrayRecord):
            raise PrivacyError(f"'arrays' is a {type(content['arrays']).__name__}, not an ArrayRecord")
        _check_arrays(content["arrays"].keys())


def describe(content: RecordDict) -> dict:
    """Every record of a message as carried: its type, and for arrays name -> (dtype, shape), for metrics and configs
    name -> the value's type name."""
    out = {}
    for name, rec in content.items():
        if isinstance(rec, ArrayRecord):
            out[name] = {"type": "ArrayRecord", "arrays": {k: [a.dtype, list(a.shape)] for k, a in rec.items()}}
        elif isinstance(rec, (MetricRecord, ConfigRecord)):
            out[name] = {"type": type(rec).__name__, "values": {k: type(v).__name__ for k, v in rec.items()}}
        else:
            out[name] = {"type": type(rec).__name__}
    return out
