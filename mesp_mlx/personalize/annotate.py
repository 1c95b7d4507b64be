"""Sparse annotation: once the buffer has settled, the user gives the preferred response for at most k kept dialogues.

Which k: dialogues still without a response first, then the strongest by the selector's scores (sum of EOE, DSS, IDD),
stream order on ties. Where the answers come from: an interactive prompt, or a jsonl file of
{"prompt": ..., "response": ...} records when non-interactive (matched on the prompt text).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..data.datasets import DataError, iter_jsonl
from .buffer import Candidate


def pick_for_annotation(items: list[Candidate], k: int) -> list[Candidate]:
    order = sorted(items, key=lambda c: (c.response is not None, -(c.eoe + c.dss + c.idd), c.index))
    return order[:max(0, k)]


def read_annotations(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    answers = {}
    for where, rec in iter_jsonl(path):
        if not (isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str)):
            raise DataError(f"{where}: an annotation needs string fields 'prompt' and 'response'")
        answers[rec["prompt"].strip()] = rec["response"].strip()
    return answers


def file_annotator(path: str | Path) -> Callable[[Candidate], str | None]:
    answers = read_annotations(path)
    return lambda item: answers.get(item.prompt)


def interactive_annotator(ask: Callable[[str], str] = input, show: Callable[[str], None] = print):
    """Shows the prompt and the current response; the user types the preferred one (Enter keeps it)."""
    def annotate(item: Candidate) -> str | None:
        show(f"\n[annotate] user: {item.prompt}\n[annotate] current response: {item.response or '(none)'}")
        try:
            typed = ask("[annotate] preferred response (Enter keeps the current one): ").strip()
        except EOFError:  # stdin ended (--interactive without a terminal, answers piped in): as Enter, keep it
            return None
        return typed or None
    return annotate


def annotate(items: list[Candidate], k: int, annotator: Callable[[Candidate], str | None]) -> list[Candidate]:
    """Ask about at most k items; returns the ones whose response changed (changed in place)."""
    changed = []
    for item in pick_for_annotation(items, k):
        answer = annotator(item)
        if answer and answer != item.response:
            item.response = answer
            changed.append(item)
    return changed
