"""CPU worker threads, each with its own MLX stream, and a way to spread independent pieces of work over them.

On the CPU, MLX runs a stream's element-wise kernels (dequantization, GELU's tanh, norms) on one core; only GEMMs use
BLAS's threads. MLX gives every Python thread its own default stream and releases the GIL while it evaluates, so
independent pieces evaluated on different threads run on different cores. Two users share one set of threads:
lanes (engine/lanes.py: a block's batch rows, one thread each) and `spread` (the pieces of one product or one
element-wise pass, e.g. a matrix's dequantization slices, when no lanes are running: batch 1, or one lane).

Rules that keep it correct: every array a piece reads is evaluated before the piece starts (a lazy array belongs to
the stream that made it), each piece's result is evaluated on its thread, and the thread drops the piece before the
caller wakes. Results never depend on the thread count: each piece computes what it would compute alone (OpenBLAS
splits a GEMM's rows and columns over threads, never its sums), and callers combine pieces in a fixed order.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future
from typing import Callable

import mlx.core as mx

from .backend import set_blas_threads


def cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS has no sched_getaffinity
        return max(1, os.cpu_count() or 1)


class WorkerThread:
    """One daemon thread that runs submitted work, always on the same thread (its MLX stream is its own). A daemon:
    MLX's per-thread stream must not be torn down while the process exits (a joined thread's stream aborted the
    exit)."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, args, future = self._jobs.get()
            try:
                box, error = [fn(*args)], None
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who re-raises it
                box, error = [], e
            # the job (its closure may hold every piece's inputs) is dropped before the caller wakes: an idle thread
            # holds no arrays, which would otherwise count, for as long as the thread took to get here, against what
            # the caller does next (seen: a 0.7 MB higher loss-phase peak, now and then)
            del fn, args
            if error is None:
                future.set_result(box.pop())
            else:
                future.set_exception(error)
            del future, error

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._jobs.put((fn, args, future))
        return future


_THREADS: list[WorkerThread] = []  # shared by the whole process: piece k >= 1 of a parallel run runs on _THREADS[k-1]
_THREADS_LOCK = threading.Lock()
_busy = threading.local()  # set on a thread while it runs one of several parallel pieces (no nested spreading)


def worker_threads(n: int) -> list[WorkerThread]:
    with _THREADS_LOCK:
        while len(_THREADS) < n:
            _THREADS.append(WorkerThread(f"mesp-worker{len(_THREADS) + 1}"))
        return _THREADS[:n]


def run_parallel(fn: Callable, args: list[tuple]) -> list:
    """fn(k, *args[k]) for each k at once, k = 0 on this thread and k on worker thread k; each result evaluated
    there; the results in order. Each GEMM gets cores // len(args) BLAS threads meanwhile (two 2-thread GEMMs at once
    on 2 cores were slower than one). Every array in args must already be evaluated."""

    def piece(k):
        _busy.on = True
        try:
            out = fn(k, *args[k])
            mx.eval(out)
            return out
        finally:
            _busy.on = False

    if len(args) == 1:
        out = fn(0, *args[0])
        mx.eval(out)
        return [out]
    threads = worker_threads(len(args) - 1)
    before = set_blas_threads(max(1, cores() // len(args)))
    try:
        futures = [threads[k - 1].submit(piece, k) for k in range(1, len(args))]
        try:
            first = piece(0)
        finally:
            for f in futures:  # every piece has finished before anything returns or raises
                f.exception()
        return [first] + [f.result() for f in futures]
    finally:
        if before is not None:
            set_blas_threads(before)


SPREAD = True  # False: `spread` never uses more than the caller's thread (a switch for measuring)


def spread_width() -> int:
    """How many threads `spread` may use now: the cores on the CPU, 1 on a GPU (Metal is parallel already) or inside
    a piece of a parallel run (lanes use the cores already)."""
    if not SPREAD or getattr(_busy, "on", False) or mx.default_device() != mx.cpu:
        return 1
    return cores()


def slice_share() -> int:
    """Into how many slices work that is cut to a memory budget cuts each budget's worth, so that the slices one per
    core at once hold the budget: the cores on the CPU, 1 on a GPU. It does not depend on whether they run at once
    (lanes, SPREAD), so neither do the slices' results."""
    return cores() if mx.default_device() == mx.cpu else 1


def spread(fn: Callable, items: list, width: int | None = None) -> list:
    """fn(item) for each item, evaluated, the results in order; up to `width` (at most spread_width()) items at once,
    each on its own thread. The items' arrays must be evaluated."""
    width = spread_width() if width is None else min(width, spread_width())
    if width <= 1 or len(items) <= 1:
        out = []
        for item in items:
            out.append(fn(item))
            mx.eval(out[-1])
        return out
    results = []
    for start in range(0, len(items), width):
        group = items[start:start + width]
        results += run_parallel(lambda k, item: fn(item), [(item,) for item in group])
    return results
