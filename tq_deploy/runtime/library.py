"""Locate the native ONNX Runtime custom-op library (domain "turboquant").

The library is built from ``plugins/`` by the package build (``pip install .`` or
``pip install -e .``; scikit-build-core runs CMake) and installed as
``tq_deploy/lib/libtq_deploy_ort.so``. Load it into a session with::

    so = onnxruntime.SessionOptions()
    so.register_custom_ops_library(ort_library_path())

Search order (the first hit wins):
    1. env TQ_DEPLOY_ORT_LIBRARY (a file path; an error if it does not exist)
    2. ``tq_deploy/lib/`` next to the imported package (regular installs)
    3. the files recorded for the installed ``tq-deploy`` distribution (editable
       installs place the library in site-packages while the package is imported
       from the source tree)
    4. ``build/*/ort/`` in the source checkout (a hand-run ``cmake -S plugins -B build/...``
       or the scikit-build build directory), newest first
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

ENV_VAR = "TQ_DEPLOY_ORT_LIBRARY"
DISTRIBUTION = "tq-deploy"

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # tq_deploy/
_SOURCE_ROOT = _PACKAGE_DIR.parent  # the checkout, when imported from source

BUILD_HELP = (
    "Build it with `pip install -e .` (or `pip install .`) in the tq-deploy checkout: that needs cmake >= 3.24, "
    "a C++17 compiler and either npm (the build runs `npm pack com.github.asus4.onnxruntime@0.4.9` for the ONNX "
    "Runtime headers) or ORT_INCLUDE_DIR pointing at an onnxruntime include/ folder. Without pip: "
    "`cmake -S plugins -B build/native && cmake --build build/native`. "
    f"Or set {ENV_VAR}=/path/to/{{name}}."
)


class OrtLibraryNotFoundError(FileNotFoundError):
    """The custom-op library is not built or not where tq_deploy looks for it."""


def library_filename() -> str:
    """Platform file name of the custom-op library."""
    if sys.platform == "win32":
        return "tq_deploy_ort.dll"
    if sys.platform == "darwin":
        return "libtq_deploy_ort.dylib"
    return "libtq_deploy_ort.so"


def _installed_candidates(name: str) -> list[Path]:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return []
    found = []
    for file in dist.files or ():
        if file.name == name and file.parent.name == "lib":
            found.append(Path(dist.locate_file(file)).resolve())
    return found


def _build_tree_candidates(name: str, subdir: str = "ort") -> list[Path]:
    build = _SOURCE_ROOT / "build"
    if not build.is_dir():
        return []
    hits = [p for p in build.glob(f"*/{subdir}/{name}") if p.is_file()]
    return sorted(hits, key=lambda p: p.stat().st_mtime, reverse=True)


def native_candidates(name: str, build_subdir: str) -> list[Path]:
    """Where a native library of this package is searched, in order: tq_deploy/lib, the installed
    distribution's files, then build/*/<build_subdir>/ of a source checkout (newest first)."""
    return [_PACKAGE_DIR / "lib" / name, *_installed_candidates(name), *_build_tree_candidates(name, build_subdir)]


def candidate_paths() -> list[Path]:
    """Every place searched (after the environment variable), in order."""
    return native_candidates(library_filename(), "ort")


def locate_native(name: str, what: str, env_var: str, candidates: list[Path], error: type[Exception],
                  build_help: str) -> str:
    """Absolute path of native library `name`: the file `env_var` names, else the first of
    `candidates` that exists; raises `error` saying where it looked and how to build it."""
    given = os.environ.get(env_var)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise error(f"{env_var}={given!r} is not a file; expected the path of {name}. " + build_help)
        return str(path.resolve())
    for path in candidates:
        if path.is_file():
            return str(path)
    looked = ", ".join(str(p) for p in candidates) or "(nowhere)"
    raise error(f"the TurboQuant {what} {name} is not built (looked in {looked}). " + build_help)


def ort_library_path() -> str:
    """Absolute path of the built custom-op library; raises OrtLibraryNotFoundError with build steps."""
    name = library_filename()
    return locate_native(name, "ONNX Runtime library", ENV_VAR, candidate_paths(), OrtLibraryNotFoundError,
                         BUILD_HELP.format(name=name))


def register_library(session_options) -> str:
    """Register the custom ops on an ``onnxruntime.SessionOptions``; returns the library path."""
    path = ort_library_path()
    session_options.register_custom_ops_library(path)
    return path
