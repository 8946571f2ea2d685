"""What the fuzzer handles: one op call (a case), one broken rule (a finding), and the ops it covers.

Every op of the contract (:data:`tq_deploy.ops.ALL_OPS`) is fuzzed; an op is left out, with the
reason said in the report, only while a piece it needs is missing: the PyTorch API function of
its stem (``tq_deploy.dispatch.<stem>``, the truth every other runner is compared with) or a way
to draw its inputs (a bespoke drawer in :mod:`.draw`, else its ``make_inputs`` entry).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tq_deploy import ops


def stem(op: str) -> str:
    """The op's name in every layer: TQPagedAttention -> paged_attention."""
    name = op[2:]
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


def all_ops() -> tuple[str, ...]:
    return tuple(spec.name for spec in ops.ALL_OPS)


@dataclass
class Case:
    """One op call: inputs in contract order, attributes as (value, "int" | "float") pairs."""

    index: int
    op: str
    inputs: dict[str, np.ndarray]
    attrs: dict[str, tuple[float, str]]
    defect: str = ""  # "" for a valid call
    ref_refuses: bool = False  # the defect is one the PyTorch API refuses
    ort_refuses: bool = False  # the defect is one ONNX Runtime (through make_session) refuses
    data_defect: bool = False  # only the data is wrong: GPU backends may skip the check

    @property
    def spec(self) -> ops.OpSpec:
        return ops.OPS_BY_NAME[self.op]

    def describe(self) -> str:
        shapes = ", ".join(f"{k}{list(v.shape)}:{v.dtype}" for k, v in self.inputs.items())
        attrs = ", ".join(f"{k}={v}({t})" for k, (v, t) in self.attrs.items())
        return f"{self.op}({shapes}; {attrs})" + (f" defect={self.defect}" if self.defect else "")


@dataclass
class Finding:
    case: int
    op: str
    kind: str  # mismatch, unclear-error, accepted-invalid, refused-valid, crash, hang
    detail: str

    def to_dict(self) -> dict:
        return {"case": self.case, "op": self.op, "kind": self.kind, "detail": self.detail}
