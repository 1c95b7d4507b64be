"""Stopping a run cleanly: during the steps the first SIGINT / SIGTERM / SIGHUP lets the current step finish and the run
save, and a second one stops at once; before step 1 (model download, data loading, planning) and after the final save
there is nothing to finish, so the first one stops at once."""

from __future__ import annotations

import os
import signal
import threading


class Stopped(BaseException):
    """A signal in a phase with nothing to finish: raised from the handler, so a blocking call (a download, an open)
    ends too. A BaseException, so that no `except Exception` on the way turns it into another error."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {StopSignals.NAMES[signum]}")
        self.signum = signum

    @property
    def status(self) -> str:
        return StopSignals.STATUS[self.signum]


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM (kill, logout, service managers, `timeout`, a phone's OS) and SIGHUP (the terminal went
    away). During the steps the first one lets the current step finish, then the run saves its adapters and state and
    ends with status 130 / 143 / 129 (128 + the signal's number); a second one stops at once (SIGINT:
    KeyboardInterrupt; SIGTERM and SIGHUP: the signal's default action), leaving the last saved state. Outside the
    steps (`at_once`) the first one raises Stopped where the run is."""

    STATUS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "hangup"}
    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}

    def __init__(self, log=print, at_once: bool = True):
        self.log = log
        self.at_once = at_once  # True outside the steps: the first signal raises Stopped
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
        if self.at_once:
            self.log(f"\n[mesp-mlx] {self.NAMES[signum]}: stopping now (no step is running)")
            raise Stopped(signum)
        self.log(f"\n[mesp-mlx] {self.NAMES[signum]}: finishing this step, then saving (a second one stops without "
                 "saving)")

    def steps_begin(self) -> None:
        """From here a first signal waits for the running step (the loop saves and stops after it)."""
        self.at_once = False

    def steps_end(self) -> None:
        """The final state is saved: a first signal stops at once again."""
        self.at_once = True

    def restore(self) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        self.old = {}
