#!/usr/bin/env bash
# Every GPU check and figure in one run, on a machine with an NVIDIA GPU:
#
#   scripts/gpu_check.sh [OUT_DIR]        (default: gpu-results)
#
# 1. nvidia-smi and the providers ONNX Runtime offers (stops here, naming what is
#    missing, when the CUDA execution provider cannot start);
# 2. the CUDA tests: python -m pytest -m gpu;
# 3. a default-size model (256 / 1024) trained for a few steps on the GPU (speed
#    does not depend on the weights) on a corpus made of this checkout's own text,
#    so nothing is fetched, and exported with fp32 and fp16 verified on CUDA;
# 4. charstream-bench --device cuda for fp32 and fp16: rows 1-7 at 64 streams,
#    then rows 5 and 6 at 256 and 1024 streams (raw loop at the same batch),
#    with clients spread over several processes; row 12 (the ceiling) at 256;
#    then fp16 rows 5 and 6 at the largest stream count again with --frontends
#    FRONTENDS (default 4) gRPC front-end processes.
#
# Every step's output and JSON lands in OUT_DIR; a failed step is reported and
# the next one still runs. Environment: PYTHON (default python3) with the
# project importable (pip install -e '.[all]' with onnxruntime-gpu, or
# PYTHONPATH=.), BENCH_TIMEOUT (seconds per bench row, default 120), STREAMS
# (the larger stream counts, default "256 1024"), FRONTENDS (default 4), DEVICE (default cuda; cpu
# runs the same steps on the CPU provider, without the CUDA tests, to try the
# script on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-results}
PY=${PYTHON:-python3}
ROW_TIMEOUT=${BENCH_TIMEOUT:-120}
DEVICE=${DEVICE:-cuda}
STREAMS=${STREAMS:-256 1024}
FRONTENDS=${FRONTENDS:-4}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME COMMAND...: run it, its output to OUT/NAME.log, note a failure
    local name=$1; shift
    printf '\n==> %s: %s\n' "$name" "$*"
    local started=$SECONDS
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    printf '==> %s: exit %s after %ss\n' "$name" "$rc" "$((SECONDS - started))"
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

# The sampler's compiled kernel, built in place where it is missing (PYTHONPATH=. checkouts);
# without a compiler the server screens with NumPy (engine-cost prints which screen ran).
"$PY" -c 'import server.engine._sampling_kernel' 2>/dev/null \
    || step build-kernel "$PY" setup.py -q build_ext --inplace
step engine-cost "$PY" -m server.bench.engine_cost --json "$OUT/engine-cost.json"  # the host's own cost
step engine-cost-lagging "$PY" -m server.bench.engine_cost --lagging 0.1 --json "$OUT/engine-cost-lagging.json"

if [ "$DEVICE" = cuda ]; then
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || { echo "nvidia-smi failed: no NVIDIA driver here" >&2; exit 2; }
"$PY" - <<'EOF' 2>&1 | tee "$OUT/providers.txt"
import sys
from server.engine.model.providers import cuda_unavailable_reason
import onnxruntime
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
reason = cuda_unavailable_reason()
if reason:
    sys.exit(f"the CUDA execution provider cannot start: {reason} (install onnxruntime-gpu)")
print("CUDA execution provider: ok")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
step pytest-gpu "$PY" -m pytest -m gpu -q -p no:cacheprovider
fi

cat README.md docs/*.md server/README.md training/README.md export/README.md > "$WORK/corpus.txt"
step train "$PY" -m training --corpus "$WORK/corpus.txt" --out "$WORK/run" --max-steps 40 --eval-every 40 \
    --device "$DEVICE" --no-progress
step export "$PY" -m export "$WORK/run" --out "$WORK/model" --variants fp32,fp16 --greedy-chars 200
cp "$WORK/model/manifest.json" "$OUT/manifest.json" 2>/dev/null

bench() {  # bench NAME ARGS...: one charstream-bench run, its JSON in OUT/NAME.json
    local name=$1; shift
    step "$name" "$PY" -m server.bench.bench --model "$WORK/model" --device "$DEVICE" \
        --timeout "$ROW_TIMEOUT" --json "$OUT/$name.json" "$@"
}

for variant in fp32 fp16; do
    bench "bench-$variant-64" --variant "$variant" --checkpoint "$WORK/run" --batch 64 \
        --repeats 5 --streams-repeats 3 --ceiling-streams 256
    for streams in $STREAMS; do
        bench "bench-$variant-$streams" --variant "$variant" --streams "$streams" --batch "$streams" \
            --max-batch "$streams" --long-prompt 0 --repeats 1 --streams-repeats 1 \
            --ceiling-streams 0 --http-streams 0 --store-calls 20
    done
done

largest=${STREAMS##* }
bench "bench-fp16-$largest-frontends$FRONTENDS" --variant fp16 --streams "$largest" --batch "$largest" \
    --max-batch "$largest" --frontends "$FRONTENDS" --long-prompt 0 --repeats 1 --streams-repeats 1 \
    --ceiling-streams 256 --http-streams 0 --store-calls 20

printf '\n==> results in %s\n' "$OUT"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
