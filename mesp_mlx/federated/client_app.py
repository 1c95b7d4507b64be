"""The Flower ClientApp: one device of the fleet (its SuperNode's node config says which).

Node config (`flower-supernode --node-config`): device-dir (the device's folder: stream.jsonl, heldout.jsonl), and
optionally device-profile (a named memory budget), budget-mb, partition-id (a number reported back so the server can
name the device in its tables) and fail-at-round (fault injection for tests: the device raises during that round's
fine-tune, after training and before replying).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .device import Device, DeviceError, Settings, evaluate, fine_tune
from .messages import reply_content, weights_of

app = ClientApp()


def device_of(context: Context) -> Device:
    nc = context.node_config
    if "device-dir" not in nc:
        raise DeviceError("this SuperNode has no device-dir in its --node-config")
    budget = nc.get("budget-mb")
    return Device(Path(str(nc["device-dir"])), str(nc.get("device-profile", "")) or None,
                  float(budget) if budget not in (None, "") else None)


def _log(context: Context):
    name = Path(str(context.node_config.get("device-dir", "?"))).name
    return lambda m: print(f"[{name}] {m}", flush=True)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = dict(msg.content["config"])
    settings = Settings.from_record(config)
    round_ = int(config["round"])
    global_weights = weights_of(msg.content["arrays"]) if "arrays" in msg.content else None
    device = device_of(context)
    weights, metrics = fine_tune(device, settings, global_weights or None, round_, log=_log(context))
    if int(context.node_config.get("fail-at-round", 0)) == round_:
        raise DeviceError(f"device {device.folder.name}: injected failure in round {round_} (fail-at-round)")
    metrics["partition_id"] = int(context.node_config.get("partition-id", -1))
    return Message(content=reply_content(weights, metrics), reply_to=msg)


@app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    settings = Settings.from_record(dict(msg.content["config"]))
    scores = evaluate(device_of(context), settings, weights_of(msg.content["arrays"]), log=_log(context))
    scores["partition_id"] = int(context.node_config.get("partition-id", -1))
    return Message(content=reply_content(None, scores), reply_to=msg)
