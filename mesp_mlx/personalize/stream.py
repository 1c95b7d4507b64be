"""A user's dialogue stream: jsonl in mlx-lm's chat or completions format, one dialogue per line.

chat: {"messages": [..., {"role": "user", ...}, {"role": "assistant", ...}]} — the last user turn is the prompt, the
assistant turn after it (if any) the response. completions: {"prompt": ..., "completion": ...}; a record with only a
prompt is a dialogue still waiting for the user's preferred response (sparse annotation can supply it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.datasets import DataError, iter_jsonl


@dataclass
class Dialogue:
    prompt: str
    response: str | None
    source: str  # file:line


def _parse(rec: dict, where: str) -> Dialogue:
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in msgs):
            raise DataError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        users = [i for i, m in enumerate(msgs) if m.get("role") == "user"]
        if not users:
            raise DataError(f"{where}: the dialogue has no user turn")
        last = users[-1]
        after = [m for m in msgs[last + 1:] if m.get("role") == "assistant"]
        prompt, response = msgs[last]["content"], (after[0]["content"] if after else None)
    elif "prompt" in rec:
        prompt, response = rec["prompt"], rec.get("completion")
        if not isinstance(prompt, str) or not (response is None or isinstance(response, str)):
            raise DataError(f"{where}: 'prompt' and 'completion' must be strings")
    else:
        raise DataError(f"{where}: expected a chat record ('messages') or a completions record ('prompt')")
    if not prompt.strip():
        raise DataError(f"{where}: empty prompt")
    return Dialogue(prompt.strip(), response.strip() if response and response.strip() else None, where)


def read_dialogues(path: str | Path, need_response: bool = False) -> list[Dialogue]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dialogue file not found: {path}")
    out = []
    for where, rec in iter_jsonl(path):
        d = _parse(rec, where)
        if need_response and d.response is None:
            raise DataError(f"{where}: an evaluation dialogue needs a response to compare with")
        out.append(d)
    if not out:
        raise DataError(f"{path}: no dialogues")
    return out
