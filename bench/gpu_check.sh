#!/usr/bin/env bash
# One call on a fresh GPU machine (H100/H200; torch with CUDA, triton, nvcc, ninja installed; no
# internet), finishing within 9 minutes in all:
#
#   1. pip install --no-deps --no-build-isolation -e .   (builds _C and _C_cuda; TORCH_CUDA_ARCH_LIST=9.0a)
#   1b. python tools/tune_decode_table.py               (autotunes the decode launches, opt-in
#                                                        PEFT_KERNELS_AUTOTUNE=1, and rewrites the committed
#                                                        config table for this GPU: the tests and the bench
#                                                        below then run it; a copy lands in $OUT/configs)
#   2. python -m peft_kernels info
#   3. python -m pytest -m gpu -q                       (any failure makes the script exit non-zero,
#                                                        after the bench has run and the logs are kept)
#   4. python -m peft_kernels bench --quick --out $OUT/bench
#
# Every step runs under `timeout`, with its limit cut so the steps after it keep their share.
# Everything lands in $OUT (default ./gpu_check_out): env.log, build.log, tune.log, configs/decode.json, info.log, pytest_gpu.log,
# pytest_gpu.xml, bench.log, bench/results.{json,md}, bench/*.png, summary.txt.
#
#   OUT=/tmp/x bash bench/gpu_check.sh
#
# Without a CUDA device (a rehearsal) the build is skipped (GPU_CHECK_FORCE_BUILD=1 runs it anyway),
# the GPU tests report themselves skipped, and the bench runs its CPU quick shapes into the same files.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY="${PYTHON:-python}"
BUDGET="${GPU_CHECK_BUDGET_S:-530}"   # seconds for the whole script (the call may last 9 min = 540 s)
START=$(date +%s)
STATUS=0
export PYTHONUNBUFFERED=1
: > "$OUT/summary.txt"

note() { echo "gpu_check: $*" | tee -a "$OUT/summary.txt"; }

# limit CAP RESERVE: CAP seconds, or less so that RESERVE seconds remain for the later steps (min 15).
limit() {
    local cap=$1 reserve=$2 left
    left=$(( BUDGET - ($(date +%s) - START) - reserve ))
    (( left < cap )) && cap=$left
    (( cap < 15 )) && cap=15
    echo "$cap"
}

# step NAME CAP RESERVE CMD...: run CMD with its output in $OUT/NAME.log; returns its exit code.
step() {
    local name=$1 cap=$2 reserve=$3 t s rc
    shift 3
    t=$(limit "$cap" "$reserve")
    s=$(date +%s)
    echo "gpu_check: $name (limit ${t}s): $*" >&2
    { echo "\$ $*"; echo; } > "$OUT/$name.log"
    timeout --kill-after=10 "$t" "$@" >> "$OUT/$name.log" 2>&1
    rc=$?
    local how="rc=$rc"
    (( rc == 124 || rc == 137 )) && how="TIMED OUT after ${t}s (rc=$rc)"
    note "$name: $how in $(( $(date +%s) - s ))s"
    return $rc
}

step env 30 480 bash -c "nvidia-smi || echo 'nvidia-smi: not available'; $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA device\")'; $PY -c 'import triton; print(\"triton\", triton.__version__)'; command -v nvcc && nvcc --version | tail -2; git -C '$ROOT' rev-parse HEAD 2>/dev/null || echo 'no git commit'"

HAS_CUDA=$($PY -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)

# 1. build. Reserve: info ~20 s, GPU tests >= 110 s, bench >= 170 s.
if [[ "$HAS_CUDA" == 1 || "${GPU_CHECK_FORCE_BUILD:-0}" == 1 ]]; then
    if ! step build 240 300 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
            $PY -m pip install --no-deps --no-build-isolation -e "$ROOT"; then
        STATUS=1
        note "build FAILED: see build.log (continuing: ops fall back to the backends that load)"
    fi
else
    echo "no CUDA device: build skipped (set GPU_CHECK_FORCE_BUILD=1 to run it); using this checkout as is" > "$OUT/build.log"
    note "build: skipped (no CUDA device: GPU-only step)"
fi

# 1b. the decode config table, autotuned on this GPU (bf16 and fp16, D = 128: what fits the budget; the
#     other entries keep their committed compile-screened guesses). A timeout keeps the committed table.
if [[ "$HAS_CUDA" == 1 ]]; then
    if ! step tune 120 290 $PY "$ROOT/tools/tune_decode_table.py" --dtypes bf16,fp16 --head-dims 128 \
            --copy-to "$OUT/configs"; then
        STATUS=1
        note "tune FAILED: see tune.log (the tests run the committed table)"
    fi
else
    echo "no CUDA device: the decode config table cannot be autotuned here; the committed table is used" > "$OUT/tune.log"
    note "tune: skipped (no CUDA device: GPU-only step)"
fi

# 2. info
if ! step info 60 280 $PY -m peft_kernels info; then
    STATUS=1
    note "info FAILED: see info.log"
fi

# 3. GPU tests (skip themselves without CUDA). Failures fail the script, but only after the bench.
step pytest_gpu 180 170 $PY -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" "$ROOT/tests"
TEST_RC=$?
if (( TEST_RC != 0 )); then
    STATUS=1
    note "GPU tests FAILED (rc=$TEST_RC): see pytest_gpu.log"
fi
tail -n 3 "$OUT/pytest_gpu.log" | sed 's/^/gpu_check:   /' | tee -a "$OUT/summary.txt"

# 4. the quick bench: everything left but 25 s (it writes results.json after every row, so a timeout
#    keeps the rows done; the markdown and plots are then rendered from them).
step bench 600 25 $PY -m peft_kernels bench --quick --out "$OUT/bench"
BENCH_RC=$?
if (( BENCH_RC != 0 )); then
    STATUS=1
    note "bench FAILED (rc=$BENCH_RC): see bench.log (ours failing or a baseline disagreeing with ours fails it)"
    if (( BENCH_RC == 124 || BENCH_RC == 137 )) && [[ -f "$OUT/bench/results.json" ]]; then
        step render 20 0 $PY -m peft_kernels bench --render "$OUT/bench/results.json"
    fi
fi

ls -la "$OUT" "$OUT/bench" > "$OUT/files.txt" 2>&1
note "total $(( $(date +%s) - START ))s of ${BUDGET}s; exit $STATUS; files in $OUT"
exit $STATUS
