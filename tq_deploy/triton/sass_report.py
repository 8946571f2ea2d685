"""Compile the attention split kernels for sm_90 without a GPU and count their loop's instructions.

On the H200 the kernels are not memory-bound (2-bit and 4-bit take the same time), so the
instructions their main loop issues per (token, KV head) are one bound on their speed. The
count is not a predictor by itself: two layout-0 variants with 69 and 66 warp-instructions per
token-head ran 660 and 435 us (occupancy and stalls differ; docs/performance.md). This tool
gives the count and the opcode mix for any variant on a CPU-only machine (with the ptxas /
cuobjdump shipped in Triton's wheel; the local Triton may generate other code than the GPU
machine's), to pick which variants deserve device time.

    python -m tq_deploy.triton.sass_report [--layouts 0,2,3] [--warps 2,4] [--stages 1,2] [--block-n 64]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile


def _signature(layout: int):
    ptr = dict(qrot_ptr="*fp16")
    if layout in (2, 3):
        ptr.update(kb_ptr="*u8", kn_ptr="*fp32", vb_ptr="*u8", vn_ptr="*fp32", bt_ptr="*i32", ctx_ptr="*i32",
                   klut_ptr="*i32", vlut_ptr="*i32")
    else:
        ptr.update(kw_ptr="*i32", kb_ptr="*u8", kn_ptr="*fp32", vw_ptr="*i32", vb_ptr="*u8", vn_ptr="*fp32",
                   bt_ptr="*i32", ctx_ptr="*i32", kcb_ptr="*fp16", vcb_ptr="*fp16")
    ptr.update(m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32")
    ints = dict(bt_stride="i32", num_kv_heads="i32", tokens_per_split="i32", num_splits="i32")
    return ptr, ints


def compile_split(layout: int, num_warps: int, num_stages: int, block_n: int, bits: int = 4, dim: int = 128,
                  group: int = 4, page: int = 16):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tq_deploy.triton import _attention_kernels as K

    ptr, ints = _signature(layout)
    const = dict(G=group, GP=max(16, group), D=dim, PAGE=page, BLOCK_N=block_n, UPCAST=False)
    if layout == 2:
        fn = K.split_kernel_pairs
    elif layout == 3:
        fn = K.split_kernel_pairs_joined
    else:
        fn = K.split_kernel
        const.update(KBITS=bits, VBITS=bits, LOOKUP=0)
    sig = {**ptr, **ints, **{k: "constexpr" for k in const}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(sig.values()) if v.startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def loop_report(compiled) -> dict:
    """Registers and opcode counts of the longest backward-branch loop in the kernel's SASS."""
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
        res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True).stdout
    finally:
        os.unlink(path)
    instrs = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2)))
    loop = None
    for addr, ins in instrs:
        m = re.search(r"BRA .*?0x([0-9a-f]+)", ins)
        if m:
            target = int(m.group(1), 16)
            if target < addr and (loop is None or addr - target > loop[1] - loop[0]):
                loop = (target, addr)
    body = [ins for a, ins in instrs if loop and loop[0] <= a <= loop[1]]
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", i).split()[0].split(".")[0] for i in body)
    regs = re.search(r"REG:(\d+)", res)
    return {"regs": int(regs.group(1)) if regs else None, "loop_instructions": len(body), "ops": dict(ops.most_common())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default="0,2,3")
    ap.add_argument("--warps", default="2,4")
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--block-n", type=int, default=64)
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    print(f"{'layout':>6} {'warps':>5} {'stages':>6} {'regs':>4} {'loop instr':>10} {'warp-instr/token-head':>21}  top ops")
    for layout in (int(v) for v in args.layouts.split(",")):
        for warps in (int(v) for v in args.warps.split(",")):
            for stages in (int(v) for v in args.stages.split(",")):
                try:
                    rep = loop_report(compile_split(layout, warps, stages, args.block_n))
                except Exception as exc:  # a variant that does not compile is reported, not fatal
                    print(f"{layout:>6} {warps:>5} {stages:>6} failed: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                per = rep["loop_instructions"] * warps / args.block_n
                top = ", ".join(f"{k} {v}" for k, v in list(rep["ops"].items())[:6])
                print(f"{layout:>6} {warps:>5} {stages:>6} {rep['regs']!s:>4} {rep['loop_instructions']:>10} {per:>21.1f}  {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
