#!/usr/bin/env bash
# One GPU visit, in one call (the device machine's python3 has torch + triton; nothing installs
# there): build the TensorRT plugin + enqueue harness for sm_90, run the whole test suite (the
# GPU tests included) and then the GPU benchmark. Logs and JSON go under $OUT (or ./gpu_out).
#
#   bash scripts/gpu_suite.sh [bench args...]      e.g. bash scripts/gpu_suite.sh --quick
#
# The TensorRT and ONNX Runtime headers must travel with the call (carry build/trt-headers and
# build/native/_deps/onnxruntime_headers: a CPU build fetches them there); without them the
# TensorRT GPU tests and the ONNX Runtime tests skip with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"; export OUT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
: "${BUILD_TIMEOUT:=90}" "${TEST_TIMEOUT:=170}" "${BENCH_TIMEOUT:=240}"

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/nvidia_smi.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/nvidia_smi.txt"

ORT_HEADERS="$PWD/build/native/_deps/onnxruntime_headers"
ort=OFF; [ -f "$ORT_HEADERS/onnxruntime_cxx_api.h" ] && ort=ON
trt=OFF; [ -f build/trt-headers/NvInfer.h ] && trt=ON
start=$SECONDS
timeout "$BUILD_TIMEOUT" bash -c "cmake -S plugins -B build/gpu -DTQ_DEPLOY_ORT=$ort -DTQ_DEPLOY_TRT=$trt \
    -DORT_INCLUDE_DIR='$ORT_HEADERS' -DTRT_INCLUDE_DIR='$PWD/build/trt-headers' -DTQ_CUDA_ARCHITECTURES=90 \
    -DCMAKE_BUILD_TYPE=Release && cmake --build build/gpu -j 16" > "$OUT/build.log" 2>&1
echo "native build (ORT $ort, TensorRT $trt): exit $? in $((SECONDS - start)) s (log: build.log)"
[ -f build/gpu/ort/libtq_deploy_ort.so ] && export TQ_DEPLOY_ORT_LIBRARY="$PWD/build/gpu/ort/libtq_deploy_ort.so"

xdist=""; $PY -c "import xdist" 2>/dev/null && xdist="-n 12"   # Triton compiles ~100 kernel variants
# GPU-marked tests first, then the rest; -v names every test as it ends, so a run cut short by
# the time limit still says which tests passed and failed.
timeout "$TEST_TIMEOUT" $PY -m pytest -v -p no:cacheprovider $xdist -rfEs -m gpu tests > "$OUT/tests_gpu.log" 2>&1
echo "GPU-marked tests: exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests_gpu.log" | tail -n 20
timeout "$TEST_TIMEOUT" $PY -m pytest -v -p no:cacheprovider $xdist -rfEs -m "not gpu" tests > "$OUT/tests.log" 2>&1
echo "other tests: exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -n 20

timeout "$BENCH_TIMEOUT" $PY scripts/bench_gpu.py --json "$OUT/bench_gpu.json" "$@" 2>&1 | tee "$OUT/bench.log"
