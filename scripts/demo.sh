#!/usr/bin/env bash
# Set up (idempotent) and run the demo on the embedded default model (mini-3b, seeded random weights).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m v4lens.demo "$@"
