"""One run per output folder: a lock file held with an OS lock (flock) for the whole run.

The OS drops the lock when its process ends in any way (SIGKILL and power loss included), so a lock file whose lock
can be taken is stale: its run is dead, and the next run takes it over with a note. The file records the holder's pid,
host and start time so a refused run can name it.

Every command that writes into a folder takes its lock (train, convert, personalize, federate, make-data); the ones
that build a whole new folder (fuse, import-gguf) refuse a folder that exists, naming a live holder
(`refuse_in_use`). A folder the lock had to create is removed again when the command ends having written nothing
into it, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".mesp-mlx.lock"


class FolderLocked(RuntimeError):
    """Another live run holds the folder."""


class FolderLock:
    def __init__(self, folder: str | os.PathLike, log=print, flag: str = "--adapter-path"):
        self.path = Path(folder) / LOCK_FILE
        self.log = log
        self.flag = flag  # how the refusal names the folder's option
        self.fd: int | None = None
        self.created: list[Path] = []  # the folders acquire() made (the deepest first), removed again if left empty

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def refusal(self) -> FolderLocked:
        h = self._holder()
        who = f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}"
        return FolderLocked(f"{self.path.parent} is in use by another run ({who}: {h.get('command', '')}); wait for "
                            f"it to end or choose another {self.flag}")

    def _lock_once(self) -> int | None:
        """The locked fd, or None when the file was replaced between open and lock (then try again)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self.refusal() from None
        try:
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (and unlinked) it between our open and our lock
            os.close(fd)
            return None
        return fd

    def acquire(self) -> FolderLock:
        folder = self.path.parent
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.created = missing
            fd = None
            while fd is None:
                fd = self._lock_once()
        except OSError as e:
            self._remove_created()
            raise PermissionError(f"cannot write to {folder}: {e.strerror or e}") from None
        previous = self._holder()
        if previous.get("pid") and previous.get("pid") != os.getpid():
            self.log(f"[mesp-mlx] note: {self.path} was left by run pid {previous['pid']} (started "
                     f"{previous.get('started', '?')}), which is no longer running; taking it over")
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiting run then creates a fresh file
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        """Folders this lock created and nothing was written into: gone again (a refused run leaves nothing)."""
        for folder in self.created:
            try:
                folder.rmdir()  # only an empty folder; a run that wrote something keeps it
            except OSError:
                break
        self.created = []

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def refuse_in_use(folder: str | os.PathLike, flag: str) -> None:
    """FolderLocked when a live run holds `folder`'s lock (for commands that write a whole new folder and take no
    lock inside it)."""
    path = Path(folder) / LOCK_FILE
    if not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FolderLock(folder, flag=flag).refusal() from None
    finally:
        os.close(fd)
