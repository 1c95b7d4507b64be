"""GRPO's rewards: a few built-ins and any Python callable named in the config, with mlx-lm-lora's signature

    reward(prompts: list[str], completions: list[str], answer: list[str], types: list | None = None) -> list[float]

(one reward per completion; None or NaN: "does not apply" to that completion). Several functions are summed with
weights (reward_weights, default 1 each); a completion no function applies to is an error, as in mlx-lm-lora.

Built-ins, named in `reward_functions`:
    exact_match       1 if the completion, stripped, equals the answer, stripped; else 0
    number_match      1 if the last number in the completion equals the answer's number; else 0 ("7 + 5 = 12")
    regex:PATTERN     1 if PATTERN (Python re) is found in the completion; else 0
    length:N          1 - |words - N| / N, at least 0: closeness to N words
Callables: "package.module:function" (importable) or "path/to/file.py:function".

A function that raises, returns the wrong count, or returns something that is not a number is reported with the
function's name and the indices of the prompts it was scoring (RewardError: exit 2 from the CLI).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from pathlib import Path

import numpy as np

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class RewardError(ValueError):
    """A reward function that cannot be loaded, raises, or returns other than one number per completion."""


def exact_match(prompts, completions, answer, types=None):
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answer)]


def _last_number(text: str) -> float | None:
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def number_match(prompts, completions, answer, types=None):
    out = []
    for c, a in zip(completions, answer):
        got, want = _last_number(c), _last_number(a)
        out.append(float(got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)))
    return out


def regex_reward(pattern: str):
    compiled = re.compile(pattern)

    def regex(prompts, completions, answer, types=None):
        return [float(compiled.search(c) is not None) for c in completions]

    regex.__name__ = f"regex:{pattern}"
    return regex


def length_reward(n_words: int):
    def length(prompts, completions, answer, types=None):
        return [max(0.0, 1.0 - abs(len(c.split()) - n_words) / n_words) for c in completions]

    length.__name__ = f"length:{n_words}"
    return length


BUILTINS = {"exact_match": exact_match, "number_match": number_match}


def load_reward(spec: str):
    """The reward function `spec` names (a built-in or module:function / file.py:function)."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward function {spec!r}: a built-in name or module:function")
    if spec in BUILTINS:
        return BUILTINS[spec]
    kind, _, arg = spec.partition(":")
    if kind == "regex":
        try:
            return regex_reward(arg)
        except re.error as e:
            raise RewardError(f"reward function {spec!r}: bad regular expression ({e})") from None
    if kind == "length":
        if not arg.isdigit() or int(arg) < 1:
            raise RewardError(f"reward function {spec!r}: length:N needs a positive word count N")
        return length_reward(int(arg))
    if not arg:
        raise RewardError(f"reward function {spec!r}: not a built-in ({', '.join(BUILTINS)}, regex:PATTERN, "
                          "length:N) nor module:function / file.py:function")
    return _load_callable(kind, arg, spec)


def _load_callable(where: str, name: str, spec: str):
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise RewardError(f"reward function {spec!r}: {path} is not a file")
            module_spec = importlib.util.spec_from_file_location(f"mesp_mlx_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except RewardError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module raises what it likes
        raise RewardError(f"reward function {spec!r}: cannot load {where} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {where} has no callable {name!r}")
    fn.__dict__.setdefault("reward_name", spec)
    return fn


def _name(fn) -> str:
    return getattr(fn, "reward_name", None) or getattr(fn, "__name__", repr(fn))


class Rewards:
    """The weighted sum of the configured reward functions over a batch of completions."""

    def __init__(self, specs: list[str], weights: list[float] | None = None):
        if not specs:
            raise RewardError("GRPO needs at least one reward function (reward_functions)")
        self.functions = [load_reward(s) for s in specs]
        weights = [1.0] * len(self.functions) if weights is None else list(weights)
        if len(weights) != len(self.functions):
            raise RewardError(f"reward_weights has {len(weights)} values for {len(self.functions)} reward functions")
        if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
            raise RewardError(f"reward_weights must be finite numbers, not {weights}")
        self.weights = np.asarray(weights, dtype=np.float64)
        self.names = [_name(f) for f in self.functions]

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str], types: list,
                 prompt_index: list[int]) -> tuple[np.ndarray, dict]:
        """(reward per completion, figures: each function's mean). `prompt_index[j]`: the dataset index of the
        prompt completion j answers (named in errors)."""
        columns, figures = [], {}
        for fn, name in zip(self.functions, self.names):
            where = f"reward function {name!r} on prompts {sorted(set(prompt_index))}"
            try:
                raw = fn(prompts=prompts, completions=completions, answer=answers, types=types)
            except Exception as e:  # noqa: BLE001 - the user's function raises what it likes
                raise RewardError(f"{where}: raised {type(e).__name__}: {e}") from None
            values = _numbers(raw, len(completions), where, prompt_index)
            valid = values[~np.isnan(values)]
            figures[f"reward_{name}"] = float(valid.mean()) if valid.size else 0.0
            columns.append(values)
        table = np.stack(columns, axis=1)
        unscored = np.isnan(table).all(axis=1)
        if unscored.any():
            j = int(np.flatnonzero(unscored)[0])
            raise RewardError(f"no reward function scored completion {j} (prompt {prompt_index[j]}): every one "
                              "returned None or NaN")
        return (np.nan_to_num(table, nan=0.0) * self.weights).sum(axis=1), figures


def _numbers(raw, n: int, where: str, prompt_index: list[int]) -> np.ndarray:
    if raw is None or isinstance(raw, (str, bytes)) or not hasattr(raw, "__len__"):
        raise RewardError(f"{where}: returned {type(raw).__name__}, not a list of {n} numbers")
    if len(raw) != n:
        raise RewardError(f"{where}: returned {len(raw)} values for {n} completions")
    values = np.empty(n, dtype=np.float64)
    for j, v in enumerate(raw):
        if v is None:
            values[j] = np.nan
            continue
        if not isinstance(v, (bool, int, float, np.bool_, np.integer, np.floating)):
            raise RewardError(f"{where}: completion {j} (prompt {prompt_index[j]}) got {v!r}, not a number")
        if math.isinf(float(v)):
            raise RewardError(f"{where}: completion {j} (prompt {prompt_index[j]}) got an infinite reward")
        values[j] = float(v)
    return values


def group_advantages(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """(r - mean of its group) / (std of its group + 1e-4), groups of `group_size` consecutive completions."""
    groups = rewards.reshape(-1, group_size)
    return ((groups - groups.mean(axis=1, keepdims=True)) / (groups.std(axis=1, keepdims=True) + 1e-4)).reshape(-1)
