"""Data parallelism over `mx.distributed` (ring over TCP on any machine; MPI / JACCL where present), started by
`mlx.launch` or by MLX_RANK + MLX_HOSTFILE. One process is a world of size 1 and every collective is a no-op.

Exactness: each rank computes its rows' share of the global mean loss, so the global gradient is the plain sum of the
ranks' gradients (no division by the world size):

    L = (1/T) Σ_rows ce,  T = Σ_ranks T_r   ->   dL/dθ = Σ_r (T_r / T) dL_r/dθ,  L_r = rank r's mean over its T_r tokens

The engine scales its loss gradient by T_r / T (one scalar all_sum per step) and sums each block's LoRA gradient
across ranks right before that block's optimizer step; every rank then applies the same update. The result equals one
process running the whole batch, up to floating-point summation order.

Every collective runs under a watchdog: a rank whose peer died gets MLX's "connection to a peer was lost" as a clear
error (PeerLost), and a collective that hangs (mlx#4475 reports intermittent ring hangs) ends the process after
`timeout_s` with a message instead of waiting for ever.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

PEER_LOST_EXIT = 76  # another rank died, or the network between the ranks went down


class PeerLost(RuntimeError):
    pass


class Ranks:
    """The world a run belongs to: rank, size, and the few collectives the engine and the trainer need."""

    def __init__(self, group=None, timeout_s: float = 600.0):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self.timeout_s = timeout_s
        self.bytes_sent = 0  # payload handed to all_sum (per rank), and the seconds spent in collectives
        self.seconds = 0.0
        self._deadline: float | None = None  # when the running collective counts as hung
        self._watchdog: threading.Thread | None = None

    @classmethod
    def from_environment(cls, timeout_s: float | None = None) -> "Ranks":
        """The world of this process: size 1 unless started by mlx.launch (or MLX_RANK / MLX_HOSTFILE / MPI).
        A collective that waits longer than MESP_MLX_COLLECTIVE_TIMEOUT seconds (600) ends the process."""
        if timeout_s is None:
            timeout_s = float(os.environ.get("MESP_MLX_COLLECTIVE_TIMEOUT", 600))
        if not mx.distributed.is_available():
            return cls(None, timeout_s)
        launched = any(k in os.environ for k in ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
                                                 "MLX_JACCL_DEVICES", "MLX_IBV_DEVICES"))
        try:
            group = mx.distributed.init(strict=launched)
        except Exception as e:  # noqa: BLE001 - MLX raises RuntimeError / ValueError for a bad launch environment
            raise PeerLost(f"cannot join the distributed run ({e}); check the hostfile and that every rank started")
        return cls(group if group.size() > 1 else None, timeout_s)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def reset_counters(self) -> None:
        self.bytes_sent, self.seconds = 0, 0.0

    # --- collectives --------------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        """One daemon thread per process: ends the process when a collective has waited past its deadline."""
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                print(f"mesp-mlx: error: rank {self.rank}: no answer from the other ranks for {self.timeout_s:.0f} s "
                      "(a rank hung or the network is down); exiting", file=sys.stderr, flush=True)
                os._exit(PEER_LOST_EXIT)

    def _all_sum(self, x: mx.array) -> mx.array:
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, daemon=True)
            self._watchdog.start()
        start = time.perf_counter()
        self._deadline = time.monotonic() + self.timeout_s
        try:
            out = mx.distributed.all_sum(x, group=self.group, stream=mx.cpu)
            mx.eval(out)
        except RuntimeError as e:
            raise PeerLost(f"rank {self.rank}: lost the connection to another rank ({e}); the last saved state is "
                           "kept, --resume continues it once every rank runs again") from None
        finally:
            self._deadline = None
        self.seconds += time.perf_counter() - start
        self.bytes_sent += x.nbytes
        return out

    def sum_scalars(self, values: list[float]) -> list[float]:
        if self.size == 1:
            return list(values)
        return self._all_sum(mx.array(values, dtype=mx.float64)).tolist()  # float64 on the CPU stream: exact sums

    def sum_scalar(self, value: float) -> float:
        return self.sum_scalars([value])[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (e.g. a stop signal that reached one rank only)."""
        return flag if self.size == 1 else self.sum_scalar(1.0 if flag else 0.0) > 0

    def sum_tree(self, tree):
        """Σ over ranks of every array of `tree` (same structure on every rank), in one flat fp32 buffer."""
        if self.size == 1:
            return tree
        flat = tree_flatten(tree)
        if not flat:
            return tree
        parts = [v.astype(mx.float32).reshape(-1) for _, v in flat]
        summed = self._all_sum(mx.concatenate(parts))
        out, offset = [], 0
        for (k, v) in flat:
            n = v.size
            out.append((k, summed[offset:offset + n].reshape(v.shape).astype(v.dtype)))
            offset += n
        return tree_unflatten(out)

    def broadcast_json(self, obj):
        """Rank 0's JSON-serialisable `obj` on every rank (others pass anything)."""
        if self.size == 1:
            return obj
        data = json.dumps(obj).encode() if self.rank == 0 else b""
        n = int(self.sum_scalar(float(len(data))))
        buf = np.zeros(n, np.int32)
        if self.rank == 0:
            buf[:] = np.frombuffer(data, np.uint8)
        got = np.array(self._all_sum(mx.array(buf))).astype(np.uint8).tobytes()
        return json.loads(got.decode())

    def broadcast_arrays(self, arrays: dict) -> dict:
        """Rank 0's {name: array} on every rank (exact: the others contribute zeros)."""
        if self.size == 1:
            return arrays
        spec = self.broadcast_json({k: [list(v.shape), str(v.dtype).split(".")[-1]] for k, v in arrays.items()}
                                   if self.rank == 0 else None)
        out = {}
        for k, (shape, dtype) in spec.items():
            dt = getattr(mx, dtype)
            x = arrays[k] if self.rank == 0 else mx.zeros(shape, dt)
            out[k] = self._all_sum(x)  # a sum with zeros is exact, in any dtype
        return out


def localhost_hostfile(path, world: int):
    """Write a ring hostfile for `world` ranks on this machine (free ports) for MLX_HOSTFILE; return its path."""

    socks = [socket.socket() for _ in range(world)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    path = Path(path)
    path.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    return path
