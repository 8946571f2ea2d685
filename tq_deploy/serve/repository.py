"""A tritonserver model repository for the exported decode step, for a stock Triton Inference Server.

    write_repository("repo/", "model.onnx")     # what `tq-deploy triton-repo repo/` does

Layout (two repositories, one per backend, so that each starts without the other's files):

    repo/README.md                         versions, how to start the server, the request protocol
    repo/lib/libtq_deploy_ort.so           the custom-op library (and libtq_deploy_trt.so when built)
    repo/onnxruntime/tq_decode/config.pbtxt
    repo/onnxruntime/tq_decode/1/model.onnx   the serving model (below)
    repo/tensorrt/tq_decode/config.pbtxt
    repo/tensorrt/tq_decode/1/             model.plan goes here (built from the serving model)

The exported step takes the whole paged cache as inputs and returns it updated; no client should
send that. The serving model keeps it in tritonserver: every sequence owns a private cache of
``blocks_per_sequence`` blocks, held by the sequence batcher as implicit state (``k_codes_state``
paired with ``k_codes_state_out``, ...) and batched along a leading axis. A request carries only
``hidden`` [H] and ``positions`` [1] and tritonserver's sequence id / start / end. In the graph, a batch
of S states [S, M, B, Hkv, P] is viewed as one pool of S*M blocks: sequence s owns blocks
s*M .. s*M+M-1, its token t goes to slot (s*M)*B + t and it attends over t+1 tokens; that is the
exported step unchanged, between two reshapes. A position outside [0, M*B) writes nothing
(slot -1) and attends over the clipped range, so an overlong sequence never touches another's
blocks; the client must end a sequence before it reaches M*B tokens.

Unlike ``tq-deploy serve`` (one shared pool, blocks on demand), implicit state costs every
sequence its whole M*B-token cache from its start, and tritonserver moves each batch's states in and
out of the model on every step.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tq_deploy import files, ops
from tq_deploy.serve.pbtxt import Enum, parse, to_pbtxt

MODEL_NAME = "tq_decode"
CACHE_NAMES = ("k_codes", "k_norms", "v_codes", "v_norms")
STATE_SUFFIX = "_state"
STATE_OUT_SUFFIX = "_state_out"


def state_dims(config: dict, blocks_per_sequence: int) -> dict[str, list[int]]:
    """Per-sequence state shape of each cache tensor (without the batch axis)."""
    b, hkv, d = config["block_size"], config["num_kv_heads"], config["head_dim"]
    return {
        "k_codes": [blocks_per_sequence, b, hkv, ops.packed_size(d, config["k_bits"])],
        "k_norms": [blocks_per_sequence, b, hkv],
        "v_codes": [blocks_per_sequence, b, hkv, ops.packed_size(d, config["v_bits"])],
        "v_norms": [blocks_per_sequence, b, hkv],
    }


def serving_model(model, blocks_per_sequence: int) -> onnx.ModelProto:
    """The decode step (an ExportedModel or its proto) with per-sequence caches as batched state
    inputs/outputs (module docstring)."""
    from tq_deploy.export.loaded import ExportedModel
    from tq_deploy.export.schemas import register_schemas

    exported = ExportedModel.of(model)
    model, kind, config = exported.proto, exported.kind, exported.metadata
    if kind != "model":
        raise ValueError(f"model kind={kind!r}, expected a decode model exported by `tq-deploy export`")
    if not isinstance(blocks_per_sequence, int) or blocks_per_sequence < 1:
        raise ValueError(f"blocks_per_sequence={blocks_per_sequence!r}, expected an int >= 1")
    m = blocks_per_sequence
    b = config["block_size"]
    dims = state_dims(config, m)
    serving = onnx.ModelProto()
    serving.CopyFrom(model)
    g = serving.graph
    replaced = {"slot_mapping", "block_tables", "context_lens", *CACHE_NAMES}
    inputs = {i.name: i for i in g.input}
    missing = sorted(replaced - set(inputs) | {"hidden", "positions"} - set(inputs))
    if missing:
        raise ValueError(f"model has no graph inputs {missing}, expected the decode step's inputs")
    kept_inputs = [i for i in g.input if i.name not in replaced]
    del g.input[:]
    g.input.extend(kept_inputs)
    dtypes = {name: inputs[name].type.tensor_type.elem_type for name in CACHE_NAMES}
    for name in CACHE_NAMES:
        g.input.append(helper.make_tensor_value_info(name + STATE_SUFFIX, dtypes[name], ["batch", *dims[name]]))
    kept_outputs = [o for o in g.output if o.name not in {n + "_out" for n in CACHE_NAMES}]
    del g.output[:]
    g.output.extend(kept_outputs)
    for name in CACHE_NAMES:
        g.output.append(helper.make_tensor_value_info(name + STATE_OUT_SUFFIX, dtypes[name], ["batch", *dims[name]]))

    def const(name: str, value) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64), name=f"serve.{name}"))
        return f"serve.{name}"

    nodes = []

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"serve.{output}", **attrs))
        return output

    # which rows of the batched pool belong to each sequence of the batch
    shape = node("Shape", ["hidden"], "serve.hidden_shape")
    count = node("Gather", [shape, const("zero", 0)], "serve.sequences", axis=0)
    index = node("Range", [const("zero_start", 0), count, const("one", 1)], "serve.sequence_index")
    first = node("Mul", [index, const("blocks_per_sequence", m)], "serve.first_block")
    table = node("Add", [node("Unsqueeze", [first, const("axis1", [1])], "serve.first_block_column"),
                         node("Unsqueeze", [const("own_blocks", np.arange(m)), const("axis0", [0])],
                              "serve.own_blocks_row")], "serve.block_tables_int64")
    node("Cast", [table], "block_tables", to=TensorProto.INT32)
    capacity = const("capacity", m * b)
    inside = node("And", [node("GreaterOrEqual", ["positions", const("zero_position", 0)], "serve.not_negative"),
                          node("Less", ["positions", capacity], "serve.below_capacity")], "serve.position_fits")
    slot = node("Add", [node("Mul", [first, const("block_size", b)], "serve.first_slot"), "positions"], "serve.slot")
    node("Where", [inside, slot, const("no_slot", -1)], "slot_mapping")
    length = node("Clip", [node("Add", ["positions", const("one_token", 1)], "serve.length_unclipped"),
                           const("zero_length", 0), capacity], "serve.length")
    node("Cast", [length], "context_lens", to=TensorProto.INT32)
    for name in CACHE_NAMES:
        node("Reshape", [name + STATE_SUFFIX, const(f"{name}_pool_shape", [-1, *dims[name][1:]])], name)
    prefix = nodes
    nodes = []
    for name in CACHE_NAMES:
        node("Reshape", [name + "_out", const(f"{name}_state_shape", [-1, *dims[name]])], name + STATE_OUT_SUFFIX)
    body = list(g.node)
    del g.node[:]
    g.node.extend(prefix + body + nodes)
    del g.value_info[:]
    serving.doc_string = (f"TurboQuant decode step for tritonserver: per-sequence caches of {m} blocks x {b} tokens as "
                          "sequence-batcher state (tq_deploy.serve.repository)")
    register_schemas()
    onnx.checker.check_model(serving, full_check=True)
    return serving


def _tensor(name: str, dtype: str, dims: list[int], **extra) -> dict:
    return {"name": name, "data_type": Enum(dtype), "dims": dims, **extra}


TRITONSERVER_TYPES = {TensorProto.UINT8: "TYPE_UINT8", TensorProto.INT8: "TYPE_INT8", TensorProto.FLOAT: "TYPE_FP32"}


def repository_config(config: dict, *, backend: str, blocks_per_sequence: int, max_batch: int, instances: int,
                      device: str, gpus: list[int] | None, max_sequences: int, queue_delay_us: int,
                      idle_seconds: float, op_library: str | None) -> dict:
    """config.pbtxt of the serving model for ``backend`` "onnxruntime" or "tensorrt"."""
    hidden = config["hidden_size"]
    dims = state_dims(config, blocks_per_sequence)
    # TensorRT refuses uint8 plugin I/O, so the engine's codes are int8 with the same bytes
    # (tq_deploy.runtime.tensorrt.retype_codes_for_tensorrt); its states are int8 too.
    codes_type = "TYPE_INT8" if backend == "tensorrt" else "TYPE_UINT8"
    types = {"k_codes": codes_type, "v_codes": codes_type, "k_norms": "TYPE_FP32", "v_norms": "TYPE_FP32"}
    states = [{
        "input_name": name + STATE_SUFFIX,
        "output_name": name + STATE_OUT_SUFFIX,
        "data_type": Enum(types[name]),
        "dims": dims[name],
        # A new sequence starts from zeros (only its written slots are ever read, but zeros
        # keep a fresh state deterministic).
        "initial_state": [{"data_type": Enum(types[name]), "dims": dims[name], "zero_data": True,
                           "name": f"empty_{name}"}],
    } for name in CACHE_NAMES]
    group = {"count": instances, "kind": Enum("KIND_GPU" if device == "gpu" else "KIND_CPU")}
    if device == "gpu" and gpus:
        group["gpus"] = gpus
    result = {
        "name": MODEL_NAME,
        "backend": backend,
        "max_batch_size": max_batch,
        "input": [
            _tensor("hidden", "TYPE_FP32", [hidden]),
            # one position per request; the model sees positions [batch]
            _tensor("positions", "TYPE_INT64", [1], reshape={"shape": []}),
        ],
        "output": [_tensor("out", "TYPE_FP32", [hidden])],
        "sequence_batching": {
            "max_sequence_idle_microseconds": int(idle_seconds * 1e6),
            "oldest": {"max_candidate_sequences": max_sequences, "preferred_batch_size": [max_batch],
                       "max_queue_delay_microseconds": queue_delay_us},
            "state": states,
        },
        "instance_group": [group],
    }
    if backend == "tensorrt":
        result["platform"] = "tensorrt_plan"
        result["default_model_filename"] = "model.plan"
    else:
        result["default_model_filename"] = "model.onnx"
        result["model_operations"] = {"op_library_filename": [op_library]}
    return result


@dataclass
class Repository:
    path: str
    model: dict  # the decode model's config (from the .onnx metadata)
    blocks_per_sequence: int
    max_tokens: int  # per sequence
    state_bytes_per_sequence: int
    onnxruntime_config: str
    tensorrt_config: str
    op_library: str  # as the server will see it
    trt_library: str | None
    ort_api_version: int | None
    tritonclient_schema: str | None  # the tritonclient whose model_config.proto checked the configs

    def to_dict(self) -> dict:
        return asdict(self)


def write_repository(out: str | os.PathLike, model: str | os.PathLike | onnx.ModelProto, *, max_tokens: int | None = None,
                     max_batch: int = 32, instances: int = 1, device: str = "cpu", gpus: list[int] | None = None,
                     max_sequences: int = 256, queue_delay_us: int = 500, idle_seconds: float = 300.0,
                     server_path: str | None = None, library: str | os.PathLike | None = None,
                     overwrite: bool = False) -> Repository:
    """Write the repository (module docstring) for ``model`` (the exported decode step) to ``out``.

    ``max_tokens`` per sequence (default: the model config's max_blocks_per_seq * block_size) is
    rounded up to whole blocks. ``server_path`` is where the server will see ``out`` (e.g.
    "/models" inside a container; default: ``out``'s absolute path): the config names the
    custom-op library under it.
    """
    from tq_deploy.export.common import save_model
    from tq_deploy.export.loaded import ExportedModel
    from tq_deploy.runtime import library as native
    from tq_deploy.runtime.session import custom_op_library, library_build_info

    exported = ExportedModel.of(model)
    kind, config = exported.kind, exported.metadata
    if kind != "model":
        raise ValueError(f"model is a {kind!r} export, expected a decode model (tq-deploy export without --op)")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device={device!r}, expected 'cpu' or 'gpu'")
    for name, value in (("max_batch", max_batch), ("instances", instances), ("max_sequences", max_sequences)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}, expected an int >= 1")
    if queue_delay_us < 0:
        raise ValueError(f"queue_delay_us={queue_delay_us}, expected >= 0")
    if not idle_seconds > 0:
        raise ValueError(f"idle_seconds={idle_seconds}, expected > 0")
    block = config["block_size"]
    if max_tokens is None:
        max_tokens = config["max_blocks_per_seq"] * block
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r}, expected an int >= 1")
    blocks = -(-max_tokens // block)
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise ValueError(f"out={str(target)!r} is a file, expected a folder for the repository")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"out={str(target)!r} is not empty, expected a new or empty folder (or pass overwrite)")
    ort_library = custom_op_library(library)
    try:
        ort_api = int(library_build_info(ort_library).get("ort_api_version"))
    except (OSError, AttributeError, TypeError, ValueError):
        ort_api = None
    try:
        trt_library = Path(native.locate("trt"))
    except native.NativeLibraryNotFoundError:
        trt_library = None
    server_root = server_path or str(target.resolve())
    op_library = f"{server_root.rstrip('/')}/lib/{ort_library.name}"

    serving = serving_model(exported, blocks)
    common = dict(blocks_per_sequence=blocks, max_batch=max_batch, instances=instances, device=device, gpus=gpus,
                  max_sequences=max_sequences, queue_delay_us=queue_delay_us, idle_seconds=idle_seconds)
    texts = {backend: to_pbtxt(repository_config(config, backend=backend, op_library=op_library, **common))
             for backend in ("onnxruntime", "tensorrt")}
    checked = [parse(text) for text in texts.values()]
    schema = None
    if checked[0] is not None:
        from importlib import metadata

        schema = f"tritonclient {metadata.version('tritonclient')}"

    state_bytes = sum(int(np.prod(d)) * (1 if n.endswith("codes") else 4) for n, d in state_dims(config, blocks).items())
    (target / "lib").mkdir(parents=True, exist_ok=True)
    for backend in texts:
        (target / backend / MODEL_NAME / "1").mkdir(parents=True, exist_ok=True)
        files.write_text(target / backend / MODEL_NAME / "config.pbtxt", texts[backend])
    save_model(serving, target / "onnxruntime" / MODEL_NAME / "1" / "model.onnx")
    _copy(ort_library, target / "lib" / ort_library.name)
    if trt_library is not None:
        _copy(trt_library, target / "lib" / trt_library.name)
    repo = Repository(
        path=str(target), model=config, blocks_per_sequence=blocks, max_tokens=blocks * block,
        state_bytes_per_sequence=state_bytes, onnxruntime_config=texts["onnxruntime"],
        tensorrt_config=texts["tensorrt"], op_library=op_library,
        trt_library=f"{server_root.rstrip('/')}/lib/{trt_library.name}" if trt_library else None,
        ort_api_version=ort_api, tritonclient_schema=schema)
    files.write_text(target / "README.md", readme(repo, server_root, max_batch))
    return repo


def _copy(source: Path, target: Path) -> None:
    with files.atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
        shutil.copymode(source, tmp)


def readme(repo: Repository, server_root: str, max_batch: int) -> str:
    c = repo.model
    ort_line = (f"`lib/libtq_deploy_ort.so` was built against ONNX Runtime API version {repo.ort_api_version}: the "
                f"onnxruntime backend's ONNX Runtime must be **1.{repo.ort_api_version} or newer**"
                if repo.ort_api_version else
                "`lib/libtq_deploy_ort.so` did not report its ONNX Runtime API version; it was built against the "
                "headers the project fetches (ORT API 29): the backend's ONNX Runtime must be **1.29 or newer**")
    checked = (f"Both config.pbtxt files were parsed against tritonserver's `model_config.proto` as shipped with "
               f"{repo.tritonclient_schema} when this repository was written."
               if repo.tritonclient_schema else
               "tritonclient was not installed when this repository was written, so the configs were not parsed "
               "against tritonserver's model_config.proto (install tritonclient[grpc] and rerun to check them).")
    trt_lib = repo.trt_library or f"{server_root}/lib/libtq_deploy_trt.so"
    return f"""# tritonserver model repository: TurboQuant decode step

Written by `tq-deploy triton-repo`. Model: hidden size {c['hidden_size']}, {c['num_q_heads']} query heads,
{c['num_kv_heads']} KV heads, head dim {c['head_dim']}, keys {c['k_bits']} bits, values {c['v_bits']} bits,
blocks of {c['block_size']} tokens.

    onnxruntime/tq_decode/   onnxruntime backend, the custom ops from lib/libtq_deploy_ort.so
    tensorrt/tq_decode/      tensorrt backend (model.plan to be built, see below)
    lib/                     the custom-op library{' and the TensorRT plugin library' if repo.trt_library else ''}

## What a request carries

The KV cache never crosses the network. Each sequence's cache is kept by tritonserver's sequence
batcher as implicit state (`k_codes_state` -> `k_codes_state_out`, and the same for `k_norms`,
`v_codes`, `v_norms`): {repo.blocks_per_sequence} blocks, i.e. **at most {repo.max_tokens} tokens per sequence**,
{repo.state_bytes_per_sequence / 2**10:.1f} KiB of state per sequence, allocated when it starts. A request is one
token of one sequence:

| input | type | shape | meaning |
| --- | --- | --- | --- |
| `hidden` | FP32 | [1, {c['hidden_size']}] | the token's hidden state |
| `positions` | INT64 | [1, 1] | its position: 0 for the first token, then 1, 2, ... |

with tritonserver's `sequence_id` (nonzero), `sequence_start` on the first token and `sequence_end` on
the last. Output `out` FP32 [1, {c['hidden_size']}]. Up to {max_batch} sequences are batched into one step
(`oldest` strategy). A position at or beyond {repo.max_tokens} is not stored (the output is then
wrong): end the sequence before. tritonserver moves each step's states in and out of the model, so a
step costs time in proportion to {repo.max_tokens} tokens per sequence, not to the tokens held;
`tq-deploy serve` (one shared paged pool) does not.

```python
import numpy as np, tritonclient.grpc as grpcclient
client = grpcclient.InferenceServerClient("localhost:8001")
for t, h in enumerate(hidden_states):               # h: float32 [{c['hidden_size']}]
    x = grpcclient.InferInput("hidden", [1, {c['hidden_size']}], "FP32"); x.set_data_from_numpy(h[None])
    p = grpcclient.InferInput("positions", [1, 1], "INT64"); p.set_data_from_numpy(np.array([[t]], np.int64))
    out = client.infer("tq_decode", [x, p], sequence_id=42, sequence_start=t == 0,
                       sequence_end=t == len(hidden_states) - 1).as_numpy("out")
```

## Versions

- ONNX Runtime: {ort_line}
  (the library asks ONNX Runtime for that API version when tritonserver registers it through
  `model_operations {{ op_library_filename }}`). Check the version in the server image with
  `ls /opt/tritonserver/backends/onnxruntime/libonnxruntime.so.*`; tritonserver's release notes list the
  ONNX Runtime of each release. The model is ONNX IR 10, opset 18 + domain `turboquant` v1.
- KIND_GPU needs a library built with nvcc (it then has CUDA kernels for the CUDA execution
  provider), for the server's CUDA and GPU.
- tritonserver: the configs use the sequence batcher's `oldest` strategy and implicit `state` with
  `initial_state`. {checked}
- The library path in `onnxruntime/tq_decode/config.pbtxt` is `{repo.op_library}`, i.e. where the
  server sees this folder (`--server-path` when writing it). The server must be able to load it:
  same CPU architecture and a glibc at least as new as the one it was built on.

## Start the server (onnxruntime backend)

```bash
tritonserver --model-repository={server_root}/onnxruntime
# in the NGC container, with this folder mounted where the config expects it:
docker run --rm -p8000:8000 -p8001:8001 -p8002:8002 -v "$PWD":{server_root} \\
  nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository={server_root}/onnxruntime
```

## TensorRT backend (written, not run by tq-deploy)

Build the engine from the serving model with full TensorRT and the plugin library (codes become
int8 in the engine; the config says so):

```bash
tq-deploy engine --onnx onnxruntime/tq_decode/1/model.onnx --out build/ --backend tensorrt \\
  --dim batch=1,{max(1, max_batch // 4)},{max_batch}
mv build/model.engine tensorrt/tq_decode/1/model.plan
# or: trtexec --onnx=... --dynamicPlugins=lib/libtq_deploy_trt.so (after retyping uint8 codes to int8)
```

The TensorRT backend finds plugins in the TensorRT plugin registry, so the plugin library must be
loaded into the server process before the engine is deserialized, either way:

```bash
LD_PRELOAD={trt_lib} tritonserver --model-repository={server_root}/tensorrt
tritonserver --model-repository={server_root}/tensorrt --backend-config=tensorrt,plugins="{trt_lib}"
```

**Caveat:** both ways only load the library (`dlopen`); the backend expects it to register its
plugin creators while loading (as `REGISTER_TENSORRT_PLUGIN` does). libtq_deploy_trt.so does not:
it exports `getCreators` for `IPluginRegistry::loadLibrary` (`trtexec --dynamicPlugins`) and never
calls the registry itself. Until the plugin library registers its creators at load time for full
TensorRT, the engine will fail to deserialize in this backend ("plugin creator not found"). The
engine must also be built with the TensorRT version of the server image.
"""
