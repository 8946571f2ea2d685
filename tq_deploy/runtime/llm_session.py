"""The exported LLM in ONNX Runtime, every layer's paged KV cache resident on the session's device.

    session = LLMSession("model.onnx", provider="cuda", num_blocks=512)
    logits = session.step(pack_step(rows, session.block_size))   # tq_deploy.runtime.generation

One graph runs prefill chunks and decode steps alike on packed tokens (LLM_INTERFACE: input_ids,
positions, slot_mapping, query_start, block_tables, context_lens, logits_index, and the caches
``k_codes.l`` ... of every layer l). As :class:`~tq_deploy.runtime.decode_session.DecodeSession`
does for the decode step, the session allocates every layer's four cache tensors once as
OrtValues on its device and binds each as both its input and its ``*_out.l`` output: the layers'
TQCacheUpdate nodes write the new tokens straight into them and TQPagedPrefill reads them there.
Per step only the small step inputs go to the device and the logits come back.

The cache tensors' shapes come from the graph's own inputs (``[N, B, Hkv, P]`` with N, the number
of blocks, chosen here), so a session needs nothing of the metadata beyond its kind.
"""

from __future__ import annotations

import os

import numpy as np

from tq_deploy.runtime.decode_session import CACHE_NAMES
from tq_deploy.runtime.generation import StepInputs
from tq_deploy.runtime.session import _ORT_DTYPES, bind_in_place, make_session, resident_caches

LLM_KIND = "llm"
DEFAULT_CACHE_TOKENS = 4096  # num_blocks when none is given: this many tokens in all


def load_llm_metadata(model) -> tuple[object, dict]:
    """(graph-only ModelProto, config) of an exported LLM (path, bytes or ModelProto); another kind
    of model is a ValueError."""
    import onnx

    from tq_deploy.export.common import read_metadata

    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray)):
        proto = onnx.load_from_string(bytes(model))
    else:
        path = os.fspath(model)
        from tq_deploy import files

        files.check_input(path, "model", "an .onnx file exported by `tq-deploy export --model`")
        try:
            proto = onnx.load(path, load_external_data=False)
        except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends: one message for all
            raise ValueError(f"model {path!r} is not a readable ONNX file ({type(err).__name__}: {err})") from None
    kind, config = read_metadata(proto)
    if kind != LLM_KIND:
        raise ValueError(f"model kind={kind!r}, expected {LLM_KIND!r} (an LLM exported by `tq-deploy export --model`)")
    return proto, config


class LLMSession:
    """Steps of the exported LLM with resident, in-place paged caches (module docstring)."""

    def __init__(self, model, provider: str = "cpu", num_blocks: int | None = None, library=None,
                 device_id: int = 0, threads: int | None = None, session_options=None):
        import onnx

        proto, self.config = load_llm_metadata(model)
        self.provider = provider
        self.device = "cuda" if provider == "cuda" else "cpu"
        self.device_id = device_id
        # a path goes to ONNX Runtime as a path, so that weights in external data are found
        source = model if isinstance(model, (bytes, bytearray)) else \
            proto.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
        self.session = make_session(source, provider=provider, library=library, device_id=device_id,
                                    session_options=session_options, threads=threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._dtypes = {name: np.dtype(_ORT_DTYPES[spec.type]) for name, spec in inputs.items()}
        missing = [n for n in StepInputs.NAMES if n not in inputs]
        if missing:
            raise ValueError(f"model inputs {sorted(inputs)} lack {missing}, expected the LLM interface's step inputs")
        cache_inputs = {name: spec for name, spec in inputs.items() if name.partition(".")[0] in CACHE_NAMES}
        self.num_layers = len(cache_inputs) // len(CACHE_NAMES)
        if self.num_layers < 1 or any(f"{c}.{layer}" not in cache_inputs
                                      for c in CACHE_NAMES for layer in range(self.num_layers)):
            raise ValueError(f"model cache inputs {sorted(cache_inputs)}, expected k_codes.l, k_norms.l, v_codes.l, "
                             "v_norms.l for every layer l = 0, 1, ...")
        self.block_size = _static_dim(cache_inputs["k_codes.0"], 1)
        if num_blocks is None:
            num_blocks = -(-DEFAULT_CACHE_TOKENS // self.block_size)
        logits = self.session.get_outputs()[0]
        if logits.name != "logits":
            raise ValueError(f"model's first output is {logits.name!r}, expected 'logits'")
        vocab = logits.shape[-1] if logits.shape else None
        self.vocab_size = int(vocab) if isinstance(vocab, int) else self.config.get("vocab_size")
        self._cache_inputs = cache_inputs
        self._allocate(num_blocks)

    def _allocate(self, num_blocks) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks!r}, expected an int >= 1")
        self.num_blocks = int(num_blocks)
        self.shapes = {}
        for name, spec in self._cache_inputs.items():
            tail = tuple(_static_dim(spec, d) for d in range(1, len(spec.shape)))
            self.shapes[name] = ((self.num_blocks, *tail), self._dtypes[name])
        if self.device == "cpu":
            from tq_deploy.cli_checks import check_memory

            need = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in self.shapes.values())
            check_memory(f"num_blocks={self.num_blocks} (--num-blocks)", need)
        self.caches = {}  # the old buffers go before the new ones are made
        self.caches = resident_caches(self.shapes, self.device, self.device_id)
        self.binding = self.session.io_binding()
        bind_in_place(self.binding, self.caches)
        self.binding.bind_output("logits", "cpu")
        self._logits_at = len(self.caches)  # the binding keeps its outputs in the order first bound

    def resize(self, num_blocks: int) -> None:
        """New, empty caches of ``num_blocks`` blocks (what the old ones held is dropped)."""
        self._allocate(num_blocks)

    def cache_bytes(self) -> int:
        """Bytes of the resident caches of all layers."""
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in self.shapes.values())

    def step(self, inputs: StepInputs) -> np.ndarray:
        """One call of the model: writes the step's tokens into the caches, returns logits [R, V]."""
        # bind_cpu_input may point at an array's memory: the arrays made here live until the run returns
        arrays = {name: np.ascontiguousarray(a) for name, a in inputs.arrays().items()}
        for name, array in arrays.items():
            if array.dtype != self._dtypes[name]:
                raise ValueError(f"{name}.dtype={array.dtype}, expected {self._dtypes[name]}")
            self.binding.bind_cpu_input(name, array)
        self.binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(self.binding)
        logits = self.binding.get_outputs()[self._logits_at].numpy()
        del arrays
        return logits

    def read_cache(self, layer: int) -> dict[str, np.ndarray]:
        """Layer ``layer``'s cache as host arrays (a copy), by the op's names (k_codes, ...)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer={layer}, expected 0..{self.num_layers - 1}")
        return {c: self.caches[f"{c}.{layer}"].numpy() for c in CACHE_NAMES}


def _static_dim(spec, axis: int) -> int:
    dim = spec.shape[axis] if len(spec.shape) > axis else None
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"model input {spec.name!r} has shape {spec.shape}, expected a fixed size on axis {axis}")
    return dim
