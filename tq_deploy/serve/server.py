"""Run the stateful decode model in the Triton Inference Server bundled with nvidia-pytriton.

    with Tritonserver(ServeOptions(model="model.onnx", http_port=8000)) as server:
        ...                                  # tritonclient against server.http_url / server.grpc_url

The ``nvidia-pytriton`` wheel ships a ``tritonserver`` binary (tritonserver 2.51) with its Python
backend and one backend stub per CPython version. Only those files are used, not pytriton's
Python API: that API has no sequence batcher, drops the requests' sequence ids, answers one bad
request by failing its whole batch, and returns empty tensors under numpy 2. Instead the server
gets a model repository with one Python-backend model (``tq_decode``, :mod:`tq_deploy.serve.tritonserver_model`)
configured for tritonserver's sequence batcher.

The stub embeds the CPython it was built for and must load *this* interpreter's libpython (a
libpython of another patch release crashes at import), and it must see this environment's
packages: the process gets LD_LIBRARY_PATH with this Python's LIBDIR and PATH starting with this
environment's bin/, and the model's entry file puts this tq_deploy first on sys.path.
"""

from __future__ import annotations

import ctypes
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from tq_deploy import files
from tq_deploy.serve.pbtxt import Enum, parse, to_pbtxt

MODEL_NAME = "tq_decode"
PYTRITON = "nvidia-pytriton"
INSTALL_HINT = (f"install the server with `pip install --no-deps {PYTRITON}==0.7.0` and the client with "
                "`pip install 'tritonclient[http,grpc]'` (or scripts/setup.sh serve); --no-deps because "
                f"{PYTRITON} pins numpy<2 for its own Python API, which tq-deploy does not use")


class ServeUnavailableError(RuntimeError):
    """The bundled tritonserver server cannot be used here (the message says why and what to install)."""


@dataclass(frozen=True)
class BundledTritonserver:
    binary: Path
    backend: Path  # backends/python: libtriton_python.so, triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this CPython
    libs: Path  # the wheel's vendored shared libraries


def bundled_tritonserver() -> BundledTritonserver:
    """The tritonserver files of the installed nvidia-pytriton wheel (ServeUnavailableError if absent)."""
    try:
        dist = metadata.distribution(PYTRITON)
    except metadata.PackageNotFoundError:
        raise ServeUnavailableError(f"{PYTRITON} is not installed: {INSTALL_HINT}") from None
    root = Path(dist.locate_file("pytriton")) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = BundledTritonserver(root / "bin" / "tritonserver", root / "backends" / "python",
                          root / "python_backend_stubs" / version / "triton_python_backend_stub",
                          Path(dist.locate_file("nvidia_pytriton.libs")))
    if not found.binary.is_file():
        raise ServeUnavailableError(f"{PYTRITON} {dist.version} has no {found.binary}: {INSTALL_HINT}")
    if not found.stub.is_file():
        have = sorted(p.name for p in (root / "python_backend_stubs").iterdir()) if (root / "python_backend_stubs").is_dir() else []
        raise ServeUnavailableError(f"{PYTRITON} {dist.version} has no Python-backend stub for Python {version} "
                                    f"(it has {have}): run tq-deploy under one of those")
    return found


def libpython_dir() -> Path:
    """The folder holding this interpreter's shared libpython (ServeUnavailableError if it has none)."""
    name = sysconfig.get_config_var("INSTSONAME") or f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    for folder in (sysconfig.get_config_var("LIBDIR"), Path(sys.base_prefix) / "lib"):
        if folder and (Path(folder) / name).is_file():
            return Path(folder)
    raise ServeUnavailableError(
        f"this Python ({sys.version.split()[0]}, {sys.base_prefix}) has no shared {name}, which tritonserver's Python "
        "backend stub loads; use a Python built with --enable-shared (Debian's python3 with libpython3.X, or "
        "pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared)")


@dataclass
class ServeOptions:
    model: str  # path of the exported decode model (.onnx)
    num_blocks: int = 1024
    provider: str = "cpu"
    device_id: int = 0
    library: str | None = None  # custom-op library (default: the built one)
    threads: int | None = None  # ONNX Runtime intra-op threads (None: its default)
    max_batch: int = 32  # sequences per decode step
    queue_delay_us: int = 500  # how long the batcher waits to fill a step
    max_sequences: int = 256  # sequences the batcher serves at once; more wait for a free place
    max_tokens: int | None = None  # per-sequence limit (None: the pool's size)
    idle_seconds: float = 300.0  # a sequence without a request for this long is ended and its blocks freed
    host: str = "127.0.0.1"  # another address is an explicit choice (docs/serving.md: what it exposes)
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    exit_timeout_s: int = 5
    start_timeout_s: float = 180.0
    log_path: str | None = None  # server log (default: in the run folder)
    # the LLM server (an export of kind "llm"); the decode-step server ignores these
    kv_memory_gib: float = 1.0  # the TurboQuant pool's size
    chunk_size: int = 256  # prompt tokens of one sequence per step
    step_tokens: int = 512  # tokens of one step, decodes and prompt chunks together
    wait_timeout_s: float = 60.0  # a request waiting this long for cache space gets an error
    drain_s: float = 30.0  # on shutdown, how long running requests may still finish

    def check(self) -> None:
        if self.provider not in ("cpu", "cuda"):
            raise ValueError(f"provider={self.provider!r}, expected 'cpu' or 'cuda'")
        for name in ("num_blocks", "max_batch", "max_sequences", "exit_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}, expected an int >= 1")
        if self.max_sequences < self.max_batch:
            raise ValueError(f"max_sequences={self.max_sequences}, expected >= max_batch={self.max_batch}")
        for name in ("http_port", "grpc_port", "metrics_port"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 < value < 65536:
                raise ValueError(f"{name}={value!r}, expected a TCP port 1..65535")
        ports = [self.http_port, self.grpc_port, self.metrics_port]
        if len(set(ports)) != 3:
            raise ValueError(f"http/grpc/metrics ports {ports}, expected three different ports")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads}, expected >= 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}, expected >= 1")
        if not self.idle_seconds > 0:
            raise ValueError(f"idle_seconds={self.idle_seconds}, expected > 0")
        if self.queue_delay_us < 0:
            raise ValueError(f"queue_delay_us={self.queue_delay_us}, expected >= 0")
        for name, low, high in (("kv_memory_gib", 1e-6, 1e4), ("wait_timeout_s", 1e-3, 1e6), ("drain_s", 0, 1e5)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name}={value!r}, expected a number in {low:g}..{high:g}")
        for name in ("chunk_size", "step_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
                raise ValueError(f"{name}={value!r}, expected an int in 1..{1 << 20}")
        if self.step_tokens < self.chunk_size:
            raise ValueError(f"step_tokens={self.step_tokens}, expected >= chunk_size={self.chunk_size}")


def model_config(options: ServeOptions, model_config_values: dict, library: str) -> dict:
    """The served model's configuration (a dict for :func:`tq_deploy.serve.pbtxt.to_pbtxt`)."""
    hidden = int(model_config_values["hidden_size"])
    params = {
        "model": str(Path(options.model).resolve()), "library": library, "provider": options.provider,
        "device_id": str(options.device_id), "num_blocks": str(options.num_blocks),
        "threads": "" if options.threads is None else str(options.threads),
        "max_tokens": "" if options.max_tokens is None else str(options.max_tokens),
        "idle_seconds": repr(float(options.idle_seconds)),
    }
    return {
        "name": MODEL_NAME,
        "backend": "python",
        "max_batch_size": options.max_batch,
        "input": [
            {"name": "hidden", "data_type": Enum("TYPE_FP32"), "dims": [hidden]},
            {"name": "positions", "data_type": Enum("TYPE_INT64"), "dims": [1]},
        ],
        "output": [{"name": "out", "data_type": Enum("TYPE_FP32"), "dims": [hidden]}],
        "sequence_batching": {
            # tritonserver forgets an idle sequence a little after the pool frees it, so a late request
            # meets a clear "not active" from the model rather than a stale cache.
            "max_sequence_idle_microseconds": int(options.idle_seconds * 1e6) + 1_000_000,
            "control_input": [
                {"name": "START", "control": [{"kind": Enum("CONTROL_SEQUENCE_START"), "int32_false_true": [0, 1]}]},
                {"name": "END", "control": [{"kind": Enum("CONTROL_SEQUENCE_END"), "int32_false_true": [0, 1]}]},
                {"name": "CORRID", "control": [{"kind": Enum("CONTROL_SEQUENCE_CORRID"),
                                                "data_type": Enum("TYPE_UINT64")}]},
            ],
            "oldest": {
                "max_candidate_sequences": options.max_sequences,
                "preferred_batch_size": [options.max_batch],
                "max_queue_delay_microseconds": options.queue_delay_us,
            },
        },
        # One instance owns the one pool; the sequence batcher keeps each sequence on it.
        "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}],
        "parameters": [{"key": k, "value": {"string_value": v}} for k, v in params.items()],
    }


LLM_MODEL_NAME = "tq_llm"
# tritonserver's admin APIs: only a request carrying ADMIN_HEADER with the server's random key (never
# printed or stored) reaches them, so for every client they are off.
RESTRICTED = "shared-memory,model-config,model-repository,trace,logging"
ADMIN_HEADER = "tq-admin-key"


def llm_model_config(options: ServeOptions, library: str) -> dict:
    """The LLM's model configuration: a decoupled Python-backend model (tritonserver_llm.py) whose
    requests are all optional tensors but one prompt (text_input or input_ids). Text travels as
    UTF-8 in UINT8 tensors: the bundled stub garbles TYPE_STRING tensors under numpy 2 (and a
    garbled length kills it), numeric tensors cross intact through DLPack."""
    params = {
        "model": str(Path(options.model).resolve()), "library": library, "provider": options.provider,
        "device_id": str(options.device_id), "threads": "" if options.threads is None else str(options.threads),
        "kv_memory_gib": repr(float(options.kv_memory_gib)), "chunk_size": str(options.chunk_size),
        "step_tokens": str(options.step_tokens), "max_sequences": str(options.max_sequences),
        "wait_timeout_s": repr(float(options.wait_timeout_s)), "drain_s": repr(float(options.drain_s)),
        "http_host": options.host, "http_port": str(options.http_port), "served_name": LLM_MODEL_NAME,
    }

    def tensor(name, kind, dims):
        return {"name": name, "data_type": Enum(kind), "dims": dims}

    inputs = [tensor("text_input", "TYPE_UINT8", [-1]), tensor("input_ids", "TYPE_INT64", [-1]),
              tensor("max_tokens", "TYPE_INT32", [1]), tensor("temperature", "TYPE_FP32", [1]),
              tensor("top_p", "TYPE_FP32", [1]), tensor("seed", "TYPE_INT64", [1]),
              tensor("stop", "TYPE_UINT8", [-1]), tensor("stream", "TYPE_BOOL", [1])]
    for item in inputs:
        item["optional"] = True
    return {
        "name": LLM_MODEL_NAME,
        "backend": "python",
        "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        "input": inputs,
        "output": [tensor("text_output", "TYPE_UINT8", [-1]), tensor("token_ids", "TYPE_INT64", [-1]),
                   tensor("finish_reason", "TYPE_UINT8", [-1]), tensor("id", "TYPE_UINT8", [-1])],
        # one instance owns the engine and its pool; execute only queues, the engine thread answers
        "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}],
        "parameters": [{"key": k, "value": {"string_value": v}} for k, v in params.items()],
    }


MODEL_PY = '''"""tritonserver Python-backend entry point written by tq-deploy serve: the model is tq_deploy.serve.tritonserver_model."""
import sys

# The stub's interpreter ignores PYTHONPATH: import the tq_deploy that started this server.
sys.path.insert(0, {package_parent!r})
from {module} import TritonPythonModel  # noqa: E402,F401
'''


class ServerStartError(RuntimeError):
    """tritonserver exited or did not become ready (the message has the end of its log)."""


class Tritonserver:
    """A tritonserver process serving :data:`MODEL_NAME` (module docstring). ``start`` returns once
    the model is ready; ``stop`` shuts it down (SIGINT, then SIGKILL after the exit timeout)."""

    def __init__(self, options: ServeOptions):
        options.check()
        self.options = options
        self.process: subprocess.Popen | None = None
        self.folder: Path | None = None
        self.log_path: Path | None = None
        self.config_text = ""
        self.model_config_values: dict = {}
        self.kind: str | None = None

    def pool_bytes(self) -> int:
        """Bytes of the server's cache pool (codes and norms of keys and values)."""
        from tq_deploy.runtime.decode_session import cache_shapes

        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                   for shape, dtype in cache_shapes(self.model_config_values, self.options.num_blocks).values())

    @property
    def llm(self) -> bool:
        """Whether the model is an exported LLM (served as tq_llm) rather than the decode step."""
        return self.kind == "llm"

    @property
    def model_name(self) -> str:
        return LLM_MODEL_NAME if self.llm else MODEL_NAME

    @property
    def connect_host(self) -> str:
        host = self.options.host
        return "127.0.0.1" if host in ("0.0.0.0", "::", "") else f"[{host}]" if ":" in host else host

    @property
    def http_url(self) -> str:
        return f"{self.connect_host}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.connect_host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.connect_host}:{self.options.metrics_port}/metrics"

    @property
    def openai_base_url(self) -> str:
        return f"http://{self.http_url}/v1"

    def _check_pool_memory(self, exported) -> None:
        """The cache pool against this machine's available memory, before tritonserver allocates it
        (there a size too large is a MemoryError deep in the model's log)."""
        from tq_deploy.cli_checks import check_memory

        if self.llm:
            from tq_deploy.serve.engine import pool_size

            size = pool_size(exported.proto, self.options.kv_memory_gib)
            check_memory(f"--kv-memory {self.options.kv_memory_gib:g}", size.num_blocks * size.block_bytes)
        else:
            check_memory(f"--num-blocks {self.options.num_blocks}", self.pool_bytes())

    def _prepare(self) -> list[str]:
        from tq_deploy.export.loaded import ExportedModel
        from tq_deploy.runtime.session import custom_op_library

        installed = bundled_tritonserver()
        pythonlib = libpython_dir()
        model_path = Path(self.options.model)
        if not model_path.is_file():
            raise ValueError(f"model={str(model_path)!r} does not exist, expected an .onnx exported by tq-deploy export")
        exported = ExportedModel.load(model_path)
        self.kind, values = exported.kind, exported.metadata
        if self.kind not in ("model", "llm"):
            raise ValueError(f"model={str(model_path)!r} is a {self.kind!r} export, expected an LLM "
                             "(tq-deploy export --model) or a decode model (tq-deploy export without --op)")
        self.model_config_values = values
        self._check_pool_memory(exported)
        library = str(custom_op_library(self.options.library).resolve())
        self.folder = Path(tempfile.mkdtemp(prefix="tq-deploy-serve-"))
        backend = self.folder / "backends" / "python"
        backend.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(installed.backend / name, backend / name)
        # The backend runs the stub found next to libtriton_python.so, for the Python it was built for.
        shutil.copy2(installed.stub, backend / "triton_python_backend_stub")
        if self.llm:
            config, module = llm_model_config(self.options, library), "tq_deploy.serve.tritonserver_llm"
        else:
            config, module = model_config(self.options, values, library), "tq_deploy.serve.tritonserver_model"
        self.config_text = to_pbtxt(config)
        parse(self.config_text)  # tritonserver's own schema, when tritonclient is installed
        model_dir = self.folder / "models" / self.model_name
        (model_dir / "1").mkdir(parents=True)
        files.write_text(model_dir / "config.pbtxt", self.config_text)
        import tq_deploy

        package_parent = str(Path(tq_deploy.__file__).resolve().parent.parent)
        files.write_text(model_dir / "1" / "model.py", MODEL_PY.format(package_parent=package_parent, module=module))
        self.log_path = Path(self.options.log_path) if self.options.log_path else self.folder / "tritonserver.log"
        self._env = self._environment(installed, pythonlib)
        o = self.options
        admin = f"{RESTRICTED}:{ADMIN_HEADER}={secrets.token_hex(32)}"
        args = [str(installed.binary), f"--model-repository={self.folder / 'models'}",
                f"--backend-directory={self.folder / 'backends'}",
                f"--grpc-address={o.host}", f"--grpc-port={o.grpc_port}", f"--grpc-restricted-protocol={admin}",
                f"--metrics-address={o.host}", f"--metrics-port={o.metrics_port}",
                "--allow-gpu-metrics=false", f"--exit-timeout-secs={self.exit_timeout_s}",
                "--disable-auto-complete-config", "--log-verbose=0", "--model-control-mode=none"]
        if self.llm:
            # the HTTP port is the engine's own front end (http_app.py): tritonserver's HTTP JSON parser,
            # which deep nesting crashes, is not exposed at all
            args.append("--allow-http=false")
        else:
            args += [f"--http-address={o.host}", f"--http-port={o.http_port}", f"--http-restricted-api={admin}"]
        if o.provider == "cpu":
            args.append("--pinned-memory-pool-byte-size=0")  # nothing to pin; spares a CUDA probe and its warnings
        return args

    @staticmethod
    def _environment(installed: BundledTritonserver, pythonlib: Path) -> dict:
        env = dict(os.environ)

        def prepend(key: str, *paths) -> None:
            parts = [str(p) for p in paths] + ([env[key]] if env.get(key) else [])
            env[key] = os.pathsep.join(parts)

        prepend("LD_LIBRARY_PATH", pythonlib, installed.libs)
        # The stub's embedded interpreter (run with -E: no PYTHONPATH) takes its prefix, hence
        # its site-packages, from the python found on PATH: this environment's.
        prepend("PATH", Path(sys.executable).parent)
        return env

    def start(self) -> "Tritonserver":
        args = self._prepare()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes it for its whole life
        try:
            self.process = subprocess.Popen(args, env=self._env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 15) -> str:
        """The server log's error lines (tritonserver prefixes them with E, the model's own tracebacks
        follow them) and its last lines; the startup table in between is noise for a reader."""
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        text = [line for line in self.log_path.read_text(errors="replace").splitlines()
                if not line.startswith(("+", "|")) and line.strip()]
        errors = [line for line in text if line.startswith("E") or "Error" in line or "error:" in line]
        tail = [line for line in text[-lines:] if line not in errors]
        return "\n".join(errors[-lines:] + tail)

    def _wait_ready(self) -> None:
        url = f"http://{self.http_url}/health" if self.llm else f"http://{self.http_url}/v2/models/{MODEL_NAME}/ready"
        deadline = time.monotonic() + self.options.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(f"tritonserver exited with status {self.process.returncode} before "
                                       f"{self.model_name} was ready; end of {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200 and (not self.llm or self._grpc_ready()):
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise ServerStartError(f"{self.model_name} was not ready after {self.options.start_timeout_s:.0f} s; "
                               f"end of {self.log_path}:\n{self.log_tail()}")

    @property
    def exit_timeout_s(self) -> int:
        """How long tritonserver waits for in-flight requests at shutdown (an LLM's: the drain time)."""
        # an LLM's model finalize (the engine's drain of its HTTP streams, then the front end's stop) runs
        # inside tritonserver's exit timeout: past it tritonserver exits with status 1 mid-finalize
        return max(self.options.exit_timeout_s, int(math.ceil(self.options.drain_s)) + 15) if self.llm \
            else self.options.exit_timeout_s

    def _grpc_ready(self) -> bool:
        """Whether tritonserver marked the LLM ready on gRPC (the HTTP front end starts a little earlier,
        inside the model's initialize)."""
        try:
            import tritonclient.grpc as grpcclient
        except ImportError:
            return True
        try:
            with grpcclient.InferenceServerClient(self.grpc_url) as client:
                return bool(client.is_model_ready(LLM_MODEL_NAME))
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """Shut the server down; its exit status (None if it was never started)."""
        process, self.process = self.process, None
        status = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    # tritonserver's exit timeout, then the model's finalize (an LLM drains its HTTP streams)
                    process.wait(timeout=self.exit_timeout_s + (self.options.drain_s if self.llm else 0) + 10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            status = process.returncode
        if self.folder is not None:  # the log stays when it was asked for: it lives elsewhere then
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        return status

    def __enter__(self) -> "Tritonserver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child before exec: receive SIGTERM when the parent dies, so that a killed
    ``tq-deploy serve`` leaves no orphaned server holding its ports."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

