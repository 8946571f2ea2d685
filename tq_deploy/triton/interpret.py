"""Load the Triton kernels for the device at hand (tests and CPU-only machines).

Triton decides between compiling and interpreting when a function is decorated
with @triton.jit, i.e. when its module is imported, from the TRITON_INTERPRET
environment variable; that holds for Triton's own library functions (tl.sum,
tl.max, ...) too. So on a machine without CUDA, TRITON_INTERPRET=1 must be set
before the first ``import triton`` of the process (tests set it at the top of
their module; a conftest can set it for the whole session).

``load_kernels()`` re-imports this package's kernel modules if they were
imported in the other mode and returns the package; it raises RuntimeError
when Triton itself was imported in the wrong mode, which no re-import fixes.
"""

from __future__ import annotations

import importlib
import os
import sys

_MODULES = ("_dot", "_bits", "_common", "encode", "decode", "paged_attention", "paged_prefill")


def _is_interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def load_kernels(interpret: bool | None = None):
    """tq_deploy.triton with kernels compiled (CUDA) or interpreted (no CUDA, or interpret=True)."""
    import torch

    if interpret is None:
        interpret = not torch.cuda.is_available()
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    import triton.language as tl

    if _is_interpreted(tl.sum) != interpret:
        raise RuntimeError(
            f"triton was imported with TRITON_INTERPRET={'0' if interpret else '1'}; set TRITON_INTERPRET="
            f"{'1' if interpret else '0'} before the first import of triton in this process"
        )
    pkg = importlib.import_module("tq_deploy.triton")
    kernel = importlib.import_module("tq_deploy.triton.encode").encode_kernel
    if _is_interpreted(kernel) != interpret:
        for name in _MODULES:
            mod = sys.modules.get(f"tq_deploy.triton.{name}")
            if mod is not None:
                importlib.reload(mod)
        pkg = importlib.reload(pkg)
    return pkg
