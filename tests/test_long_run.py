"""Long-run stability (tq_deploy.validate.long_run): 100,000 decode steps of TQCacheUpdate ->
TQPagedAttention through an ONNX Runtime CPU session with IO binding, the caches updated in place
as a ring; resident memory flat after warm-up (< 1 % growth) and the end state equal to the
reference. The long form on a GPU: `tq-deploy soak --steps 100000 --provider cuda`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")

from tq_deploy.runtime.library import NativeLibraryNotFoundError, ort_library_path  # noqa: E402
from tq_deploy.validate.long_run import soak  # noqa: E402

try:
    ort_library_path()
except NativeLibraryNotFoundError as err:  # pragma: no cover - depends on the build
    pytest.skip(f"custom-op library not built: {err}", allow_module_level=True)


def test_100k_decode_steps_memory_flat_and_outputs_right():
    report = soak(100_000, seed=1)
    print(report.to_text())
    assert report.steps == 100_000
    assert report.passed, report.to_text()
    assert report.rss_growth < 0.01 and report.max_rel_error < 1e-4


def test_a_leak_during_the_run_is_seen():
    """The measurement can fail: 16 KiB kept per step (128 MiB over the run, several % of a fresh
    process) is a leak, and the soak must report it. It runs in a fresh process: in this one, pages
    that earlier tests freed (a loaded LLM) would absorb the leak without VmRSS growing."""
    code = ("import json; from tq_deploy.validate.long_run import soak; "
            "r = soak(8_000, warmup=500, seed=2, leak_per_step=16 << 10); "
            "print(json.dumps({'passed': r.passed, 'problems': r.problems, 'text': r.to_text()}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["passed"] and any("VmRSS grew" in p for p in report["problems"]), report["text"]
