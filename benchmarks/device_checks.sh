#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: the GPU-marked tests, then the benchmarks.
# Usage: bash benchmarks/device_checks.sh [tests] [meter] [decode] [serve] [train]   (default: tests serve train)
# Logs go to $OUT (or ./device-out). On a machine without aifab's dependencies, wheels in .whl/ are installed
# into /tmp/site first. Each part has its own time limit so one slow part cannot eat the others.
#
# Seen on an H200 (2026-11-26): tests 57-71 s; train 84 s; decode 105 s without finishing its compiled variant
# (torch.compile of the 22-layer model takes longer); serve over 350 s with --compile (cut before the
# transformers baseline). With 15 minutes of device time, two calls fit: `tests meter decode`, then `serve train`.
set -u
OUT=${OUT:-device-out}; mkdir -p "$OUT"
if [ -z "${SKIP_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 AIFAB_NO_PROGRESS=1
nvidia-smi --query-gpu=name,memory.total,power.draw,clocks.sm --format=csv | tee "$OUT/nvidia-smi.txt"
parts=${*:-tests serve train}
for part in $parts; do
  start=$(date +%s)
  case $part in
    tests)
      timeout ${TESTS_TIMEOUT_S:-240} python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
        tests/serve/test_batching.py tests/serve/test_fleet.py tests/meter/test_gpu_accuracy.py \
        tests/meter/test_samplers.py \
        2>&1 | tee "$OUT/tests.log"
      ;;
    serve)
      # CUDA graphs without compile by default (compiling the model at server start took minutes on the H200);
      # SERVE_FLAGS=--serve-arg=--compile to measure compiled graphs
      timeout ${SERVE_TIMEOUT_S:-330} python3 benchmarks/serve.py --gpu --levels 1,16 --hf-levels 16 --rounds 1 \
        --max-tokens 64 ${SERVE_FLAGS:-} 2>&1 | tee "$OUT/serve.log"
      ;;
    meter)
      timeout ${METER_TIMEOUT_S:-150} python3 benchmarks/meter.py --gpu --requests 32 --max-tokens 128 --rounds 2 \
        2>&1 | tee "$OUT/meter.log"
      ;;
    decode)
      timeout ${DECODE_TIMEOUT_S:-200} python3 benchmarks/decode_step.py 2>&1 | tee "$OUT/decode.log"
      ;;
    train)
      timeout ${TRAIN_TIMEOUT_S:-300} python3 benchmarks/train.py --gpu 2>&1 | tee "$OUT/train.log"
      ;;
    *) echo "unknown part $part (tests, decode, meter, serve, train)"; exit 2 ;;
  esac
  echo "== $part took $(( $(date +%s) - start )) s"
done
