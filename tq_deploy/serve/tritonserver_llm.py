"""The exported LLM as a decoupled model in tritonserver's Python backend (``tq_llm``), with its engine.

tritonserver loads ``<repository>/tq_llm/1/model.py``, which imports this class into the backend's
stub process. ``initialize`` builds everything the server has: the ONNX Runtime session with the
paged pool resident (:class:`~tq_deploy.runtime.llm_session.LLMSession`, sized from --kv-memory),
the engine loop of continuous batching over it (:class:`~tq_deploy.serve.engine.Engine`, on its
own thread), the tokenizer, and the HTTP front end (OpenAI-compatible and Triton's generate
protocol, :mod:`tq_deploy.serve.http_app`, on another thread). Both front ends submit to the one
engine, so requests from gRPC and from HTTP share every step and the one pool.

A gRPC request (``ModelInfer`` or ``ModelStreamInfer``) carries ``text_input`` (UTF-8 bytes as
UINT8 [n]) or ``input_ids`` (INT64 [n]), and optionally ``max_tokens`` (INT32), ``temperature`` /
``top_p`` (FP32), ``seed`` (INT64), ``stop`` (UINT8: UTF-8 stop strings separated by NUL bytes)
and ``stream`` (BOOL). Text is UTF-8 in UINT8 tensors because the bundled Python-backend stub
garbles TYPE_STRING tensors under numpy 2 (server.llm_model_config). With ``stream`` true every
piece of text is its own response (``text_output``, ``token_ids``), the last one carrying
``finish_reason``; otherwise one response holds the whole continuation. Each response also
carries ``id``, the server's id of the request. ``execute`` only queues: the engine thread sends
the responses. A request whose client cancelled it (a closed stream) is ended at its next token.
"""

from __future__ import annotations

import json

import numpy as np

from tq_deploy.serve.tritonserver_model import input_array, output_tensor


def _text_input(pb_utils, request, name: str) -> str | None:
    array = input_array(pb_utils, request, name)
    if array is None:
        return None
    try:
        return array.reshape(-1).astype(np.uint8).tobytes().decode("utf-8")
    except UnicodeDecodeError as err:
        from tq_deploy.serve.engine import ClientError

        raise ClientError(f"{name} is not UTF-8 ({err.reason} at byte {err.start}), expected UTF-8 text") from None


def _scalar(pb_utils, request, name: str):
    array = input_array(pb_utils, request, name)
    if array is None:
        return None
    if array.size != 1:
        from tq_deploy.serve.engine import ClientError

        raise ClientError(f"{name} has {array.size} values, expected 1")
    value = array.reshape(-1)[0]
    return bool(value) if array.dtype == np.bool_ else value.item()


def _text_tensor(pb_utils, name: str, text: str):
    return output_tensor(pb_utils, name, np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy())


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        from tq_deploy.runtime.generate import eos_token_ids, load_tokenizer, tokenizer_source
        from tq_deploy.runtime.llm_session import LLMSession
        from tq_deploy.serve.engine import Engine, pool_size
        from tq_deploy.serve.http_app import FrontEnd, create_app

        self.pb_utils = pb_utils
        config = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.params = p
        pool = pool_size(p["model"], float(p["kv_memory_gib"]))
        session = LLMSession(p["model"], provider=p.get("provider", "cpu"), num_blocks=pool.num_blocks,
                             library=p.get("library") or None, device_id=int(p.get("device_id", 0)),
                             threads=int(p["threads"]) if p.get("threads") else None)
        self.tokenizer = load_tokenizer(tokenizer_source(session.config))
        self.engine = Engine(session, eos_token_ids(session.config, self.tokenizer),
                             chunk_size=int(p["chunk_size"]), step_tokens=int(p["step_tokens"]),
                             max_sequences=int(p["max_sequences"]), wait_timeout_s=float(p["wait_timeout_s"]),
                             max_context=session.config.get("max_position_embeddings"))
        self.max_tokens_limit = self.engine.limit()[0]
        self.drain_s = float(p.get("drain_s", "30"))
        self.front = None
        if p.get("http_port"):
            app = create_app(self.engine, self.tokenizer, p["served_name"], self.max_tokens_limit)
            self.front = FrontEnd(app, p["http_host"], int(p["http_port"]))
            self.front.start()

    def _read(self, request) -> dict:
        pb = self.pb_utils
        text = _text_input(pb, request, "text_input")
        ids = input_array(pb, request, "input_ids")
        if (text is None) == (ids is None):
            from tq_deploy.serve.engine import ClientError

            raise ClientError("expected exactly one of text_input (UTF-8 as UINT8) and input_ids (INT64)")
        fields = {"prompt": text if text is not None else [int(t) for t in ids.reshape(-1)]}
        for name in ("max_tokens", "temperature", "top_p", "seed", "stream"):
            fields[name] = _scalar(pb, request, name)
        if fields["stream"] is None:
            fields["stream"] = False
        stop = _text_input(pb, request, "stop")
        fields["stop"] = None if stop is None else [s for s in stop.split("\0") if s]
        return fields

    def execute(self, requests):
        from tq_deploy.serve.engine import ClientError, Unavailable
        from tq_deploy.serve.textgen import read_request

        pb = self.pb_utils
        for request in requests:
            sender = request.get_response_sender()
            try:
                fields = self._read(request)
                req = read_request(fields, lambda t: self.tokenizer(t).input_ids, self.max_tokens_limit)
                sink = _TritonSink(self, sender, req)
                sink.handle = self.engine.submit(req.prompt_ids, req.max_tokens, req.sampling, sink.text_sink)
            except (ClientError, Unavailable, ValueError) as err:
                code = pb.TritonError.UNAVAILABLE if isinstance(err, Unavailable) else pb.TritonError.INVALID_ARG
                sender.send(pb.InferenceResponse(error=pb.TritonError(str(err), code)),
                            flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def finalize(self):
        # tritonserver calls this once its own in-flight requests ended or its exit timeout passed:
        # what is left (HTTP streams) gets the drain time, then a clear error
        if self.engine is not None:
            self.engine.close(self.drain_s)
        if self.front is not None:
            self.front.stop()
        self.engine = self.front = None


class _TritonSink:
    """Responses of one request, sent from the engine thread."""

    def __init__(self, model: TritonPythonModel, sender, req):
        from tq_deploy.serve.textgen import TextSink

        self.model, self.sender, self.req = model, sender, req
        self.handle = None
        self.pieces: list[str] = []
        self.ids: list[int] = []
        self.text_sink = TextSink(model.tokenizer, req.stop, self.emit, self.done)
        self.text_sink.token = self._token

    def _token(self, token_id: int) -> bool:
        if self.sender.is_cancelled():
            self.model.engine.cancel(self.handle.id)
            return False
        from tq_deploy.serve.textgen import TextSink

        return TextSink.token(self.text_sink, token_id)

    def _response(self, text: str, ids: list[int], reason: str):
        pb = self.model.pb_utils
        return pb.InferenceResponse(output_tensors=[
            _text_tensor(pb, "text_output", text),
            output_tensor(pb, "token_ids", np.asarray(ids, dtype=np.int64)),
            _text_tensor(pb, "finish_reason", reason),
            _text_tensor(pb, "id", self.handle.id if self.handle else ""),
        ])

    def emit(self, text: str, ids: list[int]) -> None:
        if not self.req.stream:
            self.pieces.append(text)
            self.ids.extend(ids)
        elif (text or ids) and not self.sender.is_cancelled():
            self.sender.send(self._response(text, ids, ""))

    def done(self, reason: str, error) -> None:
        pb = self.model.pb_utils
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            if reason == "cancelled":
                self.sender.send(flags=final)
            elif reason == "error":
                from tq_deploy.serve.engine import ClientError

                code = pb.TritonError.INVALID_ARG if isinstance(error, ClientError) else pb.TritonError.UNAVAILABLE
                self.sender.send(pb.InferenceResponse(error=pb.TritonError(str(error), code)), flags=final)
            else:
                reason = {"eos": "stop"}.get(reason, reason)
                if self.req.stream:
                    self.sender.send(self._response("", [], reason), flags=final)
                else:
                    self.sender.send(self._response("".join(self.pieces), self.ids, reason), flags=final)
        except Exception:  # noqa: BLE001 - the client is gone: nothing to tell it
            pass
