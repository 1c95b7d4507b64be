"""Backend facts: which device MLX runs on, which BLAS it uses, and which compute path fits it.

On Linux the mlx-cpu wheel bundles netlib's reference BLAS (~1 GFLOP/s fp32 GEMM). `link_openblas` replaces that bundled
library in the virtual environment by a link to the system OpenBLAS, so every MLX process of the environment is fast
without any variable set. `blas_in_use` reads the process's memory map to tell which one is loaded.

mlx is imported inside the functions that use it, never at the top: `python -m mesp_mlx.backend --link-openblas`
relinks the BLAS that MLX loads, so that command must run without MLX loaded in its process.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import glob
import os
import platform
import sys
import time
from dataclasses import dataclass


def is_metal() -> bool:
    import mlx.core as mx  # not at the top: see the module note

    return mx.metal.is_available() and mx.default_device() == mx.gpu


def compute_path(requested: str = "auto") -> str:
    """'fused' (quantized_matmul, right on Metal) or 'dequant' (dequantize a matrix just in time + fp32 GEMM, right on CPU)."""
    if requested not in ("auto", "fused", "dequant"):
        raise ValueError(f"unknown compute path {requested!r} (auto, fused, dequant)")
    if requested != "auto":
        return requested
    return "fused" if is_metal() else "dequant"


def default_dtype() -> str:
    """fp32 on CPU (fp16/bf16 GEMM is slow there); the model's own float dtype on Metal."""
    return "native" if is_metal() else "float32"


def _bundled_blas_files() -> list[str]:
    import mlx  # not at the top: see the module note

    # mlx is a namespace package (no __file__): its folder is the first __path__ entry, in site-packages
    package_dir = os.path.dirname(mlx.__file__) if mlx.__file__ else list(mlx.__path__)[0]
    site = os.path.dirname(package_dir)
    return sorted(glob.glob(os.path.join(site, "mlx_cpu.libs", "libblas-*.so*")))


def blas_in_use() -> str:
    """Path of the BLAS library mapped into this process after MLX has run a GEMM ('' if none / not Linux)."""
    import mlx.core as mx  # not at the top: see the module note

    mx.eval(mx.ones((4, 4)) @ mx.ones((4, 4)))
    if not os.path.exists("/proc/self/maps"):
        return "Accelerate" if platform.system() == "Darwin" else ""
    libs = set()
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            # numpy ships its own OpenBLAS; only the library MLX links counts here.
            if "blas" in os.path.basename(path).lower() and "numpy" not in path and "scipy" not in path:
                libs.add(path)
    return ", ".join(sorted(libs))


@functools.cache
def _openblas():
    """MLX's OpenBLAS as a ctypes library (None when MLX uses another BLAS); looked up once."""
    for path in blas_in_use().split(", "):
        if "openblas" in os.path.basename(path).lower():
            try:
                lib = ctypes.CDLL(path)
                lib.openblas_get_num_threads()
                return lib
            except (OSError, AttributeError):
                continue
    return None


def set_blas_threads(n: int) -> int | None:
    """Set the threads of MLX's OpenBLAS GEMMs; returns the previous count (None: not OpenBLAS, nothing done). Lanes
    (engine/lanes.py) run one GEMM per core at once, each single-threaded: two threads each oversubscribe the cores."""
    lib = _openblas()
    if lib is None:
        return None
    old = lib.openblas_get_num_threads()
    if old != n:
        lib.openblas_set_num_threads(n)
    return old


def is_reference_blas(name: str) -> bool:
    """True when the BLAS in use is the slow netlib reference build bundled in the mlx-cpu wheel."""
    return bool(name) and "openblas" not in name.lower() and ("mlx_cpu.libs" in name or "libblas" in name.lower())


def measure_gemm_gflops(m: int = 256, k: int = 896, n: int = 4864, repeats: int = 3) -> float:
    """fp32 GEMM throughput of MLX's default device, in GFLOP/s (the shape of a 0.5B model's MLP at seq 256)."""
    import mlx.core as mx  # not at the top: see the module note

    a = mx.random.normal((m, k))
    b = mx.random.normal((k, n))
    mx.eval(a, b, a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    seconds = (time.perf_counter() - start) / repeats
    return 2.0 * m * k * n / seconds / 1e9


@dataclass
class DoctorReport:
    backend: str
    mlx_version: str
    mlx_lm_version: str
    blas: str
    gemm_gflops: float
    slow_blas: bool

    def lines(self) -> list[str]:
        out = [
            f"backend      : {self.backend}",
            f"mlx          : {self.mlx_version}",
            f"mlx-lm       : {self.mlx_lm_version}",
            f"BLAS         : {self.blas or 'unknown'}",
            f"fp32 GEMM    : {self.gemm_gflops:.1f} GFLOP/s (256x896 @ 896x4864)",
        ]
        if self.slow_blas:
            out += [
                "",
                "!" * 78,
                "WARNING: MLX is using the slow reference BLAS bundled in the mlx-cpu wheel.",
                "Training and every timing will be ~50x slower. Fix: run ./scripts/setup.sh (links the",
                "wheel's BLAS to OpenBLAS), or preload it for this process:",
                "  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
                "!" * 78,
            ]
        return out


def doctor() -> DoctorReport:
    import mlx.core as mx  # not at the top: see the module note
    import mlx_lm  # not at the top: see the module note

    backend = f"Metal ({mx.default_device()})" if is_metal() else f"CPU ({platform.system()} {platform.machine()})"
    blas = blas_in_use()
    return DoctorReport(
        backend=backend,
        mlx_version=mx.__version__,
        mlx_lm_version=mlx_lm.__version__,
        blas=blas,
        gemm_gflops=measure_gemm_gflops(),
        slow_blas=is_reference_blas(blas) and not is_metal(),
    )


def link_openblas(openblas: str) -> None:
    """Replace the wheel's bundled reference BLAS by a link to `openblas` (the original kept as *.reference)."""
    if not os.path.exists(openblas):
        raise SystemExit(f"OpenBLAS not found at {openblas}")
    files = [f for f in _bundled_blas_files() if not f.endswith(".reference")]
    if not files:
        print("[setup] no bundled BLAS in this MLX build (nothing to link)")
        return
    for path in files:
        if os.path.islink(path) and os.path.realpath(path) == os.path.realpath(openblas):
            continue
        if not os.path.islink(path):
            os.replace(path, path + ".reference")
        else:
            os.remove(path)
        os.symlink(openblas, path)
        print(f"[setup] {os.path.basename(path)} -> {openblas}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="backend helpers")
    parser.add_argument("--link-openblas", metavar="LIB")
    args = parser.parse_args()
    if args.link_openblas:
        link_openblas(args.link_openblas)
    else:
        print("\n".join(doctor().lines()))
        sys.exit(0)
