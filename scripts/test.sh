#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU, then the SAELens check (SAELens needs
# transformer-lens < 4: it runs on the oldest supported line, 3.9, in .venv-sae; scripts/test_saelens.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -n 2 --dist worksteal  # two workers, one core each (tests/conftest.py)
bash scripts/test_saelens.sh
