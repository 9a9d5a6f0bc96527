#!/usr/bin/env bash
# Create .venv and install v4lens with its dev extras. torch is pinned to 2.13.0 first: on this
# machine that is a local CPU build; an unpinned torch could pull a multi-GB CUDA build.
# Figure export (PNG/SVG/PDF) and the browser tests need a Chromium: Debian's `chromium` and
# `chromium-driver` are installed when missing and apt-get is usable (root); otherwise those
# tests are skipped with a reason and HTML export still works.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }) \
            || echo "setup: could not install chromium; PNG export and the browser tests will be skipped" >&2
    else
        echo "setup: no chromium (install Debian's chromium + chromium-driver for PNG export and browser tests)" >&2
    fi
fi
