#!/usr/bin/env bash
# One call on a lent GPU machine (torch there, no registry): build the extension for sm_90,
# run the CUDA tests and the GPU benchmarks, and write everything under $OUT.
#   device run:  bash benchmarks/gpu_check.sh
# Each stage has its own time limit so that a slow stage cannot eat the others' results.
# $OUT gets 8 files (the device tool returns at most 8): gpu.txt build.log tests.log bench.log
# bench_loss.json sweep.json bench_step.json summary.md.
set -uo pipefail
OUT=${OUT:-/tmp/pid_fast_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PID_FAST_CUDA=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

start=$(date +%s)
$PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
echo "build_s $(( $(date +%s) - start ))" | tee -a "$OUT/gpu.txt"
$PY -c "import pid_fast, json; print(json.dumps(pid_fast.build_info()))" | tee -a "$OUT/gpu.txt"

# Correctness on the GPU: the CUDA/Triton-vs-reference tests and the fast training step first,
# each file in its own process (a crash in one cannot hide the other's results); the whole ops
# suite on this torch runs last, in the time that is left.
run_tests() {  # file timeout
  timeout "$2" $PY -X faulthandler -m pytest "$1" -q -p no:cacheprovider ${PID_FAST_TEST_ARGS:-} \
    > "$OUT/part.log" 2>&1
  echo "$1 rc=$?"; grep -E "^(FAILED|ERROR)|Fatal Python|line [0-9]+ in test_" "$OUT/part.log" | head -10
  tail -1 "$OUT/part.log"; cat "$OUT/part.log" >> "$OUT/tests.log"; rm "$OUT/part.log"
}
run_tests tests/ops/test_ops_cuda.py 75
run_tests tests/train/test_step_cuda.py 75
# A SIGSEGV was seen once on an H200 in this test alone (C++ argument checks raising through the
# ops); on its own, and with a native backtrace when it crashes and gdb is there.
DIRECT="tests/ops/test_ops.py::test_direct_op_calls_with_bad_input_raise"
run_tests "$DIRECT" 60
if ! timeout 60 $PY -m pytest "$DIRECT" -q -p no:cacheprovider > /dev/null 2>&1 && command -v gdb > /dev/null; then
  timeout 90 gdb -batch -ex run -ex bt --args $PY -m pytest "$DIRECT" -q -p no:cacheprovider 2>&1 \
    | tail -40 | tee -a "$OUT/tests.log"
fi

# Speed of the loss op: eager / compiled reference, CUDA and Triton ops (+ copy bandwidth).
timeout 100 $PY -m pytest benchmarks/bench_pid_loss.py -c benchmarks/pytest.ini -q \
  -p no:cacheprovider --benchmark-json="$OUT/bench_loss.json" >> "$OUT/bench.log" 2>&1
echo "bench_loss rc=$?"
timeout 25 $PY benchmarks/sweep_cuda_chunk.py "$OUT/sweep.json"

# The whole training step (official-style vs pid_fast default vs compiled; CIFAR-10 DDPM++ and
# ImageNet-64 ADM) and the bf16 matmul ceiling.
timeout 150 $PY -m pytest benchmarks/bench_step.py -c benchmarks/pytest.ini -q \
  -p no:cacheprovider --benchmark-json="$OUT/bench_step.json" >> "$OUT/bench.log" 2>&1
echo "bench_step rc=$?"; grep -E "^(FAILED|ERROR)|Error" "$OUT/bench.log" | head -5
$PY benchmarks/summarize.py "$OUT/bench_loss.json" | tee "$OUT/summary.md"
$PY benchmarks/summarize.py "$OUT/bench_step.json" | tee -a "$OUT/summary.md"
left=$(( ${PID_FAST_GPU_BUDGET:-580} - ($(date +%s) - start) ))
[ "$left" -gt 20 ] && run_tests tests/ops/test_ops.py "$left"
echo "total_s $(( $(date +%s) - start ))"
