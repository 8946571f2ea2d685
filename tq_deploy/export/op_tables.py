"""The op contract of :mod:`tq_deploy.ops`, rendered for the places that cannot import Python.

* Markdown tables of every op, for docs/ops.md (between two marker lines)::

      python -m tq_deploy.export.op_tables --write docs/ops.md

* A C++ header with the same tables (names, inputs, outputs, attributes, bit range) that the
  ONNX Runtime glue and the TensorRT plugins build their op descriptions from::

      python -m tq_deploy.export.op_tables --header plugins/common/tq_ops.h

tests/test_export.py fails when either file and the specs drift apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tq_deploy import ops

BEGIN = "<!-- BEGIN GENERATED OP TABLES (python -m tq_deploy.export.op_tables --write docs/ops.md) -->"
END = "<!-- END GENERATED OP TABLES -->"

_TYPE_NAMES = {ops.FLOAT: "float32", ops.FLOAT16: "float16", ops.UINT8: "uint8", ops.INT32: "int32",
               ops.INT64: "int64"}


def _types(t: ops.TensorSpec) -> str:
    names = " or ".join(_TYPE_NAMES[x] for x in t.types)
    return f"{names} (`{t.type_param}`)" if t.type_param else names


def _shape(t: ops.TensorSpec) -> str:
    return "[" + ", ".join(t.shape) + "]"


def _range(a: ops.AttrSpec) -> str:
    parts = []
    if a.allowed is not None:
        parts.append("one of " + ", ".join(map(str, a.allowed)))
    if a.min_value is not None:
        parts.append(f">= {a.min_value:g}")
    return "; ".join(parts) or "any"


def render_op(spec: ops.OpSpec) -> str:
    lines = [f"### {spec.name}", "", f"Domain `{spec.domain}`, version {spec.version}. {spec.doc}", ""]
    for title, tensors in (("Inputs", spec.inputs), ("Outputs", spec.outputs)):
        lines += [f"| {title.lower()[:-1]} | type | shape | meaning |", "| --- | --- | --- | --- |"]
        lines += [f"| `{t.name}` | {_types(t)} | {_shape(t)} | {t.doc} |" for t in tensors]
        lines.append("")
    if spec.attributes:
        lines += ["| attribute | kind | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
        for a in spec.attributes:
            default = "required" if a.default is None else f"{a.default!r}"
            lines.append(f"| `{a.name}` | {a.kind} | {default} | {_range(a)} | {a.doc} |")
        lines.append("")
    return "\n".join(lines)


def render_all() -> str:
    body = "\n".join(render_op(spec) for spec in ops.ALL_OPS)
    return f"{BEGIN}\n\n{body}\n{END}"


def splice(text: str) -> str:
    """``text`` with the part between the markers replaced by :func:`render_all`."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the document lacks the marker lines {BEGIN!r} ... {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + render_all() + tail


_CPP_TYPES = {ops.FLOAT: "kFloat32", ops.UINT8: "kUint8", ops.INT32: "kInt32", ops.INT64: "kInt64"}
HEADER_COMMAND = "python -m tq_deploy.export.op_tables --header plugins/common/tq_ops.h"


def _stem(spec: ops.OpSpec) -> str:
    """TQPagedAttention -> paged_attention"""
    name = spec.name[2:]
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


def _cpp_enum(name: str) -> str:
    return "k" + "".join(part.capitalize() for part in name.split("_"))


def _cpp_type(t: ops.TensorSpec) -> str:
    return "Type::kT" if t.type_param else f"Type::{_CPP_TYPES[t.types[0]]}"


def render_header() -> str:
    """plugins/common/tq_ops.h: the contract as constexpr C++ tables (C++17)."""
    lines = [
        f"// GENERATED from tq_deploy/ops.py by `{HEADER_COMMAND}`: do not edit.",
        "// tests/test_export.py fails when it drifts from the specs. The ONNX Runtime glue and the TensorRT",
        "// plugins build their op descriptions (names, input/output types, attributes) from these tables.",
        "#pragma once",
        "",
        "namespace tq_ops {",
        "",
        f'constexpr const char* kDomain = "{ops.DOMAIN}";',
        f"constexpr int kDomainVersion = {ops.DOMAIN_VERSION};",
        f"constexpr int kMinBits = {min(ops.SUPPORTED_BITS)};",
        f"constexpr int kMaxBits = {max(ops.SUPPORTED_BITS)};",
        "",
        "// kT: the node's float type (float32 or float16), the same at every kT position of one node.",
        "enum class Type { kT, kFloat32, kUint8, kInt32, kInt64 };",
        "enum class AttrKind { kInt, kFloat };",
        "",
        "struct Tensor {",
        "  const char* name;",
        "  Type type;",
        "};",
        "",
        "struct Attr {",
        "  const char* name;",
        "  AttrKind kind;",
        "  bool required;",
        "  double default_value;  // when not required",
        "  bool is_bits;          // a bit width: an int in [kMinBits, kMaxBits]",
        "  double min_value;      // inclusive lower bound of a float (which must also be finite)",
        "};",
        "",
        "struct Op {",
        "  const char* name;",
        "  const Tensor* inputs;",
        "  int num_inputs;",
        "  const Tensor* outputs;",
        "  int num_outputs;",
        "  const Attr* attrs;",
        "  int num_attrs;",
        "};",
        "",
    ]
    stems = []
    for spec in ops.ALL_OPS:
        stem = _stem(spec)
        stems.append(stem)
        lines.append(f"// {spec.name}: {spec.doc.split('. ')[0].split(': ')[0].rstrip('.')}.")
        lines.append(f"namespace {stem} {{")
        for title, tensors in (("Input", spec.inputs), ("Output", spec.outputs)):
            names = ", ".join(_cpp_enum(t.name) for t in tensors)
            lines.append(f"enum {title} {{ {names}, kNum{title}s }};")
        if spec.attributes:
            lines.append(f"enum Attribute {{ {', '.join(_cpp_enum(a.name) for a in spec.attributes)}, kNumAttributes }};")
        for title, tensors in (("kInputs", spec.inputs), ("kOutputs", spec.outputs)):
            lines.append(f"inline constexpr Tensor {title}[] = {{")
            lines += [f'    {{"{t.name}", {_cpp_type(t)}}},' for t in tensors]
            lines.append("};")
        lines.append("inline constexpr Attr kAttrs[] = {")
        for a in spec.attributes:
            kind = "AttrKind::kInt" if a.kind == "int" else "AttrKind::kFloat"
            required = "true" if a.default is None else "false"
            default = 0.0 if a.default is None else float(a.default)
            is_bits = "true" if a.allowed == ops.SUPPORTED_BITS else "false"
            minimum = float(a.min_value) if a.min_value is not None else float("-inf")
            min_text = "-1e300" if minimum == float("-inf") else repr(minimum)
            lines.append(f'    {{"{a.name}", {kind}, {required}, {default!r}, {is_bits}, {min_text}}},')
        lines.append("};")
        lines.append(f'inline constexpr Op kOp = {{"{spec.name}", kInputs, {len(spec.inputs)}, kOutputs, '
                     f"{len(spec.outputs)}, kAttrs, {len(spec.attributes)}}};")
        lines.append(f"}}  // namespace {stem}")
        lines.append("")
    lines.append("inline constexpr const Op* kAllOps[] = {" + ", ".join(f"&{s}::kOp" for s in stems) + "};")
    lines.append("")
    lines.append("}  // namespace tq_ops")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", help="splice the tables into this markdown file (between the markers)")
    parser.add_argument("--header", help="write the C++ contract header to this path")
    args = parser.parse_args(argv)
    if args.write:
        path = Path(args.write)
        path.write_text(splice(path.read_text()))
    if args.header:
        Path(args.header).write_text(render_header())
    if not (args.write or args.header):
        sys.stdout.write(render_all() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
