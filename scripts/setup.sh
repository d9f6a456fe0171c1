#!/usr/bin/env bash
# Create .venv in the repository root and install blockswarm with its test tools. Safe to re-run.
# torch goes in first, pinned to a build that is available locally (override with TORCH_SPEC, e.g. for CUDA),
# so that resolving the other requirements never pulls a multi-GB CUDA build by itself. Every other package gets
# the exact version in requirements.lock (refreshed by scripts/lock.sh), so every install is the one CI tested.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
LOCK=requirements.lock

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# pip's own failure fails the script (pipefail); only its noise about the install location is dropped
pip_install() { "${PIP[@]}" install "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC"
    pip_install -c "$LOCK" "$TORCH_SPEC"
    .venv/bin/python -c "import torch" || { echo "[setup] torch failed to install"; exit 1; }
fi
# The monitor's browser test drives Debian's Chromium through ChromeDriver (selenium, a dev extra).
if { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; } && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null; then
    echo "[setup] installing chromium and chromium-driver (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q chromium chromium-driver; } >/dev/null \
        || echo "[setup] warning: could not install chromium; the browser test will fail"
fi
echo "[setup] installing blockswarm and its dependencies (versions from $LOCK)"
pip_install -c "$LOCK" -e ".[dev]"
.venv/bin/python -c "import blocks.quantization, dht, peers, swarm, privacy, hivemind, transformers, pytest" \
    || { echo "[setup] installation is incomplete"; exit 1; }
echo "[setup] ready: $(.venv/bin/python -c 'import torch, transformers, hivemind; print(f"torch {torch.__version__}, transformers {transformers.__version__}, hivemind {hivemind.__version__}")')"
