"""Loop instruction counts of the CUDA kernels, from the SASS of the built library (no GPU needed).

The decode attention's main loop is latency- and issue-bound (docs/performance.md): the
warp-instructions its loop body issues per 16-token tile are one bound on its speed. This tool
disassembles every kernel of libtq_deploy_cuda.so for one architecture with the cuobjdump that
Triton's wheel ships (or one on PATH) and prints, per kernel, its registers and the opcode mix of
its longest loop, so that a kernel change can be weighed before it spends device time.

    tq-deploy bench sass [--arch sm_90] [--match split_kernel]
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess

from tq_deploy.cli import count


def add_arguments(parser) -> None:
    parser.add_argument("--library", help="the .so or .cubin to read (default: the built libtq_deploy_cuda.so)")
    parser.add_argument("--arch", default="sm_90", help="the architecture's code to read (default sm_90)")
    parser.add_argument("--match", default="", help="only kernels whose mangled name contains this text")
    parser.add_argument("--top", type=count(1), default=8, help="opcodes shown per kernel (default 8)")


def cuobjdump() -> str:
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.isfile(bundled):
            return bundled
    except ImportError:
        pass
    found = shutil.which("cuobjdump")
    if not found:
        raise ValueError("cuobjdump not found: install triton (its wheel ships one) or the CUDA toolkit")
    return found


def kernels(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Function name -> [(address, instruction)] from ``cuobjdump -sass`` output."""
    out: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in sass.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(2)))
    return out


def longest_loop(instrs: list[tuple[int, str]]) -> list[str]:
    """The instructions between the target and the source of the longest backward branch."""
    loop = None
    for addr, ins in instrs:
        m = re.search(r"BRA .*?0x([0-9a-f]+)", ins)
        if m:
            target = int(m.group(1), 16)
            if target < addr and (loop is None or addr - target > loop[1] - loop[0]):
                loop = (target, addr)
    return [ins for a, ins in instrs if loop and loop[0] <= a <= loop[1]]


def opcode(ins: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0]


def run(args) -> int:
    from tq_deploy.runtime.library import locate

    path = args.library or locate("cuda")
    tool = cuobjdump()
    sass = subprocess.run([tool, "-sass", "-arch", args.arch, path], capture_output=True, text=True, check=False)
    if sass.returncode != 0 or "Function" not in sass.stdout:
        raise ValueError(f"{tool} -sass -arch {args.arch} {path} gave no kernels: {sass.stderr.strip()[:300]}")
    res = subprocess.run([tool, "-res-usage", "-arch", args.arch, path], capture_output=True, text=True).stdout
    regs = dict(re.findall(r"Function (\S+):\s*\n?\s*REG:(\d+)", res))
    print(f"{path} ({args.arch})")
    print(f"{'regs':>4} {'loop':>5}  kernel / top opcodes of its longest loop")
    for name, instrs in sorted(kernels(sass.stdout).items()):
        if args.match not in name:
            continue
        body = longest_loop(instrs)
        ops = collections.Counter(opcode(i) for i in body).most_common(args.top)
        print(f"{regs.get(name, '?'):>4} {len(body):>5}  {name[:110]}")
        print(f"{'':>11}{', '.join(f'{k} {v}' for k, v in ops)}")
    return 0
