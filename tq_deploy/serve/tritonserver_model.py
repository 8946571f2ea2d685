"""The stateful decode model inside Triton's Python backend (``TritonPythonModel``).

tritonserver loads ``<repository>/tq_decode/1/model.py``, which imports this class; it runs in the
backend's stub process, so the ONNX Runtime session and the paged cache pool live there, on the
server. tritonserver's sequence batcher (``oldest`` strategy) routes every request of a sequence to
this instance and batches requests of different sequences; each request arrives with the
control tensors START, END (int32 0/1) and CORRID (uint64, the client's sequence_id). One
``execute`` call is one decode step of all its sequences (:class:`~tq_deploy.serve.decoder.PagedDecoder`),
and every request gets its own response or its own error.

Settings come from the config's ``parameters`` (written by :mod:`tq_deploy.serve.server`):
model, library, provider, device_id, num_blocks, threads, max_tokens, idle_seconds.

Pool gauges are published as tritonserver custom metrics on the metrics endpoint:
``tq_pool_blocks{state="free"|"total"}`` and ``tq_pool_sequences``.
"""

from __future__ import annotations

import ctypes
import json

import numpy as np

_capsule_set_destructor = ctypes.pythonapi.PyCapsule_SetDestructor
_capsule_set_destructor.argtypes = [ctypes.py_object, ctypes.c_void_p]
_capsule_set_destructor.restype = ctypes.c_int


# The Python-backend stub of tritonserver 2.51 (nvidia-pytriton 0.7.0) misreads numpy 2 arrays (it is
# right with numpy 1.26): ``Tensor.as_numpy()`` repeats the first element and
# ``pb_utils.Tensor(name, array)`` sends an empty tensor. Tensors cross in both directions through
# DLPack instead, which is right with both.

def input_array(pb_utils, request, name: str) -> np.ndarray | None:
    """A copy of the request's input ``name`` (None when the request has none)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else np.from_dlpack(tensor).copy()


def output_tensor(pb_utils, name: str, array: np.ndarray):
    """A response tensor holding ``array`` (through DLPack, see above).

    The stub renames a capsule it consumed "used_dlpack" where numpy's capsule destructor expects
    "used_dltensor", so that destructor would print an error for every response; the stub calls
    the tensor's own deleter when it is done, so the capsule goes without a destructor.
    """
    capsule = np.ascontiguousarray(array).__dlpack__()
    _capsule_set_destructor(capsule, None)
    return pb_utils.Tensor.from_dlpack(name, capsule)


def _flag(request, pb_utils, name: str) -> bool:
    array = input_array(pb_utils, request, name)
    return array is not None and bool(array.reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        from tq_deploy.runtime.decode_session import DecodeSession
        from tq_deploy.serve.decoder import INTERNAL, INVALID, UNAVAILABLE, PagedDecoder
        from tq_deploy.runtime.block_pool import BlockPool

        self.pb_utils = pb_utils
        self._codes = {INVALID: pb_utils.TritonError.INVALID_ARG, UNAVAILABLE: pb_utils.TritonError.UNAVAILABLE,
                       INTERNAL: pb_utils.TritonError.INTERNAL}
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}

        def optional_int(key):
            return int(params[key]) if params.get(key) else None

        session = DecodeSession(params["model"], provider=params.get("provider", "cpu"),
                                num_blocks=int(params["num_blocks"]), library=params.get("library") or None,
                                device_id=int(params.get("device_id", 0)), threads=optional_int("threads"))
        pool = BlockPool(session.num_blocks, int(session.config["block_size"]), max_tokens=optional_int("max_tokens"))
        idle = float(params["idle_seconds"]) if params.get("idle_seconds") else None
        self.decoder = PagedDecoder(session, pool, idle_seconds=idle)
        self.hidden_size = self.decoder.hidden_size
        blocks = pb_utils.MetricFamily(name="tq_pool_blocks", description="KV-cache pool blocks",
                                       kind=pb_utils.MetricFamily.GAUGE)
        sequences = pb_utils.MetricFamily(name="tq_pool_sequences", description="sequences holding blocks",
                                          kind=pb_utils.MetricFamily.GAUGE)
        # Metric objects must be released before their families: keep both, families last.
        self._families = (blocks, sequences)
        self._free_metric = blocks.Metric(labels={"model": args["model_name"], "state": "free"})
        self._total_metric = blocks.Metric(labels={"model": args["model_name"], "state": "total"})
        self._sequences_metric = sequences.Metric(labels={"model": args["model_name"]})
        self._total_metric.set(pool.num_blocks)
        self._publish()

    def _publish(self) -> None:
        pool = self.decoder.pool
        self._free_metric.set(pool.free_blocks)
        self._sequences_metric.set(len(pool.sequences))

    def _read(self, request):
        from tq_deploy.serve.decoder import StepRequest

        pb_utils = self.pb_utils
        corrid = input_array(pb_utils, request, "CORRID")
        sequence_id = int(corrid.reshape(-1)[0]) if corrid is not None else request.correlation_id()
        tensors = {name: input_array(pb_utils, request, name) for name in ("hidden", "positions")}
        error = None if sequence_id else "sequence_id is 0 or missing, expected a nonzero sequence_id on every request"
        return StepRequest(sequence_id, _flag(request, pb_utils, "START"), _flag(request, pb_utils, "END"),
                           tensors["hidden"], tensors["positions"], error=error)

    def execute(self, requests):
        pb_utils = self.pb_utils
        steps = [self._read(r) for r in requests]
        results = self.decoder.step(steps)
        self._publish()
        responses = []
        for result in results:
            if result.error is not None:
                error = pb_utils.TritonError(result.error, self._codes[result.kind])
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                out = output_tensor(pb_utils, "out", result.out.reshape(1, self.hidden_size))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses

    def finalize(self):
        self._free_metric = self._total_metric = self._sequences_metric = None
        self._families = None
        self.decoder = None
