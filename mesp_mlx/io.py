"""Writing files safely: atomic (temp file, fsync, rename), with the permissions a plain write would give, and an I/O
error turned into one line that names the path and what was being written (exit status 74, sysexits' EX_IOERR).

A reader (or a crash, or a kill at any moment) sees the previous complete file or the new complete file, never a part.
Tensor files carry the SHA-256 of their tensors in their metadata, so a file damaged after it was written (a bad disk,
a copy cut short, bytes zeroed) is refused as corrupt instead of being trained on (`save_tensors` / `load_tensors`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

IO_ERROR_EXIT = 74  # sysexits.h EX_IOERR: a write failed (disk full, read-only, permission)
TEMP_PREFIX = "."  # temp files are ".<name>.<random><suffix>" beside their target


class WriteError(OSError):
    """A write that failed; the previous complete file (if any) is left as it was."""

    def __init__(self, path, what: str, reason: str, kept: bool = True):
        tail = "; the previous complete file is kept" if kept else ""
        super().__init__(f"cannot write {what} to {path}: {reason}{tail}")
        self.path, self.what = Path(path), what

    def __str__(self) -> str:
        return self.args[0]


def _reason(e: BaseException, folder: Path | None = None) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        name = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}.get(e.errno)
        return name or (e.strerror or str(e))
    # MLX's save errors carry no errno ("[write] Unable to write N bytes to file."): say what the disk says
    text = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
    try:
        free = shutil.disk_usage(folder).free if folder is not None else None
    except OSError:
        free = None
    if free is not None and free < 2**20:
        return f"no space left on the device ({free // 1024} KB free; {text})"
    return f"the write failed ({text})"


def plain_file_mode() -> int:
    """The mode open(path, "w") would give a new file: 0o666 less the process umask (mkstemp's is always 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def plain_dir_mode() -> int:
    """The mode mkdir would give a new folder (mkdtemp's is always 0o700)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_write(path: str | os.PathLike, write_fn, suffix: str = "", what: str | None = None) -> None:
    """Call write_fn(tmp_path) to produce the file, then fsync it and rename it over `path`.

    An OSError, or MLX's RuntimeError from a failed save (write_fn only writes), becomes a WriteError naming `path` and
    `what`; the temp file is removed and `path` keeps its previous content."""
    path = Path(path)
    what = what or path.name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise WriteError(path, what, _reason(e)) from None
    try:
        write_fn(tmp)
        os.chmod(tmp, plain_file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        _remove_quietly(tmp)
        raise WriteError(path, what, _reason(e, path.parent)) from None
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, what: str | None = None) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write, what=what)


def atomic_write_json(path: str | os.PathLike, obj, what: str | None = None) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=4)

    atomic_write(path, write, what=what)


def write_jsonl(path: str | os.PathLike, records, what: str | None = None) -> None:
    """One JSON object per line, written atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    atomic_write(path, write, what=what)


def atomic_folder(out: Path, fill_fn, what: str) -> None:
    """Build a whole folder in a temp folder beside `out` with fill_fn(tmp_folder), then rename it to `out`: the folder
    appears complete or not at all. `out` must not exist (or be an empty folder)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{out.name}.", dir=out.parent))
        os.chmod(tmp, plain_dir_mode())
    except OSError as e:
        raise WriteError(out, what, _reason(e)) from None
    try:
        fill_fn(tmp)
        for f in tmp.rglob("*"):
            os.chmod(f, plain_dir_mode() if f.is_dir() else plain_file_mode())
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(out, what, _reason(e, out.parent)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Temp files that a killed atomic write left in `folder` (call only while holding the folder's lock)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if _TEMP_NAME.match(p.name) and p.is_file():
            _remove_quietly(p)
            removed.append(p.name)
    return removed


# ".<target>.<mkstemp's 8 random characters><suffix>" for the files a run writes
_TEMP_NAME = re.compile(r"^\.[^/]+\.(safetensors|json|jsonl|png)\.[a-z0-9_]{8}(\.[a-z]+)?$")


def check_writable(folder: str | os.PathLike) -> None:
    """Fail early (before any training) when an output folder cannot be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise PermissionError(f"cannot write to {folder}: {e.strerror}") from e


def check_free_space(folder: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Refuse to start when `folder`'s file system has less room than one save of `what` needs (x2: the temp file and
    the previous complete file exist side by side until the rename)."""
    free = shutil.disk_usage(folder).free
    if free < 2 * needed_bytes:
        raise WriteError(folder, what, f"{free / 2**20:.1f} MB free, a save needs {2 * needed_bytes / 2**20:.1f} MB "
                                       "(the new file beside the previous one); free some space or choose another "
                                       "--adapter-path", kept=False)


CHECKSUM_KEY = "mesp_mlx.sha256"  # in the safetensors metadata: the digest of the file's tensors (tensor_digest)


class CorruptFile(ValueError):
    """A tensor file whose tensors do not match the checksum written with them."""


def tensor_digest(tensors: dict) -> str:
    """SHA-256 over the tensors in name order: each name, dtype, shape and raw bytes (any dtype, bfloat16 included)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        v = tensors[name]
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(np.array(mx.view(v.reshape(-1), mx.uint8)).tobytes() if v.size else b"")
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None, what: str | None = None) -> None:
    """A safetensors file written atomically, its tensors' checksum in its metadata (mlx-lm and MLX read it as ever)."""
    mx.eval(list(tensors.values()))
    meta = {**(metadata or {}), CHECKSUM_KEY: tensor_digest(tensors)}
    atomic_write(path, lambda tmp: mx.save_safetensors(tmp, tensors, metadata=meta), suffix=".safetensors",
                 what=what)


def load_tensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, read now; CorruptFile when a checksum written with it does not
    match (files without one, such as mlx-lm's own, are read as they are)."""
    tensors, meta = mx.load(str(path), return_metadata=True)
    mx.eval(list(tensors.values()))
    expected = meta.get(CHECKSUM_KEY)
    if expected is not None and tensor_digest(tensors) != expected:
        raise CorruptFile(f"{path} is damaged: its tensors do not match the checksum written with them")
    return tensors, meta
