#!/usr/bin/env bash
# Create ./.venv (once) and install icsk with its dev extras into it. Safe to re-run.
# ICSK_TORCH="torch==X torchvision==Y" picks another torch build (any torch>=2.4 works).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    .venv/bin/pip install -q ${ICSK_TORCH:-torch==2.14.1 torchvision==0.29.1}
fi
.venv/bin/pip install -q -e '.[dev]'
echo "icsk environment ready: $(.venv/bin/python -c 'import icsk, torch; print("icsk", icsk.__version__, "torch", torch.__version__)')"
