"""The runners: one op call on the PyTorch API (any device) or on ONNX Runtime with the project's library."""

from __future__ import annotations

import numpy as np

from tq_deploy import ops
from tq_deploy.validate.fuzz.case import Case, stem


class Refused(Exception):
    """A backend refused a call; ``clear`` says whether its message names what is wrong."""

    def __init__(self, message: str, clear: bool):
        super().__init__(message)
        self.clear = clear


def _call_args(case: Case, to_tensor):
    spec = ops.OPS_BY_NAME[case.op]
    args = [to_tensor(case.inputs[t.name]) for t in spec.required_inputs()]
    optional = {t.name: to_tensor(case.inputs[t.name]) for t in spec.inputs if t.optional and t.name in case.inputs}
    attrs = {k: v for k, (v, _) in case.attrs.items()}
    order = [a.name for a in spec.attributes]
    unknown = [k for k in attrs if k not in order]
    if unknown:
        raise TypeError(f"unknown attributes {unknown}")
    positional = [attrs[a] for a in order if a in attrs and a != "scale"]
    return args, positional, attrs.get("scale"), optional


def run_torch(case: Case, device: str = "cpu") -> dict[str, np.ndarray]:
    """The PyTorch API (``tq_deploy.dispatch.<stem>``) on ``device``; raises Refused for a ValueError."""
    import torch

    from tq_deploy import dispatch

    def to_tensor(a):
        return torch.from_numpy(np.array(a, copy=True)).to(device)

    args, bits, scale, optional = _call_args(case, to_tensor)
    fn = getattr(dispatch, stem(case.op))
    extra = {} if scale is None else {"scale": scale}
    try:
        out = fn(*args, *bits, **extra, **optional)
    except ValueError as err:
        raise Refused(str(err), "expected" in str(err)) from None
    if isinstance(out, torch.Tensor):
        out = (out,)
    names = ops.OPS_BY_NAME[case.op].output_names()
    return {n: t.detach().float().cpu().numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.cpu().numpy()
            for n, t in zip(names, out)}


ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.int32): 6,
               np.dtype(np.int64): 7, np.dtype(np.float16): 10, np.dtype(np.float64): 11}


def param_types(op: str, input_types: dict[str, int]) -> dict[str, int]:
    """The element type of each type parameter (T, TN) of ``op``: its first input's type."""
    params: dict[str, int] = {}
    for t in ops.OPS_BY_NAME[op].inputs:
        if t.type_param and t.name in input_types:
            params.setdefault(t.type_param, input_types[t.name])
    return params


def node_model(op: str, attrs: dict[str, tuple[float, str]], input_types: dict[str, int],
               opset_version: int = ops.DOMAIN_VERSION):
    """A one-node model of ``op`` whose every input is a graph input of unknown shape (so any shape
    reaches the kernel's own checks) with the given element types; attributes typed as given. An
    output of a type parameter has its inputs' type (float32 where no input shows it: TQDecode)."""
    import onnx
    from onnx import helper

    spec = ops.OPS_BY_NAME[op]
    present = [t for t in spec.inputs if not t.optional or t.name in input_types]
    inputs = [helper.make_tensor_value_info(t.name, input_types[t.name], None) for t in present]
    params = param_types(op, input_types)
    outputs = [helper.make_tensor_value_info(t.name, params.get(t.type_param, 1) if t.type_param else
                                             {"tensor(uint8)": 2, "tensor(float)": 1}[t.types[0]], None)
               for t in spec.outputs]
    node = helper.make_node(op, [t.name for t in present], spec.output_names(), name=op, domain=ops.DOMAIN)
    for name, (value, kind) in attrs.items():
        node.attribute.append(helper.make_attribute(name, int(value) if kind == "int" else float(value)))
    graph = helper.make_graph([node], f"{op}_fuzz", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid(ops.DOMAIN, opset_version)], ir_version=10)


class OrtRunner:
    """ONNX Runtime (CPU EP) with the project's library through make_session; sessions are cached
    per (op, attributes, input types): a loose one-node model serves every shape. ``skip``: ops the
    library has no kernel for (:func:`ort_kernels_missing`), which this runner does not take."""

    def __init__(self, library=None, provider: str = "cpu", skip=()):
        self.library, self.provider, self.sessions, self.skip = library, provider, {}, frozenset(skip)

    def takes(self, op: str) -> bool:
        return op not in self.skip

    def __call__(self, case: Case) -> dict[str, np.ndarray]:
        from tq_deploy.runtime import session as rt

        spec = ops.OPS_BY_NAME[case.op]
        types = {k: ONNX_TYPES.get(v.dtype, 1) for k, v in case.inputs.items()}
        key = (case.op, tuple(sorted(case.attrs.items())), tuple(sorted(types.items())))
        try:
            if key not in self.sessions:
                model = node_model(case.op, case.attrs, types)
                self.sessions[key] = rt.make_session(model.SerializeToString(), provider=self.provider,
                                                     library=self.library)
            out = rt.run(self.sessions[key], case.inputs)
        except ValueError as err:  # the project's own checks (attributes, opset, feeds)
            raise Refused(str(err), "expected" in str(err)) from None
        except Exception as err:  # noqa: BLE001 - ONNX Runtime's exception types
            if not type(err).__module__.startswith("onnxruntime"):
                raise
            message = str(err)
            names = [spec.name, *spec.input_names(), *(a.name for a in spec.attributes)]
            raise Refused(message, any(n in message for n in names)) from None
        return {k: np.asarray(v) for k, v in out.items()}


def ort_kernels_missing(library=None, op_names=()) -> dict[str, str]:
    """The ops of ``op_names`` the custom-op library has no ONNX Runtime kernel for, each with ONNX
    Runtime's words: a session of a one-node model of the op does not build."""
    from tq_deploy.runtime import session as rt

    missing = {}
    for op in op_names:
        spec = ops.OPS_BY_NAME[op]
        attrs = {a.name: (4 if a.name in spec.bit_attributes() else a.default, a.kind) for a in spec.attributes}
        types = {t.name: ONNX_TYPES[np.dtype(_NUMPY_TYPES[t.types[0]])] for t in spec.inputs}
        try:
            rt.make_session(node_model(op, attrs, types).SerializeToString(), library=library)
        except Exception as err:  # noqa: BLE001 - ONNX Runtime's exception types
            if not type(err).__module__.startswith("onnxruntime"):
                raise
            missing[op] = " ".join(str(err).split())[:300]
    return missing


_NUMPY_TYPES = {ops.FLOAT: np.float32, ops.FLOAT16: np.float16, ops.UINT8: np.uint8, ops.INT32: np.int32,
                ops.INT64: np.int64}
