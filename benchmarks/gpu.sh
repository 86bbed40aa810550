#!/usr/bin/env bash
# The GPU figures of docs/results.md §6 in one run (about 6 minutes on one H200): every sampler's batch
# independence on the device (built-in, LLaDA- and Dream-style models), `large` and the Dream-7B shape (28
# layers, and 4; batch 8 and 32) through speed.py, the fixed-shape head passes against the step before them
# (exact_speedups.py part 2), and the key-value caches at length 256. Needs a python3 whose torch sees a
# CUDA GPU; writes JSON and logs under $OUT (runs/gpu).
set -uo pipefail
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
status=0
run() { echo "\$ $*"; "$PY" "$@" || status=1; }
run benchmarks/device_check.py --device cuda --json "$OUT/device_check.json"
run benchmarks/speed.py --preset dream-7b --length 128 --batch-size 8 --device cuda --dtype bfloat16 --repeats 3 \
    --compare-anywhere --json "$OUT/dream7b.json"
run benchmarks/speed.py --preset dream-7b --layers 4 --length 128 --batch-size 8 --device cuda --dtype bfloat16 \
    --repeats 3 --json "$OUT/dream7b_4layers.json"
run benchmarks/speed.py --preset large --length 128 --batch-size 8 --device cuda --repeats 3 --json "$OUT/large.json"
run benchmarks/exact_speedups.py --only passes --device cuda --dtype bfloat16 \
    --shapes "dream-7b:128:8:4+8+adjust:tau=0.9/8" --json "$OUT/passes_dream7b.json"
run benchmarks/exact_speedups.py --only passes --device cuda --shapes "large:128:8:4+8,tiny:64:8:4+8" \
    --json "$OUT/passes_large.json"
run benchmarks/speed.py --preset dream-7b --length 128 --batch-size 32 --device cuda --dtype bfloat16 --repeats 2 \
    --tokens-per-step 4,8 --json "$OUT/dream7b_batch32.json"
run benchmarks/kv_cache.py --preset large --length 256 --block-length 32 --batch-size 1 --device cuda --repeats 3 \
    --samplers sequential:1,adjust:4 --json "$OUT/kv_large.json"
exit $status
