"""The process's memory as a phone counts it: its physical footprint (docs/memory.md, "The whole process").

iOS ends an app (jetsam) on its *physical footprint*, task_info(TASK_VM_INFO).phys_footprint: the process's dirty
private memory (anonymous pages: malloc, MLX's buffers, the interpreter's heap), its pages held compressed, and the
IOKit/Metal memory charged to it. Clean file-backed pages (code, libraries, mmap'd weights that were only read) are
not counted: the OS can drop and read them again. MLX's allocator figures (get_peak_memory) are only the part of that
footprint MLX allocated; Python, the libraries, the tokenizer and the allocators' slack are the rest.

    macOS   phys_footprint itself (ctypes over libSystem's task_info)
    Linux   RssAnon + VmSwap of /proc/self/status: the resident anonymous pages plus those swapped out. That is the
            dirty, not file-backed memory of the process, as phys_footprint is; swap stands in for iOS's compressor
            (VmHWM/max RSS would count file-backed pages as well, so the peak is sampled here, not read from there)
    other   None (nothing is measured, nothing is enforced)

Reading it costs microseconds (one small /proc read, or one system call), so the governor samples it after every
block; `FootprintMeter` keeps the largest sample of a window (a step) and of the whole run.

`release_free_heap` hands the C allocator's free pages back to the OS. glibc keeps freed blocks resident (MLX's CPU
buffers come from malloc), so on Linux the footprint after a block still holds most of that block's peak; tens of MB
of it are free memory no one uses. The planner releases what its probes leave, and the governor releases it before
it calls a footprint over the limit, as iOS's allocator gives free pages back under memory pressure.
"""

from __future__ import annotations

import ctypes
import os
import sys

MB = 1024 * 1024

# <mach/task_info.h>: TASK_VM_INFO's flavor, and its struct up to phys_footprint (rev1). The header declares it
# under #pragma pack(4), but every field up to phys_footprint falls on its natural alignment (the two 32-bit fields
# are adjacent), so the default layout is the same: phys_footprint at byte 144, 152 bytes in all.
TASK_VM_INFO = 22


class TaskVMInfo(ctypes.Structure):
    _fields_ = [("virtual_size", ctypes.c_uint64), ("region_count", ctypes.c_int32), ("page_size", ctypes.c_int32)] + \
        [(name, ctypes.c_uint64) for name in (
            "resident_size", "resident_size_peak", "device", "device_peak", "internal", "internal_peak", "external",
            "external_peak", "reusable", "reusable_peak", "purgeable_volatile_pmap", "purgeable_volatile_resident",
            "purgeable_volatile_virtual", "compressed", "compressed_peak", "compressed_lifetime", "phys_footprint")]


TASK_VM_INFO_REV1_COUNT = ctypes.sizeof(TaskVMInfo) // 4  # in natural_t (4 bytes): 38


def phys_footprint(task_info, task: int) -> int | None:
    """phys_footprint in bytes from `task_info(task, TASK_VM_INFO, &info, &count)`, or None when the call fails or
    the kernel returned less than the struct's rev1 (which holds phys_footprint)."""
    info, count = TaskVMInfo(), ctypes.c_uint32(TASK_VM_INFO_REV1_COUNT)
    if task_info(task, TASK_VM_INFO, ctypes.byref(info), ctypes.byref(count)) != 0:  # KERN_SUCCESS is 0
        return None
    if count.value < TASK_VM_INFO_REV1_COUNT:
        return None
    return int(info.phys_footprint)


def _darwin_reader():
    """A function reading this process's phys_footprint, or None when libSystem does not give one."""
    try:
        lib = ctypes.CDLL("/usr/lib/libSystem.B.dylib")
        task_info = lib.task_info
        task_info.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(TaskVMInfo),
                              ctypes.POINTER(ctypes.c_uint32)]
        task_info.restype = ctypes.c_int
        task = ctypes.c_uint32.in_dll(lib, "mach_task_self_").value  # what the mach_task_self() macro reads
        if phys_footprint(task_info, task) is None:
            return None
    except (OSError, AttributeError, ValueError, TypeError):
        return None
    return lambda: phys_footprint(task_info, task)


def _heap_release():
    """A function that returns the C heap's free pages to the OS (glibc malloc_trim, macOS malloc_zone_pressure_relief),
    or None."""
    try:
        if sys.platform.startswith("linux"):
            trim = ctypes.CDLL("libc.so.6").malloc_trim  # glibc only: musl has none (AttributeError)
            trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
            return lambda: trim(0)
        if sys.platform == "darwin":
            relief = ctypes.CDLL("/usr/lib/libSystem.B.dylib").malloc_zone_pressure_relief
            relief.argtypes, relief.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_size_t
            return lambda: relief(None, 0)  # every zone, as much as it can
    except (OSError, AttributeError):
        return None
    return None


_RELEASE = _heap_release()


def release_free_heap() -> None:
    """Give the C allocator's free pages back to the OS (a no-op where there is no way to)."""
    if _RELEASE is not None:
        _RELEASE()


def linux_footprint(status: bytes) -> int | None:
    """RssAnon + VmSwap in bytes from the text of /proc/<pid>/status; None without RssAnon (kernels before 4.5)."""
    values = {}
    for line in status.splitlines():
        if line.startswith((b"RssAnon:", b"VmSwap:")):
            key, value = line.split(b":", 1)
            values[key] = int(value.split()[0]) * 1024  # "kB"
    if b"RssAnon" not in values:
        return None
    return values[b"RssAnon"] + values.get(b"VmSwap", 0)


def _linux_reader():
    def read() -> int | None:
        try:
            with open("/proc/self/status", "rb") as f:
                return linux_footprint(f.read())
        except OSError:
            return None

    return read if read() is not None else None


def _reader():
    if sys.platform.startswith("linux") and os.path.exists("/proc/self/status"):
        return _linux_reader()
    if sys.platform == "darwin":
        return _darwin_reader()
    return None


_READ = _reader()
SOURCE = ("phys_footprint (task_info)" if sys.platform == "darwin" else "anonymous RSS + swap") if _READ else None


def footprint_bytes() -> int | None:
    """This process's footprint now, in bytes (None where it cannot be read)."""
    if _READ is None:
        return None
    try:
        return _READ()
    except (OSError, ValueError, ctypes.ArgumentError):
        return None


def footprint_mb() -> float | None:
    b = footprint_bytes()
    return None if b is None else b / MB


class FootprintMeter:
    """The largest footprint sampled in the current window (`take` closes it) and over the meter's life, in MB."""

    def __init__(self):
        self.window: float | None = None
        self.peak: float | None = None

    def sample(self) -> float | None:
        return self.record(footprint_mb())

    def record(self, mb: float | None) -> float | None:
        if mb is not None:
            self.window = mb if self.window is None else max(self.window, mb)
            self.peak = mb if self.peak is None else max(self.peak, mb)
        return mb

    def take(self) -> float | None:
        """The window's peak, with one sample now; opens a new window."""
        self.sample()
        out, self.window = self.window, None
        return out
