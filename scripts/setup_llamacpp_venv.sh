#!/usr/bin/env bash
# Create the virtualenv that runs llama.cpp through llama-cpp-python (the single-stream peer in
# benchmarks/). It builds llama.cpp from source for this machine's CPU: a few minutes on 2 cores.
# Usage: scripts/setup_llamacpp_venv.sh [VENV_DIR]   (default .venv-llamacpp; safe to re-run)
set -euo pipefail

VENV="${1:-.venv-llamacpp}"
PY="${PYTHON:-python3}"
SPEC="${LLAMACPP_SPEC:-llama-cpp-python}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtualenv $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
VPY="$VENV/bin/python"
if "$VPY" -c 'import llama_cpp' >/dev/null 2>&1; then
    echo "[setup] llama-cpp-python already installed"
else
    # GGML_NATIVE builds for the CPU it runs on (AVX-512 where present), as a user building it would.
    echo "[setup] pip install $SPEC (builds llama.cpp from source)"
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" "$VPY" -m pip install --no-cache-dir "$SPEC"
fi
echo "[setup] checking import"
"$VPY" -c 'import llama_cpp; print("[setup] ok: llama-cpp-python", llama_cpp.__version__)'
