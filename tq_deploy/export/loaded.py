"""One exported model, loaded once and handed from step to step.

    model = ExportedModel.load("model.onnx", library=args.library)
    feeds = random_inputs(model, seed=0)          # validate/, runtime/ and the commands take it
    expected = reference_outputs(model, feeds)

The object carries what every step needs: the ONNX proto, the metadata tq-deploy stored in it
(its kind and config, read once), the decode model's :class:`TQModelConfig` rebuilt from that,
and the custom-op library the runtimes register (None: the built one). Functions that take a
model accept this object or a bare proto (:meth:`ExportedModel.of`), so older callers keep working.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import onnx

from tq_deploy.export.common import load_model, read_metadata


@dataclass
class ExportedModel:
    proto: onnx.ModelProto
    path: str | None = None  # where it was read from or written to; None: in memory only
    library: str | None = None  # the custom-op library for ONNX Runtime; None: the built one

    @classmethod
    def load(cls, path, library=None) -> "ExportedModel":
        """Read ``path`` (a ValueError naming it when it is not an ONNX file)."""
        return cls(load_model(path), os.fspath(path), None if library is None else os.fspath(library))

    @classmethod
    def of(cls, model) -> "ExportedModel":
        """``model`` as an ExportedModel: itself, a wrapped proto, or a path loaded."""
        if isinstance(model, ExportedModel):
            return model
        if isinstance(model, onnx.ModelProto):
            return cls(model)
        return cls.load(model)

    @cached_property
    def _metadata(self) -> tuple[str, dict]:
        # read on first use: a model without tq-deploy metadata still runs where nothing asks for it
        return read_metadata(self.proto)

    @property
    def kind(self) -> str:
        """"model" (the decode step) or "op" (one custom node), as stored by the exporter."""
        return self._metadata[0]

    @property
    def metadata(self) -> dict:
        """The config the exporter stored in ``metadata_props`` (a plain dict)."""
        return self._metadata[1]

    @cached_property
    def config(self):
        """The decode model's :class:`~tq_deploy.reference.model.TQModelConfig` (kind "model")."""
        from tq_deploy.reference.model import TQModelConfig

        if self.kind != "model":
            raise ValueError(f"model metadata kind={self.kind!r}, expected 'model' (a decode model)")
        return TQModelConfig.from_dict(self.metadata)

    @cached_property
    def serialized(self) -> bytes:
        return self.proto.SerializeToString()

    @property
    def name(self) -> str:
        """The file's stem, or "model" for one kept in memory."""
        return os.path.splitext(os.path.basename(self.path))[0] if self.path else "model"

    @property
    def custom_ops(self) -> list[str]:
        return sorted({n.op_type for n in self.proto.graph.node if n.domain == "turboquant"})
