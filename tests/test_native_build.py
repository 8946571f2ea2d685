"""The native build (plugins/) and the library locator (tq_deploy.runtime.library).

Checks that the built custom-op library loads into the installed onnxruntime, exports
only its entry point, is found (or explained) by ort_library_path(), that the kernels
stay free of runtime headers, and that CMake fails with a clear message when the ONNX
Runtime headers cannot be had. A from-scratch CMake build with given headers is marked slow.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tq_deploy.runtime import library

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "plugins"


def built_library() -> str:
    try:
        return library.locate("ort")
    except library.NativeLibraryNotFoundError as err:
        pytest.skip(f"custom-op library not built: {err}")


@pytest.mark.parametrize("kind", sorted(library.LIBRARIES))
def test_missing_library_error_says_how_to_build(monkeypatch, tmp_path, kind):
    lib = library.LIBRARIES[kind]
    monkeypatch.delenv(lib.env_var, raising=False)
    monkeypatch.setattr(library, "candidates", lambda k: [tmp_path / library.LIBRARIES[k].filename])
    with pytest.raises(library.NativeLibraryNotFoundError) as info:
        library.locate(kind)
    message = str(info.value)
    for fragment in ("pip install -e .", "cmake -S plugins", lib.env_var, lib.filename, str(tmp_path)):
        assert fragment in message
    if kind == "ort":
        assert "npm" in message and "ORT_INCLUDE_DIR" in message
    if kind == "trt":
        assert "kernel-lens" in message and "TRT_INCLUDE_DIR" in message


@pytest.mark.parametrize("kind", sorted(library.LIBRARIES))
def test_env_var_must_name_a_file(monkeypatch, tmp_path, kind):
    env_var = library.LIBRARIES[kind].env_var
    monkeypatch.setenv(env_var, str(tmp_path / "nope.so"))
    with pytest.raises(library.NativeLibraryNotFoundError, match=env_var):
        library.locate(kind)


def test_env_var_wins(monkeypatch):
    path = built_library()
    monkeypatch.setenv("TQ_DEPLOY_ORT_LIBRARY", path)
    assert library.locate("ort") == str(Path(path).resolve())


def test_library_loads_in_installed_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    from tq_deploy.export.single_op import make_op_model

    path = built_library()
    options = ort.SessionOptions()
    assert library.register_library(options) == path
    for op, kwargs in [("TQEncode", {"bits": 3}), ("TQDecode", {"bits": 1}),
                       ("TQCacheUpdate", {"bits": 2}), ("TQPagedAttention", {"k_bits": 4, "v_bits": 2})]:
        for dtype in (["float32"] if op == "TQDecode" else ["float32", "float16"]):
            model = make_op_model(op, head_dim=64, dtype=dtype, **kwargs)
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_only_the_entry_points_are_exported():
    """RegisterCustomOps for ORT, TQDeployOrtBuildInfo for the session helpers; nothing else leaks."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not available")
    out = subprocess.run([nm, "-D", "--defined-only", built_library()], capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}
    assert exported == {"RegisterCustomOps", "TQDeployOrtBuildInfo"}, sorted(exported)[:20]


def test_kernels_have_no_runtime_dependency():
    """plugins/kernels is shared by the ORT and TensorRT glue: no runtime headers in it."""
    sources = [p for p in (PLUGINS / "kernels").rglob("*") if p.suffix in {".h", ".cpp", ".cu", ".cuh"}]
    assert sources
    for path in sources:
        includes = re.findall(r'#include\s+[<"]([^>"]+)[>"]', path.read_text())
        bad = [i for i in includes if i.startswith(("onnxruntime", "NvInfer"))]
        assert not bad, f"{path.relative_to(ROOT)} includes {bad}"


def _cmake_configure(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not on PATH")
    return subprocess.run([cmake, "-S", str(PLUGINS), "-B", str(tmp_path / "build"), *args],
                          capture_output=True, text=True, timeout=300)


def test_cmake_rejects_a_wrong_ort_include_dir(tmp_path):
    result = _cmake_configure(tmp_path, f"-DORT_INCLUDE_DIR={tmp_path / 'nowhere'}")
    assert result.returncode != 0
    assert "ORT_INCLUDE_DIR" in result.stderr and "onnxruntime_cxx_api.h" in result.stderr


def test_cmake_explains_a_failed_header_download(tmp_path):
    result = _cmake_configure(tmp_path, f"-DTQ_NPM_EXECUTABLE={tmp_path / 'no-npm'}")
    assert result.returncode != 0
    assert "npm pack" in result.stderr and "ORT_INCLUDE_DIR" in result.stderr


def _fetched_headers() -> Path | None:
    hits = sorted((ROOT / "build").glob("*/_deps/onnxruntime_headers/onnxruntime_cxx_api.h"))
    return hits[0].parent if hits else None


@pytest.mark.slow
def test_cmake_build_with_given_headers_runs_in_onnxruntime(tmp_path):
    """Configure with ORT_INCLUDE_DIR (no download), build, and run the fresh library."""
    ort = pytest.importorskip("onnxruntime")
    headers = _fetched_headers()
    if headers is None:
        pytest.skip("no fetched ONNX Runtime headers under build/ (build the package once first)")
    # the ORT library alone: the CUDA kernels (every attention instance, four architectures by
    # default) would take most of CI's time and are built and tested by the package install
    result = _cmake_configure(tmp_path, f"-DORT_INCLUDE_DIR={headers}", "-DCMAKE_BUILD_TYPE=Release",
                              "-DTQ_DEPLOY_CUDA=OFF", "-DTQ_DEPLOY_TRT=OFF")
    assert result.returncode == 0, result.stderr
    build = subprocess.run([shutil.which("cmake"), "--build", str(tmp_path / "build"), "-j", "2"],
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    fresh = tmp_path / "build" / "ort" / library.LIBRARIES["ort"].filename
    assert fresh.is_file()

    import numpy as np
    import torch

    from tq_deploy.export.single_op import initializer_arrays, make_op_model
    from tq_deploy.reference.quantizer import encode_reference

    model = make_op_model("TQEncode", head_dim=64, bits=4)
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(fresh))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng().standard_normal((50, 64)).astype(np.float32)
    codes, norms = session.run(None, {"x": x})
    init = {k: torch.from_numpy(v.copy()) for k, v in initializer_arrays(model).items()}
    ref_codes, ref_norms = encode_reference(torch.from_numpy(x), init["rotation"], init["codebook"], 4)
    np.testing.assert_allclose(norms, ref_norms.numpy(), rtol=2e-6)
    assert (codes != ref_codes.numpy()).mean() < 1e-2
