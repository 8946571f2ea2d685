#!/usr/bin/env bash
# Everything GPU-side for the Triton kernels in one call (device machine: python3 with torch + triton):
#   1. kernel resource report (registers, spills, tensor-core / 16-byte load instructions in SASS)
#   2. the Triton tests, compiled on the GPU (CPU-interpreter cases + the gpu-marked larger ones)
#   3. the benchmark (scripts/bench_gpu.py), table last
# Logs and JSON go to $OUT (or ./gpu_out). Usage: bash scripts/gpu_check.sh [--no-tests] [--no-bench] [bench args]
# e.g. bash scripts/gpu_check.sh --quick --sweep 8x32768   (about 5 minutes on the H200)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"; export OUT
PY="${PYTHON:-python3}"
run_tests=1; run_bench=1; bench_args=()
for a in "$@"; do
  case "$a" in --no-tests) run_tests=0;; --no-bench) run_bench=0;; *) bench_args+=("$a");; esac
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

$PY - <<'PY' 2>&1 | tee "$OUT/kernel_report.txt"
import re, torch
from tq_deploy.reference import lloyd_max_codebook, make_rotation
from tq_deploy.triton import attention as A
import tq_deploy.triton as tqt
dim, page, hkv, hq = 128, 16, 8, 32
for bits, seq, batch in ((4, 4096, 8),):
    n = batch * seq // page
    p = dim * bits // 8
    kc = torch.randint(0, 256, (n, page, hkv, p), dtype=torch.uint8, device="cuda")
    kn = torch.rand(n, page, hkv, device="cuda")
    bt = torch.randperm(n, device="cuda").reshape(batch, -1).int()
    ctx = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, dim, device="cuda", dtype=torch.float16)
    rot = make_rotation(dim).cuda(); cb = lloyd_max_codebook(dim, bits).cuda()
    tqt.paged_attention(q, kc, kn, kc, kn, bt, ctx, rot, cb, cb, bits, bits)
    for name, k in A.last_compiled.items():
        try:
            sass = k.asm["sass"]
        except Exception as exc:
            sass = ""
        ptx = k.asm.get("ptx", "") if hasattr(k, "asm") else ""
        ops = {op: len(re.findall(re.escape(op), sass)) for op in ("HMMA", "HGMMA", "LDG.E.128", "LDG.E.U16", "LDG.E.64", "LDG.E.CONSTANT", "LDS", "STS", "SHFL", "MUFU.EX2", "LDL", "STL", "LOP3", "SHF", "PRMT", "IMAD")}
        pops = {op: len(re.findall(re.escape(op), ptx)) for op in ("mma.sync", "wgmma", "ld.global.v4", "ld.global.b16", "ld.global.nc", "ld.shared", "st.shared", "shfl", "ldmatrix", "cp.async")}
        print(f"bits={bits} B={batch} {name}: regs={getattr(k, 'n_regs', '?')} spills={getattr(k, 'n_spills', '?')} "
              f"smem={getattr(k.metadata, 'shared', '?')} warps={k.metadata.num_warps} stages={k.metadata.num_stages}\n  sass {ops}\n  ptx {pops}")
        if name == "split" and bits in (4, 2) and batch == 8:
            open(__import__("os").environ["OUT"] + f"/split{bits}.sass", "w").write(sass or ptx)
    A.last_compiled.clear()
PY

if [ $run_tests = 1 ]; then
  xdist=""; $PY -c "import xdist" 2>/dev/null && xdist="-n 8"  # compiling ~120 kernel variants: use the cores
  $PY -m pytest -q -p no:cacheprovider $xdist tests/test_triton_quant.py tests/test_triton_attention.py -rs 2>&1 | tee "$OUT/tests.log"
fi
if [ $run_bench = 1 ]; then
  $PY scripts/bench_gpu.py --json "$OUT/bench_gpu.json" "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log"
fi
