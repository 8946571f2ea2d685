"""The op contract of :mod:`tq_deploy.ops`, rendered for the places that cannot import Python.

* Markdown tables of every op, for docs/ops.md (between two marker lines)::

      python -m tq_deploy.export.op_tables --write docs/ops.md

* The native side of the contract, three generated headers in plugins/common/::

      python -m tq_deploy.export.op_tables --native plugins/common

  tq_ops.h     the tables (names, inputs, outputs, attributes, bit range, in-place pairs) that
               the ONNX Runtime glue and the TensorRT plugins build their op descriptions from,
               and per op ``fill(call, io)``, which fills the op's call struct from a runtime's
               view of a node by the contract's enums
  tq_calls.h   one C struct per op, ``tq_<stem>_call`` (fields: :mod:`tq_deploy.abi`), which every
               native kernel of the op takes
  tq_op_list.h ``TQ_FOR_EACH_OP(X)``: the ops, from which the kernels' declarations, the ORT op
               table and factories and the TensorRT plugin classes and creators are expanded
  tq_ops.cmake the op stems, from which the CMake lists name each op's source files

tests/test_export.py fails when a file and the specs drift apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tq_deploy import abi, ops

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
        lines += [f"| `{t.name}`{' (optional)' if t.optional else ''} | {_types(t)} | {_shape(t)} | {t.doc} |"
                  for t in tensors]
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
HEADER_COMMAND = "python -m tq_deploy.export.op_tables --native plugins/common"


_stem = abi.stem


def _cpp_enum(name: str) -> str:
    return "k" + "".join(part.capitalize() for part in name.split("_"))


def _cpp_type(t: ops.TensorSpec) -> str:
    if t.type_param:
        return "Type::kT" if t.type_param == abi.FLOAT_TYPE else "Type::kN"
    return f"Type::{_CPP_TYPES[t.types[0]]}"


_GENERATED = f"GENERATED from tq_deploy/ops.py by `{HEADER_COMMAND}`: do not edit."


def _pascal(spec: ops.OpSpec) -> str:
    return spec.name[2:]


def _fill_line(f: abi.Field) -> str:
    enum = _cpp_enum(f.name)
    if f.role in ("input", "output"):
        fetch = f"io.in({enum})" if f.role == "input" else f"io.out({enum})"
        cast = f.c_type if f.c_type not in ("const void*", "void*") else ""
        return f"c.{f.name} = {f'static_cast<{cast}>({fetch})' if cast else fetch};"
    if f.role == "dim":
        if f.name == "rows":
            return f"c.rows = io.rows({_cpp_enum(f.source)}, {f.axis});"
        return f"c.{f.name} = io.dim({_cpp_enum(f.source)}, {f.axis});"
    if f.role == "attribute":
        kind = "int_attr" if f.c_type == "int32_t" else "float_attr"
        return f"c.{f.name} = static_cast<{f.c_type}>(io.{kind}({enum}));"
    if f.role == "dtype":
        return "c.dtype = io.dtype();"
    if f.role == "norm_dtype":
        return "c.norm_dtype = io.norm_dtype();"
    raise ValueError(f.role)


def render_header() -> str:
    """plugins/common/tq_ops.h: the contract as constexpr C++ tables (C++17), and per op the
    filling of its call struct."""
    lines = [
        f"// {_GENERATED}",
        "// tests/test_export.py fails when it drifts from the specs. The ONNX Runtime glue and the TensorRT",
        "// plugins build their op descriptions (names, input/output types, attributes) from these tables,",
        "// and fill each op's call struct (tq_calls.h) through fill().",
        "#pragma once",
        "",
        '#include "tq_calls.h"',
        "",
        "namespace tq_ops {",
        "",
        f'constexpr const char* kDomain = "{ops.DOMAIN}";',
        f"constexpr int kDomainVersion = {ops.DOMAIN_VERSION};",
        f"constexpr int kMinBits = {min(ops.SUPPORTED_BITS)};",
        f"constexpr int kMaxBits = {max(ops.SUPPORTED_BITS)};",
        "",
        "// kT: the node's float type (float32 or float16), the same at every kT position of one node;",
        "// kN: the paged cache's norm type (float32 or float16), the same at every kN position.",
        "enum class Type { kT, kN, kFloat32, kUint8, kInt32, kInt64 };",
        "enum class AttrKind { kInt, kFloat };",
        "",
        "struct Tensor {",
        "  const char* name;",
        "  Type type;",
        "  bool optional;  // a trailing input a node may leave out (its call field is then null)",
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
        "// Output `output` is input `input` updated in place (output <x>_out of input <x>).",
        "struct InPlace {",
        "  int input;",
        "  int output;",
        "};",
        "",
        "struct Op {",
        "  const char* name;",
        "  const Tensor* inputs;",
        "  int num_inputs;",
        "  int num_required_inputs;  // the inputs before the optional ones",
        "  const Tensor* outputs;",
        "  int num_outputs;",
        "  const Attr* attrs;",
        "  int num_attrs;",
        "  const InPlace* in_place;",
        "  int num_in_place;",
        "};",
        "",
        "// fill(call, io) sets every field of an op's call struct but the launch ones (workspace,",
        "// stream) from a runtime's view of one node. Io provides: const void* in(int input) (null for an",
        "// optional input the node leaves out),",
        "// void* out(int output), int64_t dim(int input, int axis) (axis < 0 counts from the end),",
        "// int64_t rows(int input, int trailing) (the product of all but the trailing axes),",
        "// int64_t int_attr(int), double float_attr(int), int dtype() and int norm_dtype() (tq_dtype of the",
        "// kT and kN tensors). op_of(call pointer) is",
        "// the table of a call struct's op, for code generic over the ops.",
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
            entries = ", ".join(f'{{"{t.name}", {_cpp_type(t)}, {"true" if t.optional else "false"}}}'
                                for t in tensors)
            lines.append(f"inline constexpr Tensor {title}[] = {{{entries}}};")
        attrs = []
        for a in spec.attributes:
            kind = "AttrKind::kInt" if a.kind == "int" else "AttrKind::kFloat"
            required = "true" if a.default is None else "false"
            default = 0.0 if a.default is None else float(a.default)
            is_bits = "true" if a.allowed == ops.SUPPORTED_BITS else "false"
            minimum = float(a.min_value) if a.min_value is not None else float("-inf")
            min_text = "-1e300" if minimum == float("-inf") else repr(minimum)
            attrs.append(f'{{"{a.name}", {kind}, {required}, {default!r}, {is_bits}, {min_text}}}')
        lines.append(f"inline constexpr Attr kAttrs[] = {{{', '.join(attrs)}}};")
        pairs = abi.inplace_pairs(spec)
        if pairs:
            lines.append("inline constexpr InPlace kInPlace[] = {" + ", ".join(
                f"{{{_cpp_enum(spec.inputs[i].name)}, {_cpp_enum(spec.outputs[o].name)}}}" for i, o in pairs) + "};")
            in_place = f"kInPlace, {len(pairs)}"
        else:
            in_place = "nullptr, 0"
        lines.append(f'inline constexpr Op kOp = {{"{spec.name}", kInputs, {len(spec.inputs)}, '
                     f"{len(spec.required_inputs())}, kOutputs, {len(spec.outputs)}, kAttrs, {len(spec.attributes)}, "
                     f"{in_place}}};")
        lines.append(f"using Call = tq_{stem}_call;")
        lines.append("template <typename Io>")
        lines.append("void fill(Call& c, const Io& io) {")
        fields = abi.call_fields(spec)
        for role in ("input", "output", "dim", "attribute", "dtype", "norm_dtype"):
            statements = [_fill_line(f) for f in fields if f.role == role]
            if statements:
                lines.append("  " + " ".join(statements))
        lines.append("}")
        lines.append(f"}}  // namespace {stem}")
        lines.append(f"constexpr const Op& op_of(const tq_{stem}_call*) {{ return {stem}::kOp; }}")
        lines.append("")
    lines.append("inline constexpr const Op* kAllOps[] = {" + ", ".join(f"&{s}::kOp" for s in stems) + "};")
    lines.append("")
    lines.append("}  // namespace tq_ops")
    return "\n".join(lines) + "\n"


_CALLS_PREAMBLE = """\
/* {generated}
 * tests/test_export.py fails when it drifts from the specs; tq_deploy.cuda builds its ctypes mirror
 * from the same field list (tq_deploy/abi.py).
 *
 * One struct per op of tq_deploy/ops.py, taken by every native kernel of the op (CPU: tq_kernels.h,
 * CUDA: tq_cuda.h): the inputs and outputs in the contract's order (host pointers for the CPU kernels,
 * device pointers for the CUDA ones; shapes: docs/ops.md), the sizes of the symbolic dimensions
 * (rows: the product of the leading "..." dims; S, T, Hq, Hkv, D, N, B, M: num_seqs, num_tokens,
 * num_q_heads, num_kv_heads, head_dim, num_blocks, block_size, max_blocks), the attributes, the
 * float type of the T tensors (dtype) and of the cache norms (norm_dtype, TN), and the launch:
 * device workspace and CUDA stream (the CPU kernels ignore them).
 * An in-place output (<x>_out) is the buffer the kernel writes; the caller makes it hold <x> first.
 * An optional input (docs/ops.md) the node leaves out is a null pointer.
 */
#ifndef TQ_CALLS_H_
#define TQ_CALLS_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {{
#endif

/* The float type of an op's T tensors, and of the paged cache's norms (TN). */
typedef enum {{ TQ_FLOAT32 = 0, TQ_FLOAT16 = 1, TQ_BFLOAT16 = 2 }} tq_dtype;

"""


def render_calls() -> str:
    """plugins/common/tq_calls.h: one C struct per op, the argument of every native kernel of it."""
    lines = _CALLS_PREAMBLE.format(generated=_GENERATED).splitlines()
    for spec in ops.ALL_OPS:
        stem = _stem(spec)
        lines.append(f"/* {spec.name} */")
        lines.append(f"typedef struct tq_{stem}_call {{")
        fields = abi.call_fields(spec)
        for role, title in (("input", "inputs"), ("output", "outputs"), ("dim", "sizes"),
                            ("attribute", "attributes"), ("dtype", "tq_dtype of T"),
                            ("norm_dtype", "tq_dtype of TN"), ("launch", "launch")):
            decls = " ".join(f"{f.c_type} {f.name};" for f in fields if f.role == role)
            if decls:
                lines.append(f"  /* {title} */ {decls}")
        lines.append(f"}} tq_{stem}_call;")
        lines.append("")
    lines += ["#ifdef __cplusplus", "}", "#endif", "", "#endif /* TQ_CALLS_H_ */"]
    return "\n".join(lines) + "\n"


def render_op_list() -> str:
    """plugins/common/tq_op_list.h: the ops as an X-macro, for the runtimes' registration."""
    lines = [
        f"// {_GENERATED}",
        "// tests/test_export.py fails when it drifts from the specs.",
        "//",
        "// TQ_FOR_EACH_OP(X) expands X(stem, Pascal, float_types, norm_types) once per op of",
        "// tq_deploy/ops.py: float_types is 2 where the op has a float type parameter T (a kernel each for",
        "// float32 and float16), else 1; norm_types likewise for the cache norms' type TN. The kernels'",
        "// declarations (tq_kernels.h, tq_cuda.h), the ONNX Runtime op table and factories",
        "// (plugins/ort/register_ops.cc) and the TensorRT plugin classes and creators",
        "// (plugins/trt/tq_plugins.h, tq_plugin_creators.cc) expand it.",
        "#pragma once",
        "",
        "#define TQ_FOR_EACH_OP(X) \\",
    ]
    for spec in ops.ALL_OPS:
        lines.append(f"  X({_stem(spec)}, {_pascal(spec)}, {2 if abi.has_float_type(spec) else 1}, "
                     f"{2 if abi.has_norm_type(spec) else 1}) \\")
    lines.append("")
    lines.append(f"#define TQ_NUM_OPS {len(ops.ALL_OPS)}")
    return "\n".join(lines) + "\n"


def render_cmake() -> str:
    """plugins/common/tq_ops.cmake: the op stems, from which the CMake lists name each op's sources."""
    stems = " ".join(_stem(spec) for spec in ops.ALL_OPS)
    return (f"# {_GENERATED}\n# tests/test_export.py fails when it drifts from the specs. Each op's sources are named by its stem:\n"
            "# kernels/cpu/tq_<stem>.cc, kernels/cuda/tq_<stem>.cu, ort/tq_<stem>_op.cc, trt/tq_<stem>_plugin.cc.\n"
            f"set(TQ_OP_STEMS {stems})\n")


NATIVE_FILES = {"tq_ops.h": render_header, "tq_calls.h": render_calls, "tq_op_list.h": render_op_list,
                "tq_ops.cmake": render_cmake}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", help="splice the tables into this markdown file (between the markers)")
    parser.add_argument("--header", help="write the C++ contract header (tq_ops.h alone) to this path")
    parser.add_argument("--native", help="write the generated native headers (%s) into this folder"
                        % ", ".join(NATIVE_FILES))
    args = parser.parse_args(argv)
    if args.write:
        path = Path(args.write)
        path.write_text(splice(path.read_text()))
    if args.header:
        Path(args.header).write_text(render_header())
    if args.native:
        for name, render in NATIVE_FILES.items():
            (Path(args.native) / name).write_text(render())
    if not (args.write or args.header or args.native):
        sys.stdout.write(render_all() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
