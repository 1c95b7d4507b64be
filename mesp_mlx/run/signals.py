"""Stopping a run cleanly: the first SIGINT / SIGTERM / SIGHUP lets the current step finish and the run save; a second
one stops at once."""

from __future__ import annotations

import os
import signal
import threading


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM (kill, logout, service managers, `timeout`, a phone's OS) and SIGHUP (the terminal went
    away): the first one lets the current step finish, then the run saves its adapters and state and ends with status
    130 / 143 / 129 (128 + the signal's number); a second one stops at once (SIGINT: KeyboardInterrupt; SIGTERM and
    SIGHUP: the signal's default action), leaving the last saved state."""

    STATUS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "hangup"}
    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}

    def __init__(self, log=print):
        self.log = log
        self.received: int | None = None
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.STATUS:
                self.old[sig] = signal.signal(sig, self._handle)

    @property
    def status(self) -> str | None:
        return self.STATUS.get(self.received) if self.received is not None else None

    def _handle(self, signum, frame):
        if self.received is not None:  # the second signal: stop now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        self.log(f"\n[mesp-mlx] {self.NAMES[signum]}: finishing this step, then saving (a second one stops without "
                 "saving)")

    def restore(self) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        self.old = {}
