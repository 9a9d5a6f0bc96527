#!/usr/bin/env bash
# Create .venv and install v4lens with its dev extras. torch is pinned to 2.13.0 first: on this
# machine that is a local CPU build; an unpinned torch could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
