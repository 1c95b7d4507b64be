"""Frozen block weights streamed from disk: read when a block runs, released right after (MeBP's lazy loading).

`mx.load` of safetensors is lazy: an array it returns holds no data until evaluated, and then reads its bytes. Releasing a
block means putting fresh, unevaluated handles back in place of the evaluated arrays; the evaluated ones are freed as
soon as the last graph that used them is gone. So at any moment only the weights of the block being computed are in MLX
memory. Entries are recorded before LoRA wraps the linears (LoRA keeps the very same inner module objects).

The embedding and the LM head are not loaded at all while training: `embedding` and `head` read their rows through a
memory map (token rows for the lookup, vocabulary chunks for the loss), see mmap_rows.py.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..models.families import describe
from .mmap_rows import MmapRows


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


def _entries(module: nn.Module, prefix: str, index: dict, model_path) -> list[tuple]:
    """(module, name, key, file, dtype) of every array under `module`; the dtype of each live parameter (the engine
    may have cast norms etc. to fp32) is reproduced on reload."""
    entries = []
    for path, sub in module.named_modules():
        for name, value in sub.items():
            if not isinstance(value, mx.array):
                continue
            key = f"{prefix}.{path + '.' if path else ''}{name}"
            if key not in index:
                raise ValueError(f"cannot stream weights: {key} is not in the model files of {model_path}")
            entries.append((sub, name, key, index[key], value.dtype))
    return entries


class WeightStreamer:
    def __init__(self, model_path: Path, model: nn.Module, layers: list, layer_prefix: str | None = None):

        family = describe(model)  # multimodal folders keep the text model's tensors under a prefix (language_model.)
        text, pre = family.text_model(model), family.weight_prefix
        layer_prefix = layer_prefix or family.layers_path  # model.layers; EXAONE: transformer.h
        index = _weight_index(Path(model_path))
        self._entries = [_entries(layer, f"{pre}{layer_prefix}.{i}", index, model_path) for i, layer in enumerate(layers)]
        embed, head = f"{pre}{family.trunk_attr}.{family.embed_attr}", f"{pre}{family.head_attr}"
        vocab_modules = [(family.embedding(text), embed)]
        if family.head(text) is not family.embedding(text):
            vocab_modules.append((family.head(text), head))
        self._vocab_entries = [e for m, p in vocab_modules for e in _entries(m, p, index, model_path)]
        self.embedding = MmapRows(index, embed)
        self.head = MmapRows(index, head) if f"{head}.weight" in index else self.embedding

    def release(self, i: int) -> None:
        """Replace block i's frozen arrays by fresh lazy handles (their memory is freed once no graph uses them)."""
        self._release(self._entries[i])

    @staticmethod
    def _release(entries: list) -> None:
        by_file = defaultdict(list)
        for entry in entries:
            by_file[entry[3]].append(entry)
        for file, entries in by_file.items():
            handles = mx.load(file)
            for module, name, key, _, dtype in entries:
                arr = handles[key]
                module[name] = arr if arr.dtype == dtype else arr.astype(dtype)

    def release_all(self) -> None:
        """Every block and the embedding / LM head back to unevaluated handles (e.g. after generating text)."""
        for i in range(len(self._entries)):
            self.release(i)
        self._release(self._vocab_entries)
