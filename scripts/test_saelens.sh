#!/usr/bin/env bash
# The SAELens check: SAELens pins transformer-lens<4, so it runs against v4lens on the oldest
# TransformerLens line v4lens supports (3.9) in a second venv, .venv-sae. That venv holds only
# transformer-lens 3.9, sae-lens and what they add; everything else (torch, transformers, ...)
# comes from .venv through a .pth line, so the set-up is ~60 s and ~0.3 GB, not another full stack.
# Runs SAELens's own runner on tiny-recall (tests/test_saelens.py) plus the cache tests on that line
# (the rest of the suite runs on 4.x; `tl_versions` holds what differs). Needs .venv (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MAIN_SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ ! -x .venv-sae/bin/python ]; then
    "$PY" -m venv .venv-sae
    SAE_SITE=$(.venv-sae/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$MAIN_SITE" > "$SAE_SITE/v4lens_main_venv.pth"  # after .venv-sae's own packages: its TL 3.9 wins
    .venv-sae/bin/python -m pip install -q "transformer-lens==3.9.0" "sae-lens==6.54.12" 2>&1 \
        | grep -v -e "is ignored: it is neither" -e "dependency resolver does not currently" \
                  -e "v4lens 0.1.0 requires transformer-lens" || true
fi
V4LENS_REQUIRE_SAELENS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" .venv-sae/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_saelens.py tests/test_cache.py "$@"
