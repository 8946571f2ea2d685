"""The dispatcher (tq_deploy.dispatch): which backend runs a call, the TQ_DEPLOY_BACKEND switch, and the
layering that keeps the reference an oracle (it imports nothing above it; no package import cycles)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import warnings
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

class _Refused(Exception):
    pass


def _fake_backends(monkeypatch, takes: dict):
    """A faked GPU backend table (tq_deploy.dispatch's own ``(name, OPS)`` pairs, no GPU needed): backend
    ``name`` takes an op when ``takes[name](args)`` is true; each records what it was asked and what ran."""
    asked, ran = [], []

    def table(name):
        def supports(args):
            asked.append(name)
            return takes[name](args)

        def run(args):
            if not takes[name](args):
                raise _Refused(f"{name} ran a call its supports() refused")
            ran.append(name)
            return name

        return {"encode": (supports, run)}

    monkeypatch.setattr(dispatch, "_gpu_backends", tuple((name, table(name)) for name in takes))
    return asked, ran


class _on_cuda:
    """The same checked arguments, claiming a CUDA device (the dispatcher asks GPU backends only then)."""

    device = torch.device("cuda", 0)

    def __init__(self, args):
        self._args = args

    def __getattr__(self, name):
        return getattr(self._args, name)


def test_a_backend_runs_only_calls_its_supports_takes(monkeypatch, fresh_choice):
    """Backends are asked in order and the first whose supports() is true runs the call; one that
    refuses is passed over (a dispatcher that skipped supports() would hand it the call)."""
    args = _on_cuda(encode_args(dim=64))
    asked, ran = _fake_backends(monkeypatch, {"cuda": lambda a: a.head_dim != 64, "triton": lambda a: True})
    assert dispatch.backend_for("encode", args) == "triton"
    assert asked == ["cuda", "triton"]
    name, run = dispatch._choose("encode", args)
    assert name == "triton" and run(args) == "triton" and ran == ["triton"]

    asked, _ = _fake_backends(monkeypatch, {"cuda": lambda a: True, "triton": lambda a: True})
    assert dispatch.backend_for("encode", args) == "cuda" and asked == ["cuda"]  # the first that takes it

    asked, _ = _fake_backends(monkeypatch, {"cuda": lambda a: False, "triton": lambda a: False})
    assert dispatch.backend_for("encode", args) == "reference" and asked == ["cuda", "triton"]
    # an op no backend lists goes to the reference without asking anyone
    asked, _ = _fake_backends(monkeypatch, {"cuda": lambda a: True})
    dec = checks.check_decode(*encode_reference(torch.randn(3, 64), make_rotation(64), lloyd_max_codebook(64, 3), 3),
                              make_rotation(64), lloyd_max_codebook(64, 3), 3, torch.float32)
    assert dispatch.backend_for("decode", _on_cuda(dec)) == "reference" and asked == []


def test_cpu_tensors_never_ask_a_gpu_backend(monkeypatch, fresh_choice):
    asked, ran = _fake_backends(monkeypatch, {"cuda": lambda a: True, "triton": lambda a: True})
    q = TurboQuantMSE(64, 3, seed=2)
    x = torch.randn(5, 64)
    codes, norms = dispatch.encode(x, q.rotation, q.codebook, 3)
    want = encode_reference(x, q.rotation, q.codebook, 3)
    assert torch.equal(codes, want[0]) and torch.equal(norms, want[1])
    assert asked == [] and ran == []


def test_every_public_op_on_cpu_is_the_reference(fresh_choice):
    """Each public op (and a plan's run) gives the reference's result on CPU tensors, the arguments
    passed through in order and the defaults (scale 0 = 1/sqrt(D), decode to float32) the reference's."""
    from tq_deploy.reference.paged import (allocate_cache, cache_update_reference, paged_attention_reference,
                                           paged_prefill_reference)
    from tq_deploy.reference.quantizer import decode_reference

    gen = torch.Generator().manual_seed(5)
    dim, hkv, hq, page, kb, vb = 64, 2, 4, 16, 3, 2
    rot, kcb, vcb = make_rotation(dim, seed=5), lloyd_max_codebook(dim, kb), lloyd_max_codebook(dim, vb)
    codes, norms = dispatch.encode(torch.randn(6, dim, generator=gen), rot, kcb, kb)
    x = dispatch.decode(codes, norms, rot, kcb, kb)
    assert x.dtype == torch.float32 and torch.equal(x, decode_reference(codes, norms, rot, kcb, kb))
    half = dispatch.decode(codes, norms, rot, kcb, kb, torch.float16)
    assert torch.equal(half, decode_reference(codes, norms, rot, kcb, kb, torch.float16))

    cache, want = allocate_cache(6, page, hkv, dim, kb, vb), allocate_cache(6, page, hkv, dim, kb, vb)
    key, value = torch.randn(40, hkv, dim, generator=gen), torch.randn(40, hkv, dim, generator=gen)
    slots = torch.randperm(6 * page, generator=gen)[:40]
    got = dispatch.cache_update(key, value, slots, *cache.tensors(), rot, kcb, vcb, kb, vb)
    cache_update_reference(key, value, slots, *want.tensors(), rot, kcb, vcb, kb, vb)
    assert all(torch.equal(g, w) for g, w in zip(got, want.tensors()))
    assert all(torch.equal(c, w) for c, w in zip(cache.tensors(), want.tensors()))  # in place

    tables = torch.tensor([[3, 1, 5], [0, 2, 4]], dtype=torch.int32)
    ctx = torch.tensor([40, 17], dtype=torch.int32)
    query = torch.randn(2, hq, dim, generator=gen)
    common = (*cache.tensors(), tables, ctx, rot, kcb, vcb, kb, vb)
    ref = paged_attention_reference(query, *common)
    assert torch.equal(dispatch.paged_attention(query, *common), ref)
    assert torch.equal(dispatch.paged_attention(query, *common, 0.5), paged_attention_reference(query, *common, 0.5))
    assert not torch.equal(dispatch.paged_attention(query, *common, 1.0), ref)  # the default is not 1.0
    plan = dispatch.plan_paged_attention(query, *common)
    assert torch.equal(plan.run(query, tables, ctx), ref)
    out = torch.empty_like(query)
    assert plan.run(query, tables, ctx, out=out) is out and torch.equal(out, ref)
    scaled = dispatch.plan_paged_attention(query, *common, 0.5)
    assert torch.equal(scaled.run(query, tables, ctx), paged_attention_reference(query, *common, 0.5))

    rows = torch.randn(5, hq, dim, generator=gen)
    starts = torch.tensor([0, 3, 5], dtype=torch.int32)
    pre = (*cache.tensors(), tables, ctx, starts, rot, kcb, vcb, kb, vb)
    assert torch.equal(dispatch.paged_prefill(rows, *pre), paged_prefill_reference(rows, *pre))
    assert torch.equal(dispatch.paged_prefill(rows, *pre, 0.5), paged_prefill_reference(rows, *pre, 0.5))


def test_gpu_backends_load_once_in_order_and_a_missing_cuda_library_is_said(monkeypatch, fresh_choice):
    from tq_deploy import cuda

    loads = []
    real = dispatch._load_backend

    def counting(name):
        loads.append(name)
        return real(name)

    monkeypatch.setattr(dispatch, "_load_backend", counting)
    monkeypatch.setattr(cuda, "unavailable_reason", lambda: "")  # as if the library loaded
    table, reason = real("cuda")
    assert table is cuda.OPS and reason == ""
    has_triton = importlib.util.find_spec("triton") is not None
    with dispatch.use_backend("auto"):
        names = [name for name, _ in dispatch._backends()]
        assert names == ["cuda", "triton"] if has_triton else ["cuda"]
        dispatch._backends()
    assert loads == ["cuda", "triton"]  # once, not per call

    monkeypatch.setattr(cuda, "unavailable_reason", lambda: "libtq_deploy_cuda.so does not load: test")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with dispatch.use_backend("auto"):
        with pytest.warns(RuntimeWarning) as record:
            names = [name for name, _ in dispatch._backends()]
    assert names == (["triton"] if has_triton else [])
    assert [str(w.message) for w in record] == [
        "tq_deploy: the CUDA kernel library is not used (libtq_deploy_cuda.so does not load: test); GPU calls run "
        "the Triton kernels or the reference"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU: nothing to say
    with dispatch.use_backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch._backends()


def test_a_cuda_plan_gets_the_checked_call(monkeypatch, fresh_choice):
    """Where the CUDA backend takes the call, the plan is its launch-only plan built from the checked
    arguments (scale included) and the split knob; the backend choice is faked, the plan recorded."""
    from tq_deploy import cuda
    from tq_deploy.reference.paged import allocate_cache

    made = []
    monkeypatch.setattr(cuda, "PagedAttentionPlan", lambda args, tokens: made.append((args, tokens)) or "plan")
    monkeypatch.setattr(dispatch, "_choose", lambda op, args: ("cuda", None))
    dim = 64
    cache = allocate_cache(4, 16, 2, dim, 3, 3)
    call = (torch.randn(1, 4, dim), *cache.tensors(), torch.zeros(1, 2, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32), make_rotation(dim), lloyd_max_codebook(dim, 3), lloyd_max_codebook(dim, 3),
            3, 3)
    assert dispatch.plan_paged_attention(*call, 0.25, tokens_per_split=128) == "plan"
    assert dispatch.plan_paged_attention(*call) == "plan"
    (args, tokens), (default_args, default_tokens) = made
    assert isinstance(args, checks.PagedAttentionArgs) and args.scale == 0.25 and tokens == 128
    assert default_args.scale == pytest.approx(dim**-0.5) and default_tokens == 0
