"""What a run trained on, by content: fingerprints of the model folder and the data files that --resume compares.

A path names a folder, not its content: a folder changed in place, or another folder reached by the same relative
path, would resume silently into a mixed run, and the same folder written as `./x/` would look like another one. So
the saved state records, per file, its size and a SHA-256:
    data  : every byte of train/valid/test.jsonl (data files are small next to a model)
    model : config.json, the tokenizer files and each weight file's header (names, dtypes, shapes, offsets) in full,
            and for each weight file 16 slices of 64 KB spread evenly over it (a cheap content sample: changing
            weights in place while keeping shapes is caught without reading gigabytes)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SAMPLES, SAMPLE_BYTES = 16, 64 * 1024
DATA_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl")
MODEL_SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                     "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def _whole(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{path.stat().st_size}:{h.hexdigest()}"


def _sampled(path: Path) -> str:
    """Size, the safetensors header whole, and SAMPLES evenly spaced slices of the rest."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        h.update(head)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if 0 < n <= min(size - 8, 100 << 20):
            h.update(f.read(n))
        for i in range(SAMPLES):
            f.seek(size * i // SAMPLES)
            h.update(f.read(SAMPLE_BYTES))
    return f"{size}:{h.hexdigest()}"


def data_fingerprint(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    return {name: _whole(folder / name) for name in DATA_FILES if (folder / name).is_file()}


def model_fingerprint(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    prints = {name: _whole(folder / name) for name in MODEL_SMALL_FILES if (folder / name).is_file()}
    prints.update({p.name: _sampled(p) for p in sorted(folder.glob("*.safetensors"))})
    return prints


def changed_files(saved: dict, now: dict) -> list[str]:
    """The files that differ, appeared or went away between two fingerprints."""
    return sorted(name for name in set(saved) | set(now) if saved.get(name) != now.get(name))
