"""Real text that ships in installed packages, turned into mlx-lm jsonl folders (no network).

chatterbot-corpus (BSD-3): English dialogues by category, as chat records {"messages": [user, assistant]}.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from .io import atomic_write


def chatterbot_pairs(categories: list[str], language: str = "english") -> list[tuple[str, str]]:
    try:
        import chatterbot_corpus
    except ImportError as e:
        raise RuntimeError("chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus") from e
    root = Path(chatterbot_corpus.__file__).parent / "data" / language
    pairs = []
    for cat in categories:
        path = root / f"{cat}.yml"
        if not path.is_file():
            known = sorted(p.stem for p in root.glob("*.yml"))
            raise ValueError(f"chatterbot category {cat!r} not found (available: {', '.join(known)})")
        with open(path) as f:
            doc = yaml.safe_load(f)
        for conv in doc.get("conversations", []):
            turns = [str(t).strip() for t in conv if isinstance(t, (str, int, float))]
            for q, a in zip(turns[::2], turns[1::2]):
                if q and a:
                    pairs.append((q, a))
    return pairs


def write_chat_jsonl(pairs: list[tuple[str, str]], out_dir: str | Path, valid_fraction: float = 0.1, seed: int = 0,
                     system: str | None = None) -> dict:
    """Shuffle deterministically, split into train/valid and write mlx-lm chat jsonl files atomically."""
    out_dir = Path(out_dir)
    pairs = list(pairs)
    random.Random(seed).shuffle(pairs)
    n_valid = max(1, int(len(pairs) * valid_fraction)) if len(pairs) > 1 else 0
    splits = {"valid": pairs[:n_valid], "train": pairs[n_valid:]}
    counts = {}
    for name, items in splits.items():
        lines = []
        for q, a in items:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": q}, {"role": "assistant", "content": a}]
            lines.append(json.dumps({"messages": msgs}))

        def write(tmp, lines=lines):
            with open(tmp, "w") as f:
                f.write("\n".join(lines) + "\n")

        atomic_write(out_dir / f"{name}.jsonl", write)
        counts[name] = len(items)
    return counts
