"""The dispatcher (tq_deploy.dispatch): which backend runs a call, the TQ_DEPLOY_BACKEND switch, and the
layering that keeps the reference an oracle (it imports nothing above it; no package import cycles)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tq_deploy import dispatch
from tq_deploy.reference import checks
from tq_deploy.reference.codebook import lloyd_max_codebook
from tq_deploy.reference.quantizer import TurboQuantMSE, encode_reference
from tq_deploy.reference.rotation import make_rotation

PACKAGE = Path(dispatch.__file__).resolve().parent


@pytest.fixture
def fresh_choice(monkeypatch):
    """Forget the cached TQ_DEPLOY_BACKEND choice so that the environment is read again."""
    monkeypatch.setattr(dispatch, "_selected", None)
    monkeypatch.setattr(dispatch, "_gpu_backends", None)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def encode_args(dim=64, bits=3, device="cpu"):
    return checks.check_encode(torch.randn(4, dim, device=device), make_rotation(dim).to(device),
                               lloyd_max_codebook(dim, bits).to(device), bits)


def test_cpu_tensors_always_run_the_reference(fresh_choice):
    assert dispatch.selected() == "auto"
    assert dispatch.backend_for("encode", encode_args()) == "reference"
    for choice in dispatch.CHOICES:
        with dispatch.use_backend(choice):
            assert dispatch.backend_for("encode", encode_args()) == "reference"


def test_triton_availability_is_detected():
    table, reason = dispatch._load_backend("triton")
    assert (table is not None) == (importlib.util.find_spec("triton") is not None)
    assert (table is None) == bool(reason)


def test_use_backend_nests_and_restores_after_errors(fresh_choice):
    assert dispatch.selected() == "auto"
    with dispatch.force_reference():
        assert dispatch.selected() == "reference"
        with dispatch.use_backend("triton"):
            assert dispatch.selected() == "triton"
        assert dispatch.selected() == "reference"
    assert dispatch.selected() == "auto"
    with pytest.raises(RuntimeError):
        with dispatch.force_reference():
            raise RuntimeError("boom")
    assert dispatch.selected() == "auto"


@pytest.mark.parametrize("value,expected", [("reference", "reference"), (" Reference ", "reference"),
                                            ("auto", "auto"), ("", "auto"), ("cuda", "cuda"), ("TRITON", "triton")])
def test_environment_variable_is_read_once(monkeypatch, fresh_choice, value, expected):
    monkeypatch.setenv(dispatch.ENV_VAR, value)
    assert dispatch.selected() == expected
    monkeypatch.setenv(dispatch.ENV_VAR, "reference" if expected != "reference" else "auto")
    assert dispatch.selected() == expected  # cached: no environment read per call


def test_invalid_environment_value_is_named(monkeypatch, fresh_choice):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-graph")
    with pytest.raises(ValueError) as info:
        dispatch.selected()
    message = str(info.value)
    assert "TQ_DEPLOY_BACKEND='cuda-graph'" in message and "'auto'" in message and "'cuda'" in message


def test_forcing_a_backend_that_cannot_run_is_an_error(monkeypatch, fresh_choice):
    from tq_deploy import cuda

    monkeypatch.setattr(cuda, "unavailable_reason", lambda: "libtq_deploy_cuda.so does not load: test")
    with dispatch.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="TQ_DEPLOY_BACKEND=cuda.*does not load"):
            dispatch._backends()


def test_forced_reference_gives_the_same_result_on_cpu(fresh_choice):
    q = TurboQuantMSE(64, 3, seed=1)
    x = torch.randn(10, 64)
    codes, norms = dispatch.encode(x, q.rotation, q.codebook, 3)
    with dispatch.force_reference():
        forced = dispatch.encode(x, q.rotation, q.codebook, 3)
    assert torch.equal(codes, forced[0]) and torch.equal(norms, forced[1])
    want = encode_reference(x, q.rotation, q.codebook, 3)
    assert torch.equal(codes, want[0]) and torch.equal(norms, want[1])


def test_the_cuda_backend_imports_without_triton():
    code = "import sys; sys.modules['triton'] = None; import tq_deploy.cuda, tq_deploy.dispatch; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _imports(path: Path) -> set[str]:
    """Every tq_deploy module a file imports, at module level or inside a function."""
    tree = ast.parse(path.read_text())
    relative_base = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tq_deploy"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = relative_base.rsplit(".", node.level - 1)[0] if node.level > 1 else relative_base
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.startswith("tq_deploy"):
                found.add(name)
                found.update(f"{name}.{a.name}" for a in node.names)
    return found


def _unit(module: str) -> str:
    """The package-level unit of a module: tq_deploy.<sub> (a subpackage or a top-level module)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_the_reference_imports_nothing_above_it():
    allowed = ("tq_deploy.ops", "tq_deploy.reference")
    for path in sorted((PACKAGE / "reference").glob("*.py")):
        bad = sorted(m for m in _imports(path) if not m.startswith(allowed))
        assert not bad, f"{path.name} imports {bad}; the reference may import only {allowed}"


def test_no_import_cycles_between_packages():
    units = {}
    for path in PACKAGE.rglob("*.py"):
        mine = _unit(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        deps = {_unit(m) for m in _imports(path)} - {mine, "tq_deploy"}
        real = {d for d in deps if (PACKAGE.parent / d.replace(".", "/")).exists()
                or (PACKAGE.parent / (d.replace(".", "/") + ".py")).exists()}
        units.setdefault(mine, set()).update(real)
    state: dict[str, int] = {}

    def visit(unit, stack):
        state[unit] = 1
        for dep in sorted(units.get(unit, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle between packages: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[unit] = 2

    for unit in sorted(units):
        if unit not in state:
            visit(unit, [unit])


@pytest.mark.gpu
def test_cuda_tensors_take_a_gpu_backend_unless_forced(fresh_choice):
    args = encode_args(device="cuda")
    with dispatch.use_backend("triton"):
        assert dispatch.backend_for("encode", args) == "triton"
    with dispatch.force_reference():
        assert dispatch.backend_for("encode", args) == "reference"
    assert dispatch.backend_for("encode", args) in ("cuda", "triton")


@pytest.mark.gpu
def test_shapes_the_kernels_do_not_take_fall_back_to_the_reference(fresh_choice):
    """Triton takes head dims 32-256 in powers of two only: with the CUDA library off, head dim 100
    goes to the reference (with the CUDA library, its generic kernels take any head dim)."""
    q = TurboQuantMSE(100, 3, device="cuda")
    v = torch.randn(7, 100, device="cuda")
    args = checks.check_encode(v, q.rotation, q.codebook, 3)
    with dispatch.use_backend("triton"):
        assert dispatch.backend_for("encode", args) == "reference"
        codes, norms = dispatch.encode(v, q.rotation, q.codebook, 3)
    with dispatch.force_reference():
        expected = dispatch.encode(v, q.rotation, q.codebook, 3)
    assert torch.equal(codes, expected[0]) and torch.allclose(norms, expected[1])