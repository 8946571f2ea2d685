"""Long-run stability (tq_deploy.validate.long_run): 100,000 decode steps of TQCacheUpdate ->
TQPagedAttention through an ONNX Runtime CPU session with IO binding, the caches updated in place
as a ring; resident memory flat after warm-up (< 1 % growth) and the end state equal to the
reference. The long form on a GPU: `tq-deploy soak --steps 100000 --provider cuda`."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("onnxruntime")

from tq_deploy.runtime.library import NativeLibraryNotFoundError, ort_library_path  # noqa: E402
from tq_deploy.validate.long_run import rss_bytes, soak  # noqa: E402

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
    """The measurement can fail: a thread that keeps 2 MiB more every 20 ms while the loop runs is a
    leak of the process, and the soak must report it."""
    kept, stop = [], threading.Event()

    def leak():
        while not stop.is_set():
            kept.append(bytearray(2 << 20))  # bytearray touches its pages: they count in VmRSS
            time.sleep(0.02)

    before = rss_bytes()
    thread = threading.Thread(target=leak, daemon=True)
    thread.start()
    try:
        report = soak(8_000, warmup=500, seed=2)
    finally:
        stop.set()
        thread.join()
    grown = len(kept) * 2 << 20
    kept.clear()
    assert grown > 0.02 * before, f"the leak thread kept only {grown} bytes"
    assert not report.passed and any("VmRSS grew" in p for p in report.problems), report.to_text()
