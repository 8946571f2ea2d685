"""The driver: cases in child processes, so that a crash or a hang ends only the child.

A child runs a batch of cases and prints one JSON line per case. When it dies (a segfault or an
abort) or goes ``timeout`` seconds without a result, the first case it did not finish is the
culprit: it becomes a finding, and the rest of the batch runs in a new child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from tq_deploy.validate.fuzz.case import Finding
from tq_deploy.validate.fuzz.check import check_case
from tq_deploy.validate.fuzz.draw import coverage, draw_case
from tq_deploy.validate.fuzz.runners import OrtRunner, ort_kernels_missing


@dataclass
class FuzzReport:
    seed: int
    first: int
    cases: int
    seconds: float = 0.0
    valid: int = 0
    findings: list[Finding] = field(default_factory=list)
    batches: int = 0
    ops: tuple[str, ...] = ()
    left_out: dict[str, str] = field(default_factory=dict)  # op -> why it was not fuzzed
    ort_skipped: dict[str, str] = field(default_factory=dict)  # op -> why ONNX Runtime did not run it

    @property
    def passed(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {"seed": self.seed, "first": self.first, "cases": self.cases, "valid": self.valid,
                "seconds": round(self.seconds, 2), "batches": self.batches, "passed": self.passed,
                "ops": list(self.ops), "left_out": self.left_out, "ort_skipped": self.ort_skipped,
                "findings": [f.to_dict() for f in self.findings]}

    def to_text(self) -> str:
        lines = [f"fuzz seed {self.seed}, cases {self.first}..{self.first + self.cases - 1} "
                 f"({self.valid} valid, {self.cases - self.valid} with a defect) in {self.batches} child "
                 f"processes, {self.seconds:.1f} s: {len(self.findings)} findings"]
        lines += [f"  {op} not fuzzed: {why}" for op, why in self.left_out.items()]
        lines += [f"  {op}: ONNX Runtime not run, the custom-op library has no kernel for it ({why})"
                  for op, why in self.ort_skipped.items()]
        lines += [f"  case {f.case} {f.op} {f.kind}: {f.detail}" for f in self.findings[:50]]
        if len(self.findings) > 50:
            lines.append(f"  ... {len(self.findings) - 50} more")
        return "\n".join(lines)


def worker(seed: int, first: int, count: int, library, device, op_names, no_ort=()) -> None:
    """Runs cases [first, first + count) in this process, one JSON line per case on stdout."""
    import torch

    torch.set_num_threads(1)
    ort = OrtRunner(library, skip=no_ort)
    # Fault injection for the fuzzer's own tests: the child aborts or hangs at this case, as a
    # kernel that crashes or never returns would.
    abort_at = int(os.environ.get("TQ_DEPLOY_FUZZ_ABORT_AT", -1))
    hang_at = int(os.environ.get("TQ_DEPLOY_FUZZ_HANG_AT", -1))
    for index in range(first, first + count):
        if index == abort_at:
            os.abort()
        if index == hang_at:
            time.sleep(10**6)
        case = draw_case(seed, index, op_names)
        findings = check_case(case, ort, device)
        print(json.dumps({"case": index, "valid": not case.defect, "findings": [f.to_dict() for f in findings]}),
              flush=True)


def _child(seed, first, count, library, device, op_names, no_ort, timeout):
    """Run cases [first, first + count) in a child process; returns (result lines, status, stderr)
    where status is the exit code, or None when the child made no progress for ``timeout`` seconds
    (then it is killed)."""
    import queue
    import threading

    command = [sys.executable, "-m", "tq_deploy.validate.fuzz", "--seed", str(seed), "--first",
               str(first), "--cases", str(count), "--ops", ",".join(op_names)]
    if library:
        command += ["--library", os.fspath(library)]
    if device:
        command += ["--device", device]
    if no_ort:
        command += ["--no-ort-for", ",".join(no_ort)]
    # one BLAS thread: hundreds of small QR factorizations are far slower on an oversubscribed pool
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    errors: list[str] = []

    def pump(stream, put, end):
        for line in stream:
            put(line)
        if end:
            put(None)  # the child closed its stdout: it has exited or is about to

    threading.Thread(target=pump, args=(child.stdout, lines.put, True), daemon=True).start()
    threading.Thread(target=pump, args=(child.stderr, errors.append, False), daemon=True).start()
    out = []
    while True:
        try:
            line = lines.get(timeout=timeout)  # a hang is a case that gives no result for `timeout` s
        except queue.Empty:
            child.kill()
            child.wait()
            return out, None, "".join(errors)
        if line is None:
            break
        out.append(line)
    return out, child.wait(), "".join(errors)


def fuzz(seed: int = 0, cases: int = 200, *, first: int = 0, batch: int = 100, timeout: float = 120.0,
         library=None, device: str | None = None, op_names=None) -> FuzzReport:
    """Cases [first, first + cases) of ``seed``, ``batch`` per child process (module docstring).
    ``timeout``: seconds a child may go without finishing a case (its start-up included).
    ``op_names``: the ops to draw from (default: every op of the contract); an op the fuzzer cannot
    run yet, or ONNX Runtime has no kernel for, is named in the report (``left_out``, ``ort_skipped``)."""
    report = FuzzReport(seed, first, cases)
    asked = op_names
    op_names, report.left_out = coverage(op_names)
    report.ops = op_names
    if not op_names:
        why = "; ".join(f"{op}: {reason}" for op, reason in report.left_out.items())
        raise ValueError(f"ops {list(asked or report.left_out)} cannot be fuzzed ({why}), expected an op the fuzzer "
                         f"runs: {list(coverage()[0])}")
    report.ort_skipped = ort_kernels_missing(library, op_names)
    no_ort = tuple(report.ort_skipped)
    start = time.perf_counter()
    pending = [(i, min(batch, first + cases - i)) for i in range(first, first + cases, max(batch, 1))]
    while pending:
        lo, count = pending.pop(0)
        lines, rc, err = _child(seed, lo, count, library, device, op_names, no_ort, timeout)
        report.batches += 1
        seen = set()
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            seen.add(row["case"])
            report.valid += bool(row["valid"])
            report.findings += [Finding(**f) for f in row["findings"]]
        if rc == 0:
            continue
        # the child died (signal, abort) or hung: the first case it did not finish is the culprit
        culprit = next((i for i in range(lo, lo + count) if i not in seen), None)
        if culprit is None:  # every case done, then a failed exit (teardown)
            report.findings.append(Finding(lo + count - 1, "-", "crash" if rc else "hang",
                                           f"child exited with status {rc} after its last case: {err.strip()[-300:]}"))
            continue
        kind = "hang" if rc is None else "crash"
        why = f"no result within {timeout:.0f} s" if rc is None else \
            f"child exited with status {rc}" + (f": {err.strip().splitlines()[-1]}" if err.strip() else "")
        case = draw_case(seed, culprit, op_names)
        report.valid += not case.defect
        report.findings.append(Finding(culprit, case.op, kind, f"{why} [{case.describe()}]"))
        if culprit + 1 < lo + count:
            pending.insert(0, (culprit + 1, lo + count - culprit - 1))
    report.seconds = time.perf_counter() - start
    return report
