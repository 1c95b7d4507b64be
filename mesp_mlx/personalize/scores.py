"""The selection scores of Qin et al. (docs/design.md §6) and ROUGE-1. Higher is better for all three selection scores.

- EOE, entropy of embedding: H(p) / log n over a text's n token embeddings. Our choice of p: the empirical distribution
  of the distinct embedding vectors among the n tokens. The input embedding maps each token id to one row, so p is the
  distribution of the token ids: EOE = 1 when every token is different, 0 when one token repeats (or n <= 1).
- DSS, domain-specific score: (1/m) Σ_i |T ∩ l_i| / n over m domain lexicons, |T ∩ l_i| counting T's word tokens
  (with repeats) found in lexicon l_i and n = T's word tokens.
- IDD, in-domain dissimilarity: 1 − the largest cosine similarity between T's embedding and the embeddings already
  kept for T's dominant domain (argmax_i |T ∩ l_i|, first in name order on ties; "general" when no lexicon matches);
  1 when the domain holds nothing yet.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

GENERAL = "general"
_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """Lower-case word tokens, the unit lexicons are matched on."""
    return [w.strip("'") for w in _WORD.findall(text.lower()) if w.strip("'")]


def default_lexicon_dir() -> Path:
    return Path(__file__).parent / "lexicons"


def load_lexicons(folder: str | Path | None = None) -> dict[str, frozenset]:
    """{domain: words} from a folder of `<domain>.txt` files (see lexicons/README.md for the format)."""
    folder = Path(folder) if folder else default_lexicon_dir()
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no lexicon files (*.txt) in {folder}")
    lexicons = {}
    for path in files:
        vocab = set()
        for line in path.read_text(encoding="utf-8").splitlines():
            vocab.update(line.split("#", 1)[0].lower().split())
        if not vocab:
            raise ValueError(f"{path}: the lexicon is empty")
        lexicons[path.stem] = frozenset(vocab)
    return lexicons


def eoe(token_ids) -> float:
    """Entropy of embedding, normalised to [0, 1] by log n (module docstring)."""
    ids = [int(t) for t in token_ids]
    n = len(ids)
    if n <= 1:
        return 0.0
    h = -sum(c / n * math.log(c / n) for c in Counter(ids).values())
    return h / math.log(n)


def domain_counts(text_words: list[str], lexicons: dict[str, frozenset]) -> dict[str, int]:
    return {name: sum(w in vocab for w in text_words) for name, vocab in lexicons.items()}


def dss(text_words: list[str], lexicons: dict[str, frozenset]) -> float:
    if not text_words or not lexicons:
        return 0.0
    counts = domain_counts(text_words, lexicons)
    return sum(counts.values()) / len(text_words) / len(lexicons)


def dominant_domain(text_words: list[str], lexicons: dict[str, frozenset]) -> str:
    counts = domain_counts(text_words, lexicons)
    best = max(sorted(counts), key=lambda name: counts[name], default=None)  # sorted: ties go to the first name
    return best if best is not None and counts[best] > 0 else GENERAL


def idd(embedding: np.ndarray, same_domain: np.ndarray) -> float:
    """1 − max cosine similarity to the rows of `same_domain` (unit-normalised embeddings); 1 for none."""
    if len(same_domain) == 0:
        return 1.0
    sims = same_domain.astype(np.float32) @ embedding.astype(np.float32)
    return float(1.0 - sims.max())


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def rouge1(candidate: str, reference: str) -> float:
    """ROUGE-1 F1: clipped unigram overlap of lower-case alphanumeric tokens (rouge-score's default tokenizer, no
    stemming)."""
    cand = re.sub(r"[^a-z0-9]+", " ", candidate.lower()).split()
    ref = re.sub(r"[^a-z0-9]+", " ", reference.lower()).split()
    if not cand or not ref:
        return 0.0
    overlap = sum((Counter(cand) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    p, r = overlap / len(cand), overlap / len(ref)
    return 2 * p * r / (p + r)
