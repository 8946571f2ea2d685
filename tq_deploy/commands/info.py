"""tq-deploy info: what this install has (as ``python -m torch.utils.collect_env`` is to torch).

    tq-deploy info [--json]

Native libraries (path, what each was built with), ONNX Runtime and its providers, TensorRT /
TensorRT-RTX and polygraphy, torch, CUDA devices, Triton, and which backend the dispatcher runs
on CUDA tensors for each op: enough to tell why a path is slow or missing.
"""

from __future__ import annotations

import importlib
import json
import platform


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None


def native_libraries() -> dict:
    import ctypes

    from tq_deploy.runtime import library

    out = {}
    for kind, lib in library.LIBRARIES.items():
        try:
            path = library.locate(kind)
        except library.NativeLibraryNotFoundError as err:
            out[kind] = {"file": lib.filename, "found": False, "why": str(err).split(". ")[0]}
            continue
        entry = {"file": lib.filename, "found": True, "path": path}
        symbol = {"ort": "TQDeployOrtBuildInfo", "cuda": "tq_cuda_build_info"}.get(kind)
        if symbol:
            try:
                fn = getattr(ctypes.CDLL(path), symbol)
                fn.restype = ctypes.c_char_p
                entry["build"] = json.loads(fn().decode())
            except (OSError, AttributeError, ValueError) as err:
                entry["build"] = f"unknown ({err})"
        out[kind] = entry
    return out


def gpu_backends() -> dict:
    """Which backend the dispatcher would run for each op on a CUDA tensor call of the usual shapes."""
    import torch

    if not torch.cuda.is_available():
        return {"device": None, "note": "no CUDA device: every op runs the PyTorch reference on CPU tensors"}
    from tq_deploy import cuda, dispatch
    from tq_deploy.reference import checks, lloyd_max_codebook, make_rotation

    dev, dim, bits = "cuda", 128, 4
    rot, cb = make_rotation(dim).to(dev), lloyd_max_codebook(dim, bits).to(dev)
    x = torch.randn(2, 8, dim, device=dev, dtype=torch.float16)
    cache = [torch.zeros(4, 16, 8, dim * bits // 8, dtype=torch.uint8, device=dev), torch.zeros(4, 16, 8, device=dev)]
    calls = {
        "encode": checks.check_encode(x[0], rot, cb, bits),
        "cache_update": checks.check_cache_update(x, x, torch.zeros(2, dtype=torch.int64, device=dev), *cache,
                                                  *cache, rot, cb, cb, bits, bits, check_data=False),
        "paged_attention": checks.check_paged_attention(
            torch.randn(2, 32, dim, device=dev, dtype=torch.float16), *cache, *cache,
            torch.zeros(2, 1, dtype=torch.int32, device=dev), torch.ones(2, dtype=torch.int32, device=dev),
            rot, cb, cb, bits, bits, check_data=False),
    }
    return {"device": torch.cuda.get_device_name(), "selected": dispatch.selected(),
            "cuda_library": cuda.unavailable_reason() or "loads",
            "fp16 D=128 4-bit": {op: dispatch.backend_for(op, a) for op, a in calls.items()}}


def collect() -> dict:
    import torch

    from tq_deploy import __version__

    info = {"tq_deploy": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "native": native_libraries()}
    ort = _version("onnxruntime")
    info["onnxruntime"] = {"version": ort}
    if ort:
        import onnxruntime

        from tq_deploy.runtime.session import cuda_unavailable_reason

        info["onnxruntime"]["providers"] = onnxruntime.get_available_providers()
        info["onnxruntime"]["turboquant_cuda_ep"] = cuda_unavailable_reason() or "runs here"
    info["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                     "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    info["triton"] = _version("triton")
    info["tensorrt"] = _version("tensorrt")
    info["tensorrt_rtx"] = _version("tensorrt_rtx_bindings")
    info["polygraphy"] = _version("polygraphy")
    info["gpu_backends"] = gpu_backends()
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"tq-deploy {info['tq_deploy']}  python {info['python']}  {info['platform']}")
    print("native libraries:")
    for kind, lib in info["native"].items():
        if lib["found"]:
            build = lib.get("build")
            extra = f"  {json.dumps(build)}" if build else ""
            print(f"  {kind:12} {lib['path']}{extra}")
        else:
            print(f"  {kind:12} not found: {lib['why']}")
    o = info["onnxruntime"]
    print(f"onnxruntime  {o['version'] or 'not installed'}"
          + (f"  providers {', '.join(o['providers'])}; TurboQuant on the CUDA EP: {o['turboquant_cuda_ep']}"
             if o["version"] else ""))
    t = info["torch"]
    print(f"torch        {t['version']} (CUDA {t['cuda']}); devices: {', '.join(t['devices']) or 'none'}")
    for name in ("triton", "tensorrt", "tensorrt_rtx", "polygraphy"):
        print(f"{name:12} {info[name] or 'not installed'}")
    print(f"GPU backends {json.dumps(info['gpu_backends'])}")
    return 0
