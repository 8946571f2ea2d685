"""Locate the native libraries of tq-deploy: one locator, one not-found error, one env-var scheme.

    locate("ort")          libtq_deploy_ort.so   ONNX Runtime custom-op library (CPU + CUDA kernels)
    locate("cuda")         libtq_deploy_cuda.so  the CUDA kernels' C API, for the PyTorch path
    locate("trt")          libtq_deploy_trt.so   the TensorRT IPluginV3 plugins
    locate("trt_harness")  libtq_trt_harness.so  drives a plugin's enqueue without TensorRT (GPU tests)

They are built from ``plugins/`` by the package build (``pip install .`` or ``pip install -e .``;
scikit-build-core runs CMake) and installed in ``tq_deploy/lib/``. Search order (the first hit
wins):
    1. the environment variable of that library (TQ_DEPLOY_ORT_LIBRARY, TQ_DEPLOY_CUDA_LIBRARY,
       TQ_DEPLOY_TRT_LIBRARY, TQ_DEPLOY_TRT_HARNESS_LIBRARY): a file path; an error if it does
       not exist
    2. ``tq_deploy/lib/`` next to the imported package (regular installs)
    3. the files recorded for the installed ``tq-deploy`` distribution (editable installs place
       the libraries in site-packages while the package is imported from the source tree)
    4. ``build/*/<subdir>/`` in the source checkout (a hand-run ``cmake -S plugins -B build/...`` or
       the scikit-build build folder), newest first
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "tq-deploy"

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # tq_deploy/
_SOURCE_ROOT = _PACKAGE_DIR.parent  # the checkout, when imported from source


@dataclass(frozen=True)
class NativeLibrary:
    kind: str
    filename: str
    env_var: str
    build_subdir: str
    what: str
    needs: str  # what its build needs beyond cmake and a C++17 compiler


LIBRARIES = {
    lib.kind: lib
    for lib in (
        NativeLibrary("ort", "libtq_deploy_ort.so", "TQ_DEPLOY_ORT_LIBRARY", "ort", "ONNX Runtime custom-op library",
                      "npm (it runs `npm pack com.github.asus4.onnxruntime@0.4.9` for the ONNX Runtime headers) or "
                      "ORT_INCLUDE_DIR pointing at an onnxruntime include/ folder; its CUDA kernels need nvcc"),
        NativeLibrary("cuda", "libtq_deploy_cuda.so", "TQ_DEPLOY_CUDA_LIBRARY", "kernels/cuda", "CUDA kernel library",
                      "nvcc (CUDA >= 12)"),
        NativeLibrary("trt", "libtq_deploy_trt.so", "TQ_DEPLOY_TRT_LIBRARY", "trt", "TensorRT plugin library",
                      "nvcc and the TensorRT headers (fetched with `pip download --no-deps kernel-lens==2.0.1`, "
                      "or TRT_INCLUDE_DIR)"),
        NativeLibrary("trt_harness", "libtq_trt_harness.so", "TQ_DEPLOY_TRT_HARNESS_LIBRARY", "trt",
                      "TensorRT plugin test harness", "what the TensorRT plugin library needs"),
    )
}


class NativeLibraryNotFoundError(FileNotFoundError):
    """A native library of tq-deploy is not built, or not where tq_deploy looks for it."""


def _installed_candidates(name: str) -> list[Path]:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return []
    return [Path(dist.locate_file(f)).resolve() for f in dist.files or () if f.name == name and f.parent.name == "lib"]


def _build_tree_candidates(name: str, subdir: str) -> list[Path]:
    build = _SOURCE_ROOT / "build"
    if not build.is_dir():
        return []
    hits = [p for p in build.glob(f"*/{subdir}/{name}") if p.is_file()]
    return sorted(hits, key=lambda p: p.stat().st_mtime, reverse=True)


def candidates(kind: str) -> list[Path]:
    """Every place searched for library ``kind`` after its environment variable, in order."""
    lib = _library(kind)
    return [_PACKAGE_DIR / "lib" / lib.filename, *_installed_candidates(lib.filename),
            *_build_tree_candidates(lib.filename, lib.build_subdir)]


def _library(kind: str) -> NativeLibrary:
    if kind not in LIBRARIES:
        raise ValueError(f"kind={kind!r}, expected one of {sorted(LIBRARIES)}")
    return LIBRARIES[kind]


def build_help(kind: str) -> str:
    lib = _library(kind)
    return (f"Build it with `pip install -e .` (or `pip install .`) in the tq-deploy checkout; that needs cmake >= 3.24, "
            f"a C++17 compiler and {lib.needs}. Without pip: `cmake -S plugins -B build/native && cmake --build "
            f"build/native`. Or set {lib.env_var}=/path/to/{lib.filename}.")


def locate(kind: str) -> str:
    """Absolute path of native library ``kind`` ("ort", "cuda", "trt", "trt_harness"); raises
    NativeLibraryNotFoundError saying where it looked and how to build it."""
    lib = _library(kind)
    given = os.environ.get(lib.env_var)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise NativeLibraryNotFoundError(f"{lib.env_var}={given!r} is not a file; expected the path of "
                                             f"{lib.filename}. " + build_help(kind))
        return str(path.resolve())
    places = candidates(kind)
    for path in places:
        if path.is_file():
            return str(path)
    looked = ", ".join(str(p) for p in places) or "(nowhere)"
    raise NativeLibraryNotFoundError(f"the TurboQuant {lib.what} {lib.filename} is not built (looked in {looked}). "
                                     + build_help(kind))


def ort_library_path() -> str:
    """Absolute path of the ONNX Runtime custom-op library (``locate("ort")``)."""
    return locate("ort")


def register_library(session_options) -> str:
    """Register the custom ops on an ``onnxruntime.SessionOptions``; returns the library path."""
    path = locate("ort")
    session_options.register_custom_ops_library(path)
    return path
