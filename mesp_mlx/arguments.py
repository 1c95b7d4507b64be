"""Checks of the paths a command is given, shared by the parsers (cli.py, federated/cli.py), the settings checks
(run/checks.py) and the writers (fuse, convert, import-gguf): each says in a few words what is wrong, or None, and its
caller raises its own error class with it, so a bad argument ends in one line and exit 2 before anything runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

NAME_MAX, PATH_MAX = 255, 4095  # bytes: a file name and a whole path, on Linux's and macOS's file systems


def path_problem(text: str) -> str | None:
    """What no file system here takes in a path: a NUL byte, a name or a whole path too long."""
    if "\0" in text:
        return "a path cannot hold a NUL byte"
    raw = os.fsencode(text)
    if len(raw) > PATH_MAX:
        return f"a path of {len(raw)} bytes is longer than the {PATH_MAX} a file system takes"
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        return f"a file name of {len(longest)} bytes is longer than the {NAME_MAX} a file system takes"
    return None


def path_arg(text: str) -> str:
    """argparse `type` of a path argument: refused at parsing (`argument --x: ...`) when no file system takes it."""
    problem = path_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is not a folder (then `path` cannot be made)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def folder_problem(path: str | os.PathLike) -> str | None:
    """What stops `path` from being (or becoming) a folder: a name no file system takes, a file, or inside one."""
    problem = path_problem(os.fspath(path))
    if problem:
        return f"{problem} ({os.fspath(path)[:40]}...)"
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    above = _file_above(path)
    return f"{path} lies inside {above}, a file, not a folder" if above else None


def file_problem(path: str | os.PathLike) -> str | None:
    """What stops `path` from being written as a file: a name no file system takes, a folder, or inside a file."""
    problem = path_problem(os.fspath(path))
    if problem:
        return f"{problem} ({os.fspath(path)[:40]}...)"
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder, not a file"
    above = _file_above(path)
    return f"{path} lies inside {above}, a file, not a folder" if above else None


def positive_int_arg(text: str) -> int:
    """argparse `type` of a count of at least one (held-out dialogues, ...): refused at parsing otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {value}")
    return value


def new_folder_problem(path: str | os.PathLike) -> str | None:
    """folder_problem, and for an output that appears whole by a rename (fuse, import-gguf): not the current folder
    or one above it, which no rename can replace."""
    problem = folder_problem(path)
    if problem:
        return problem
    cwd = Path.cwd()
    if Path(path).resolve() in (cwd, *cwd.parents):
        return f"{os.fspath(path) or '.'} is the current folder or holds it; name a new folder"
    return None
