"""The LLM server's HTTP front end (FastAPI): OpenAI-compatible completions and Triton's generate protocol.

    POST /v1/completions                 OpenAI completions (prompt: text or token ids), "stream": true for SSE
    POST /v1/chat/completions            OpenAI chat; the prompt is the model's chat template over "messages"
    GET  /v1/models                      the one model
    POST /v2/models/<name>/generate      Triton's generate extension: text_input -> text_output (one answer)
    POST /v2/models/<name>/generate_stream   the same as server-sent events, one per piece of text
    GET  /health, /v2/health/ready       200 once the engine runs
    GET  /stats                          counts of the engine (running, waiting, free blocks, peaks)

Every body is read with a size limit and its nesting depth is checked before any JSON parser sees
it (tritonserver's own HTTP parser crashes on deep nesting; it is not exposed). A client error is
a 4xx with one line; a full or stopping server is a 503. A stream that its client leaves is
cancelled at once and its blocks go back to the pool.
"""


import asyncio
import json
import time

from tq_deploy.serve.engine import ClientError, Unavailable
from tq_deploy.serve.textgen import TextSink, read_request

MAX_BODY_BYTES = 4 << 20
MAX_DEPTH = 8


def parse_json(body: bytes, max_depth: int = MAX_DEPTH):
    """The JSON object of ``body``; deeper nesting than ``max_depth`` is refused before parsing."""
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > max_depth:
                raise ClientError(f"request body nests deeper than {max_depth} levels, expected a flat JSON object")
        elif byte in (0x5D, 0x7D):
            depth -= 1
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise ClientError(f"request body is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ClientError(f"request body is a JSON {type(value).__name__}, expected an object")
    return value


UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "logit_bias": (None, {}), "tools": (None, []), "response_format": (None, {"type": "text"})}


class TooLarge(ClientError):
    pass


def create_app(engine, tokenizer, model_name: str, max_tokens_limit: int, chat_template: bool = True):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="tq-deploy LLM server", docs_url=None, redoc_url=None, openapi_url=None)
    triton_name = model_name

    def openai_error(status: int, message: str):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    def triton_error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    async def body_of(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            raise TooLarge(f"request body of {length} bytes, expected at most {MAX_BODY_BYTES}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise TooLarge(f"request body over {MAX_BODY_BYTES} bytes, expected at most {MAX_BODY_BYTES}")
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    def tokenize(text: str) -> list[int]:
        return tokenizer(text).input_ids

    def start(req, loop: asyncio.AbstractEventLoop):
        """Submit ``req``; the queue of ('piece', text, ids) and ('done', reason, error) items and the handle."""
        queue: asyncio.Queue = asyncio.Queue()

        def emit(text, ids):
            loop.call_soon_threadsafe(queue.put_nowait, ("piece", text, ids))

        def done(reason, error):
            loop.call_soon_threadsafe(queue.put_nowait, ("done", reason, error))

        handle = engine.submit(req.prompt_ids, req.max_tokens, req.sampling, TextSink(tokenizer, req.stop, emit, done))
        return queue, handle

    def status_of(error) -> int:
        return 400 if isinstance(error, ClientError) else 503 if isinstance(error, Unavailable) else 500

    async def collect(queue, request, handle):
        """The whole answer; a client that hangs up meanwhile cancels its request (checked every 0.1 s)."""
        text, ids = [], []
        checked = time.monotonic()
        while True:
            if time.monotonic() - checked > 0.1:
                checked = time.monotonic()
                if await request.is_disconnected():
                    engine.cancel(handle.id)
            try:
                kind, a, b = await asyncio.wait_for(queue.get(), 0.5)
            except asyncio.TimeoutError:
                continue
            if kind == "piece":
                text.append(a)
                ids.extend(b)
            else:
                return "".join(text), ids, a, b

    def finish_reason(reason: str) -> str:
        return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)

    async def run(request: Request, fields_of, respond, chunk_of, error_of, stream_default=False):
        """The common path of every generating endpoint."""
        try:
            fields = fields_of(await body_of(request))
            req = read_request(fields, tokenize, max_tokens_limit, default_max_tokens=16)
            if "stream" not in fields:
                req.stream = stream_default
            queue, handle = start(req, asyncio.get_running_loop())
        except (ClientError, Unavailable) as err:
            return error_of(413 if isinstance(err, TooLarge) else status_of(err), str(err))
        created = int(time.time())
        if not req.stream:
            try:
                text, ids, reason, error = await collect(queue, request, handle)
            except asyncio.CancelledError:
                engine.cancel(handle.id)
                raise
            if reason == "error":
                return error_of(status_of(error), str(error))
            return JSONResponse(respond(handle.id, created, text, ids, finish_reason(reason), len(req.prompt_ids)))

        async def events():
            try:
                while True:
                    kind, a, b = await queue.get()
                    if kind == "piece":
                        if a or b:
                            yield f"data: {json.dumps(chunk_of(handle.id, created, a, b, None))}\n\n"
                        continue
                    if a == "error":
                        yield f"data: {json.dumps({'error': {'message': str(b), 'code': status_of(b)}})}\n\n"
                    else:
                        yield f"data: {json.dumps(chunk_of(handle.id, created, '', [], finish_reason(a)))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
            finally:
                engine.cancel(handle.id)  # the client left (or we are done: then a no-op)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.exception_handler(Exception)
    async def unexpected(request, err):  # one line, no traceback to the client
        return openai_error(500, f"internal error: {type(err).__name__}")

    @app.get("/health")
    @app.get("/v2/health/ready")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return engine.snapshot()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "tq-deploy"}]}

    def check_model(fields: dict) -> dict:
        name = fields.get("model")
        if name is not None and name != model_name:
            raise ClientError(f"model={name!r:.60}, expected {model_name!r}")
        n = fields.get("n", 1)
        if n != 1:
            raise ClientError(f"n={n!r:.20}, expected 1")
        # options this server does not implement are refused rather than silently ignored
        for name, neutral in UNSUPPORTED.items():
            if fields.get(name) not in neutral:
                raise ClientError(f"{name}={fields[name]!r:.40} is not supported here, expected it left out")
        fields = dict(fields)
        if fields.get("temperature") is None:
            fields["temperature"] = 1.0  # the OpenAI API's default
        if fields.get("max_completion_tokens") is not None and fields.get("max_tokens") is None:
            fields["max_tokens"] = fields["max_completion_tokens"]
        return fields

    def completion_fields(fields):
        fields = check_model(fields)
        prompt = fields.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            fields["prompt"] = prompt[0]  # a batch of one
        return fields

    def chat_fields(fields):
        fields = check_model(fields)
        messages = fields.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ClientError(f"messages={str(messages)[:60]!r}, expected a non-empty list of "
                              "{\"role\": ..., \"content\": \"...\"} objects")
        if not chat_template or not getattr(tokenizer, "chat_template", None):
            raise ClientError("this model's tokenizer has no chat template: use /v1/completions")
        try:
            ids = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                                add_generation_prompt=True, tokenize=True)
        except Exception as err:  # noqa: BLE001 - the template's own complaint (roles out of order ...)
            raise ClientError(f"messages do not fit the model's chat template: {err}") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        fields["prompt"] = [int(t) for t in ids]
        return fields

    def usage(prompt_tokens, ids):
        return {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                "total_tokens": prompt_tokens + len(ids)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        def respond(rid, created, text, ids, reason, prompt_tokens):
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None,
                                 "token_ids": ids}],
                    "usage": usage(prompt_tokens, ids)}

        def chunk(rid, created, text, ids, reason):
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None,
                                 "token_ids": ids}]}

        return await run(request, completion_fields, respond, chunk, openai_error)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        def respond(rid, created, text, ids, reason, prompt_tokens):
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": reason, "token_ids": ids}],
                    "usage": usage(prompt_tokens, ids)}

        def chunk(rid, created, text, ids, reason):
            delta = {"content": text} if text or reason is None else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "token_ids": ids}]}

        return await run(request, chat_fields, respond, chunk, openai_error)

    def generate_fields(fields):
        fields = dict(fields)
        text, ids = fields.pop("text_input", None), fields.pop("input_ids", None)
        if (text is None) == (ids is None):
            raise ClientError("expected exactly one of text_input (a string) and input_ids (a list of token ids)")
        # each name takes its own type: text in input_ids would otherwise be tokenized as a prompt
        if text is not None and not isinstance(text, str):
            raise ClientError(f"text_input={text!r:.60}, expected a string")
        if ids is not None and not isinstance(ids, list):
            raise ClientError(f"input_ids={ids!r:.60}, expected a non-empty list of token ids")
        fields["prompt"] = text if text is not None else ids
        if isinstance(fields.get("parameters"), dict):  # Triton's generate clients nest the options
            for key, value in fields.pop("parameters").items():
                fields.setdefault(key, value)
        return fields

    def generate_body(rid, created, text, ids, reason, prompt_tokens=None):
        return {"model_name": triton_name, "model_version": "1", "id": rid, "text_output": text,
                "token_ids": ids, "finish_reason": reason}

    @app.post(f"/v2/models/{triton_name}/generate")
    async def generate(request: Request):
        return await run(request, generate_fields, generate_body, generate_body, triton_error)

    @app.post(f"/v2/models/{triton_name}/generate_stream")
    async def generate_stream(request: Request):
        return await run(request, generate_fields, generate_body, generate_body, triton_error, stream_default=True)

    return app


class FrontEnd:
    """``create_app`` served by uvicorn on a thread of this process."""

    def __init__(self, app, host: str, port: int):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5, limit_concurrency=2048, lifespan="off")
        self.server = uvicorn.Server(config)
        self.error: BaseException | None = None
        import threading

        self.thread = threading.Thread(target=self._run, name="tq-http", daemon=True)

    def _run(self):
        try:
            self.server.run()
        except BaseException as err:  # noqa: BLE001 - reported by start()
            self.error = err

    def start(self, timeout_s: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP front end did not start on {self.server.config.host}:"
                                   f"{self.server.config.port} ({self.error or 'port in use?'})")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
