"""Frozen block weights streamed from disk: read when a block runs, released right after (MeBP's lazy loading).

`mx.load` of safetensors is lazy: an array it returns holds no data until evaluated, and then reads its bytes. Releasing a
block means putting fresh, unevaluated handles back in place of the evaluated arrays; the evaluated ones are freed as
soon as the last graph that used them is gone. So at any moment only the weights of the block being computed are in MLX
memory. Entries are recorded before LoRA wraps the linears (LoRA keeps the very same inner module objects).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn


def _weight_index(model_path: Path) -> dict[str, str]:
    index_file = model_path / "model.safetensors.index.json"
    if index_file.is_file():
        with open(index_file) as f:
            return {k: str(model_path / v) for k, v in json.load(f)["weight_map"].items()}
    index = {}
    for file in sorted(model_path.glob("model*.safetensors")):
        for key in mx.load(str(file)):
            index[key] = str(file)
    return index


class WeightStreamer:
    def __init__(self, model_path: Path, model: nn.Module, layers: list, layer_prefix: str = "model.layers"):
        index = _weight_index(Path(model_path))
        # dtype of each live parameter (the engine may have cast norms etc. to fp32): reproduce it on reload
        self._entries: list[list[tuple]] = []
        for i, layer in enumerate(layers):
            entries = []
            for path, module in layer.named_modules():
                for name, value in module.items():
                    if not isinstance(value, mx.array):
                        continue
                    key = f"{layer_prefix}.{i}.{path + '.' if path else ''}{name}"
                    if key not in index:
                        raise ValueError(f"cannot stream weights: {key} is not in the model files of {model_path}")
                    entries.append((module, name, key, index[key], value.dtype))
            self._entries.append(entries)

    def release(self, i: int) -> None:
        """Replace block i's frozen arrays by fresh lazy handles (their memory is freed once no graph uses them)."""
        by_file = defaultdict(list)
        for entry in self._entries[i]:
            by_file[entry[3]].append(entry)
        for file, entries in by_file.items():
            handles = mx.load(file)
            for module, name, key, _, dtype in entries:
                arr = handles[key]
                module[name] = arr if arr.dtype == dtype else arr.astype(dtype)

    def release_all(self) -> None:
        for i in range(len(self._entries)):
            self.release(i)

    def block_bytes(self, i: int) -> int:
        return sum(module[name].nbytes for module, name, *_ in self._entries[i])
