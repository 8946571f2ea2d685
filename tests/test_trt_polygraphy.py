"""polygraphy with the TurboQuant ops: the Comparator over ONNX Runtime (custom-op library) and the
PyTorch reference runner, and the CLI network script that builds a TensorRT-RTX engine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from tq_deploy.export.single_op import make_op_model

polygraphy = pytest.importorskip("polygraphy", reason="polygraphy is not installed (pip install tq-deploy[rtx])")


pytestmark = pytest.mark.usefixtures("ort_library")


@pytest.mark.parametrize("op,kwargs", [
    ("TQPagedAttention", dict(k_bits=3, v_bits=2, num_q_heads=6, num_kv_heads=2, head_dim=48)),
    ("TQCacheUpdate", dict(k_bits=4, v_bits=1, num_kv_heads=3, head_dim=40, dtype="float16")),
    ("TQEncode", dict(bits=3, head_dim=72)),
])
def test_ort_matches_reference_through_polygraphy(tmp_path, op, kwargs, seed):
    from tq_deploy.validate.polygraphy_run import compare_with_polygraphy

    path = tmp_path / f"{op}.onnx"
    onnx.save(make_op_model(op, **kwargs), path)
    result = compare_with_polygraphy(path, seed=seed % 1000)
    assert result["runners"][:2] == ["tq-reference", "onnxrt-cpu"]
    assert result["passed"], result["text"]
    assert result["reports"]["onnxrt-cpu"]["outputs"]


def test_comparison_detects_a_wrong_runtime_result(tmp_path):
    """The model's attribute says scale=0.9 while its stored config (what the reference reads) says
    1/sqrt(D): ORT follows the attribute, so the polygraphy comparison must fail."""
    from tq_deploy.validate.polygraphy_run import compare_with_polygraphy

    model = make_op_model("TQPagedAttention", k_bits=2, v_bits=2, num_q_heads=4, num_kv_heads=2, head_dim=32)
    for attr in model.graph.node[0].attribute:
        if attr.name == "scale":
            attr.f = 0.9
    path = tmp_path / "wrong.onnx"
    onnx.save(model, path)
    result = compare_with_polygraphy(path, seed=1)
    assert not result["passed"], result["text"]


def test_network_script_builds_an_engine_with_tensorrt_rtx(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="polygraphy's TensorRT-RTX mode needs tensorrt-rtx-cu13==1.7.1.116")
    from tq_deploy.runtime import tensorrt as rt

    try:
        rt.plugin_library_path()
    except rt.native.NativeLibraryNotFoundError as err:
        pytest.skip(str(err))
    exe = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or shutil.which("polygraphy")
    if exe is None:
        pytest.skip("the polygraphy command is not on PATH")
    model = make_op_model("TQPagedAttention", k_bits=4, v_bits=3, num_q_heads=4, num_kv_heads=2, head_dim=32)
    onnx.save(model, tmp_path / "pa.onnx")
    shapes = rt.profile_shapes(model)
    args = []
    for k, flag in enumerate(("--trt-min-shapes", "--trt-opt-shapes", "--trt-max-shapes")):
        args += [flag] + [f"{name}:[{','.join(map(str, triple[k]))}]" for name, triple in shapes.items()]
    script = Path(__file__).resolve().parent.parent / "tq_deploy" / "validate" / "polygraphy_run.py"
    env = dict(os.environ, POLYGRAPHY_USE_TENSORRT_RTX="1", TQ_ONNX_MODEL=str(tmp_path / "pa.onnx"),
               PYTHONPATH=str(script.parent.parent.parent))
    engine = tmp_path / "pa.engine"
    proc = subprocess.run([exe, "convert", f"{script}:load_network", "--model-type", "trt-network-script",
                           "-o", str(engine), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert engine.stat().st_size > 1000
