"""tritonserver model configurations (``config.pbtxt``) written from plain Python values.

A configuration is a dict whose values are scalars, :class:`Enum` names, dicts (sub-messages),
lists of scalars (a repeated scalar field) or lists of dicts (a repeated message field); map
fields such as ``parameters`` are lists of ``{"key": ..., "value": {...}}``. :func:`to_pbtxt`
prints it in protobuf text format. The output is checked against tritonserver's own schema
(``model_config.proto``, shipped with tritonclient as ``tritonclient.grpc.model_config_pb2``)
by :func:`parse`, which the generators call when tritonclient is installed and the tests call
always.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Enum:
    """An enum value (printed bare: ``TYPE_FP32``, ``KIND_CPU``)."""

    name: str


def _scalar(value) -> str:
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are a subset of the text format's
        return json.dumps(value)
    raise TypeError(f"config value {value!r} is a {type(value).__name__}, expected str, int, float, bool or Enum")


def to_pbtxt(config: dict, indent: int = 0) -> str:
    pad = "  " * indent
    lines = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, dict):
            lines.append(f"{pad}{key} {{\n{to_pbtxt(value, indent + 1)}{pad}}}")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items = ",\n".join(f"{pad}  {{\n{to_pbtxt(v, indent + 2)}{pad}  }}" for v in value)
            lines.append(f"{pad}{key} [\n{items}\n{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "".join(line + "\n" for line in lines)


def model_config_proto():
    """tritonserver's ModelConfig message class, or None when tritonclient[grpc] is not installed."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return None
    return model_config_pb2.ModelConfig


def parse(text: str):
    """``text`` parsed into tritonserver's ModelConfig message (ValueError naming the problem if it is not
    one); None when tritonclient is not installed."""
    message_class = model_config_proto()
    if message_class is None:
        return None
    from google.protobuf import text_format

    message = message_class()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as err:
        raise ValueError(f"config.pbtxt is not a valid tritonserver model configuration: {err}") from None
    return message
