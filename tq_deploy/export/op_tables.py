"""Markdown tables of every op in :mod:`tq_deploy.ops`, for docs/ops.md.

docs/ops.md holds the output between two marker lines; regenerate it with

    python -m tq_deploy.export.op_tables --write docs/ops.md

and tests/test_export.py fails when the file and the specs drift apart.
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", help="splice the tables into this markdown file (between the markers)")
    args = parser.parse_args(argv)
    if args.write:
        path = Path(args.write)
        path.write_text(splice(path.read_text()))
    else:
        sys.stdout.write(render_all() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
