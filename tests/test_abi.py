"""The native call ABI (tq_deploy/abi.py, plugins/common/tq_calls.h) and the parts every op needs.

The ctypes mirror that tq_deploy.cuda passes to the CUDA launchers must lay out each call struct
exactly as the C compiler does; a C program built from the generated header prints the offsets.
docs/adding-an-op.md lists the parts of an op; ``missing_parts`` checks each op of ops.py has them.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tq_deploy import abi, ops

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"


def _c_layout(tmp_path: Path) -> dict:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "tq_calls.h"', "int main(void) {"]
    for spec in ops.ALL_OPS:
        struct = f"tq_{abi.stem(spec)}_call"
        lines.append(f'  printf("{struct} size %zu\\n", sizeof({struct}));')
        for f in abi.call_fields(spec):
            lines.append(f'  printf("{struct} {f.name} %zu\\n", offsetof({struct}, {f.name}));')
    lines += ["  return 0;", "}"]
    source = tmp_path / "layout.c"
    source.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    subprocess.run([cc, "-std=c99", "-Wall", "-Werror", "-I", str(PLUGINS / "common"), str(source), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {(s, f): int(v) for s, f, v in (line.split() for line in out.splitlines())}


def test_the_ctypes_mirror_has_the_c_layout(tmp_path):
    layout = _c_layout(tmp_path)
    for spec in ops.ALL_OPS:
        struct = f"tq_{abi.stem(spec)}_call"
        mirror = abi.ctypes_struct(spec)
        assert ctypes.sizeof(mirror) == layout[(struct, "size")], struct
        for f in abi.call_fields(spec):
            assert getattr(mirror, f.name).offset == layout[(struct, f.name)], f"{struct}.{f.name}"


def test_every_call_has_the_contracts_inputs_outputs_and_attributes():
    for spec in ops.ALL_OPS:
        fields = abi.call_fields(spec)
        assert [f.name for f in fields if f.role == "input"] == spec.input_names()
        assert [f.name for f in fields if f.role == "output"] == spec.output_names()
        assert [f.name for f in fields if f.role == "attribute"] == [a.name for a in spec.attributes]
        assert [f.name for f in fields if f.role == "launch"] == ["workspace", "workspace_bytes", "stream"]
        symbols = {s for t in spec.inputs for s in t.shape} & set(abi.DIM_FIELDS)
        assert {f.name for f in fields if f.role == "dim"} == {abi.DIM_FIELDS[s] for s in symbols}


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def missing_parts(spec: ops.OpSpec, root: Path = ROOT) -> list[str]:
    """The hand-written parts of docs/adding-an-op.md that ``spec`` lacks. The generated parts
    (tq_calls.h, tq_ops.h, tq_op_list.h, tq_ops.cmake, docs/ops.md) are checked by test_export.py;
    the build lists, the declarations and the registration come from them."""
    stem = abi.stem(spec)
    pascal = spec.name[2:]
    plugins = root / "plugins"
    missing = []

    def need(path: str, *patterns: str) -> None:
        text = "".join(_read(p) for p in sorted(plugins.glob(path)))
        for pattern in patterns:
            if not re.search(pattern, text):
                missing.append(f"plugins/{path}: {pattern}")

    # its own file, or the file of the kernel it shares a pass with (the prefill: the attention's)
    need("kernels/cpu/tq_*.cc", rf"void {stem}\(const tq_{stem}_call& \w+, const Parallel& \w+\) \{{")
    need(f"kernels/cuda/tq_{stem}.cu", rf'extern "C" int tq_cuda_{stem}\(const tq_{stem}_call\* \w+\) \{{',
         rf'extern "C" size_t tq_cuda_{stem}_workspace\(const tq_{stem}_call\*( \w+)?\) \{{')
    need(f"ort/tq_{stem}_op.cc", rf"bool prepare\(KernelIo& \w+, tq_{stem}_call& \w+\) \{{")
    need(f"trt/tq_{stem}_plugin.cc", rf"bool {pascal}Plugin::output_shapes\(", rf"std::string {pascal}Plugin::check_shapes\(")
    for entry in ("reference", "make_inputs"):
        try:
            spec.entry(entry)
        except (ImportError, AttributeError, ValueError):
            missing.append(f"ops.py {spec.name}.{entry} ({getattr(spec, entry)!r}) does not resolve")
    return missing


@pytest.mark.parametrize("spec", ops.ALL_OPS, ids=lambda s: s.name)
def test_every_op_has_its_parts(spec):
    assert missing_parts(spec) == [], f"{spec.name} lacks parts listed in docs/adding-an-op.md"


def test_an_op_without_parts_is_reported():
    dummy = ops.OpSpec(name="TQDummyOp", doc="", inputs=ops.ENCODE.inputs, outputs=ops.ENCODE.outputs,
                       reference="tq_deploy.validate.reference:no_such_function", make_inputs="no_such_module:f")
    missing = missing_parts(dummy)
    assert len(missing) == 8, missing
    assert any("tq_cuda_dummy_op" in m for m in missing)


def test_the_checklist_names_every_part():
    checklist = _read(ROOT / "docs" / "adding-an-op.md")
    for part in ("tq_deploy/ops.py", "plugins/kernels/cpu/tq_<stem>.cc", "plugins/kernels/cuda/tq_<stem>.cu",
                 "plugins/ort/tq_<stem>_op.cc", "plugins/trt/tq_<stem>_plugin.cc", "tq_calls.h", "tq_ops.h",
                 "tq_op_list.h", "tq_ops.cmake", "docs/ops.md", "reference", "make_inputs"):
        assert part in checklist, part
