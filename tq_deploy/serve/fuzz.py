"""A seeded fuzzer of the LLM server (``tq-deploy fuzz-server``): hostile and valid requests, in parallel.

    report = fuzz_server(FuzzOptions(url="http://127.0.0.1:8000", grpc="127.0.0.1:8001", seed=3, requests=500))
    print(report.to_text())                  # counts by kind and status; every failure with its seed and request

Request ``i`` of seed ``s`` is drawn from its own generator (``random.Random(f"{s}/{i}")``), so a
failure is replayed with ``--seed s --first i --requests 1``; only the ids of live streams that a
forging request copies differ between runs (the printed request shows them). Requests go out in
batches from ``concurrency`` client threads, beside a few long "victim" streams that run the whole
time. What is sent (``KINDS``): valid completions, chats and Triton generate calls (streamed or
not), malformed JSON, deep nesting (and brackets inside strings, which are fine), huge bodies and
declared lengths, huge, many and malformed headers, wrong types and out-of-range or non-integer
numbers in every field, forged or guessed request/sequence ids (live victims' ids, finished ones,
made-up ones) in fields, headers, query strings and paths, unknown paths and methods, raw garbage
on the socket, clients that leave mid-stream or mid-body, and over gRPC (tritonserver's stream):
the same kinds as tensors, cancelled streams, the unary call and the restricted admin APIs.

What must hold (each breach is a failure):

- the server keeps answering: after every batch a valid greedy request succeeds (over HTTP, and over
  gRPC when it is fuzzed), and no request goes unanswered for ``timeout_s``;
- a client error is a 4xx with one message (one line, no traceback); 5xx only as a 503 that says
  to retry later (pool wait timeout, queue full); a valid request is a 200 with a well-formed answer
  (a stream ends with ``[DONE]``, one server-issued ``cmpl-`` id per answer, never issued twice);
- nothing leaks between sequences: a greedy request for one of the canonical prompts returns
  exactly the tokens it returned alone at the start, whatever ids it carries and whatever runs
  beside it; no answer contains a victim's id (unless the request itself carried it) or the
  secret marker of a victim's prompt; victims are never ended by someone else (each finishes with
  ``length`` or ``stop``); and a refused request gets the same status and message when it is
  sent again on the idle server (an error that reported another sequence's length would differ);
- after the run the pool is empty (``/stats``: nothing running or waiting, every block free), and
  a server this fuzzer started exits with status 0 on SIGTERM.
"""

from __future__ import annotations

import http.client
import json
import queue
import random
import re
import secrets
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

MODEL = "tq_llm"
CANONICAL = ("The quick brown fox", "Once upon a time there was", "It is a truth universally acknowledged")
BASE_TOKENS = 8  # greedy tokens of each canonical prompt, measured alone at the start
ID_PATTERN = re.compile(r"cmpl-[0-9a-f]{32}")
MAX_MESSAGE = 600
BODY_LIMIT = 1 << 20  # bytes of an answer kept for the checks

HTTP_KINDS = ("valid", "valid-stream", "valid-sampled", "chat", "generate", "bad-json", "deep-nesting",
              "huge-body", "headers", "wrong-types", "forged-id", "paths", "raw", "disconnect")
PROTOCOL_KINDS = ("headers", "raw", "paths", "huge-body")
GRPC_KINDS = ("grpc-valid", "grpc-bad", "grpc-forged-id", "grpc-cancel", "grpc-admin")


@dataclass
class FuzzOptions:
    url: str = "http://127.0.0.1:8000"
    grpc: str | None = None  # host:port of tritonserver's gRPC; None: HTTP only
    seed: int = 0
    requests: int = 300
    first: int = 0
    concurrency: int = 8
    batch: int = 50
    victims: int = 2
    timeout_s: float = 60.0
    replay: int = 5000  # at most this many refused requests are sent again on the idle server
    huge: bool = True  # bodies of several MiB now and then
    kinds: tuple | None = None  # only these kinds (default all)
    cancel_refused: bool = False  # cancel gRPC streams that tritonserver refused (the known shutdown issue)


@dataclass
class Probe:
    index: int
    kind: str
    transport: str = "http"  # http | raw | grpc
    method: str = "POST"
    path: str = "/v1/completions"
    headers: list = field(default_factory=list)
    body: bytes = b""
    raw: bytes | None = None  # the exact bytes sent (raw transport, or an http request built by hand)
    expect: str = "4xx"  # ok | 4xx | either | none (no answer required) | closed-ok
    canonical: int | None = None  # index into CANONICAL: the answer must be its greedy tokens
    max_tokens: int | None = None
    stream: bool = False
    leave_after: int | None = None  # disconnect: lines of the answer read before leaving
    half_close: bool = False  # shut the sending side after the request (it may promise more than it sends)
    forge: str | None = None  # where a victim's id goes: filled in at send time
    grpc: dict | None = None

    def describe(self) -> str:
        if self.transport == "grpc":
            return f"gRPC {json.dumps(self.grpc, default=repr)[:600]}"
        data = self.raw if self.raw is not None else self.body
        head = f"{self.method} {self.path[:200]} " if self.raw is None else ""
        headers = "".join(f"{k[:60]}: {v[:120]!r}; " for k, v in self.headers[:8]) if self.raw is None else ""
        return f"{head}{headers}body {data[:400]!r}{'...' if len(data) > 400 else ''} ({len(data)} bytes)"


@dataclass
class Reply:
    status: int | None = None  # HTTP status; None: no answer (closed); gRPC: 200 ok, 400 error
    message: str = ""
    body: bytes = b""
    tokens: list | None = None
    ids: set = field(default_factory=set)
    finish: str | None = None
    error: str | None = None  # transport trouble (timeout ...)


@dataclass
class Failure:
    seed: int
    index: int
    kind: str
    what: str
    request: str

    def line(self) -> str:
        return f"FAIL seed={self.seed} request={self.index} kind={self.kind}: {self.what}\n    request: {self.request}"


@dataclass
class FuzzReport:
    seed: int
    requests: int = 0
    kinds: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    victims: int = 0
    replayed: int = 0
    failures: list = field(default_factory=list)
    seconds: float = 0.0
    exit_status: int | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_text(self) -> str:
        lines = [f"tq-deploy fuzz-server: seed {self.seed}, {self.requests} requests in {self.seconds:.1f} s, "
                 f"{self.victims} victim streams, {self.replayed} refusals replayed idle",
                 "  by kind:   " + ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items())),
                 "  by status: " + ", ".join(f"{k} {n}" for k, n in sorted(self.statuses.items(), key=str))]
        if self.exit_status is not None:
            lines.append(f"  server exit status {self.exit_status}")
        lines += [f.line() for f in self.failures[:50]]
        if len(self.failures) > 50:
            lines.append(f"  ... and {len(self.failures) - 50} more failures")
        lines.append(f"{'PASS' if self.passed else 'FAIL'}: {len(self.failures)} failures")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "requests": self.requests, "kinds": dict(self.kinds),
                "statuses": {str(k): v for k, v in self.statuses.items()}, "victims": self.victims,
                "replayed": self.replayed, "seconds": self.seconds, "exit_status": self.exit_status,
                "failures": [f.__dict__ for f in self.failures], "passed": self.passed}


# --- the requests -----------------------------------------------------------------------------

def _json(value) -> bytes:
    return json.dumps(value).encode()


def _http(method: str, path: str, body: bytes = b"", headers=(), host: str = "fuzz") -> bytes:
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    names = {k.lower() for k, _ in headers}
    if "content-length" not in names and "transfer-encoding" not in names and (body or method == "POST"):
        head.append(f"Content-Length: {len(body)}")
    head += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + body


WRONG = {  # field -> values that must be refused
    "prompt": [5, 1.5, True, None, {}, [], [[]], ["a", 1], [1.5], [True], {"a": 1}, "\ud800", "ok \udfff",
               [-1], [10**9], [2**63], [2**64], [1, 2, 10**6], [0, 0, -5], [2**31], [-(2**63)]],
    "max_tokens": [0, -1, 1.5, "16", True, [], {}, 2**31, 2**64, 10**30, 1e308, -0.5, float("nan")],
    "temperature": [-1, -1e-9, 100.5, "0", True, [], float("nan"), float("inf"), 1e309],
    "top_p": [0, -0.1, 1.0001, "1", False, float("nan"), float("-inf"), []],
    "seed": [-1, 1.5, 2**63, 2**64, 10**40, "1", True, 1e20, [1]],
    "stop": ["", [""], [1], ["x" * 257], ["a"] * 9, {"a": 1}, 5, [None], "\ud800", ["a", "\udc00b"]],
    "stream": ["true", 1, 0, None, [], "yes"],
    "n": [2, 0, -1, "1", 1.5],
    "model": ["other", 5, "", "tq_llm\x00", "../tq_llm"],
    "logprobs": [3, True], "echo": [True], "best_of": [2], "logit_bias": [{"1": 5}], "suffix": ["x"],
    "presence_penalty": [0.5], "frequency_penalty": [-1], "tools": [[{"type": "function"}]],
    "response_format": [{"type": "json_object"}],
}
FINE = {  # field -> values that are valid (the answer must be a 200)
    "max_tokens": [1, 2, 3, 5.0, None], "temperature": [0, 0.0, 0.7, 1, 2.5, None], "top_p": [1, 0.5, 1e-6, None],
    "seed": [0, 1, 2**63 - 1, 7.0, None], "stop": [None, [], "\n", ["zz", "q"]], "n": [1, None],
    "model": [MODEL, None], "logprobs": [None, False], "echo": [False], "best_of": [1],
}
BAD_IDS = [[-1], [10**9], [2**63], [2**64], [1, 2, 10**6], [0, 0, -5], [2**31], [-(2**63)]]
ID_FIELDS = ("id", "request_id", "sequence_id", "seq_id", "session_id", "correlation_id", "user", "sequence_start",
             "sequence_end", "parent_id")
GUESSES = [0, 1, -1, 2**64, 2**63 - 1, "1", "cmpl-" + "0" * 32, "cmpl-" + "f" * 32, "cmpl-", "../", "' OR 1=1 --",
           "%s%s%n", "\u0000", "a" * 5000]


def _completion(rng: random.Random, canonical: int, stream: bool, max_tokens: int, **extra) -> dict:
    body = {"model": MODEL, "prompt": CANONICAL[canonical], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}
    body.update(extra)
    if rng.random() < 0.3:
        del body["model"]
    return body


def make_probe(seed: int, index: int, grpc: bool, huge: bool = True, only=None) -> Probe:
    """Request ``index`` of ``seed`` (module docstring); ``only``: draw from these kinds alone."""
    rng = random.Random(f"{seed}/{index}")
    kinds = tuple(only) if only else HTTP_KINDS + (GRPC_KINDS if grpc else ())
    weights = {"valid": 3, "valid-stream": 3, "valid-sampled": 2, "chat": 1, "generate": 2, "bad-json": 3,
               "deep-nesting": 2, "huge-body": 1, "headers": 3, "wrong-types": 5, "forged-id": 6, "paths": 2,
               "raw": 2, "disconnect": 3, "grpc-valid": 2, "grpc-bad": 3, "grpc-forged-id": 2, "grpc-cancel": 2,
               "grpc-admin": 1}
    kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
    p = Probe(index, kind)
    canonical = rng.randrange(len(CANONICAL))
    m = rng.randint(1, BASE_TOKENS)
    if kind in ("valid", "valid-stream"):
        stream = kind == "valid-stream"
        p.expect, p.canonical, p.max_tokens, p.stream = "ok", canonical, m, stream
        if rng.random() < 0.5:
            p.body = _json(_completion(rng, canonical, stream, m))
        else:
            p.path = f"/v2/models/{MODEL}/generate" + ("_stream" if stream else "")
            fields = {"text_input": CANONICAL[canonical]}
            options = {"max_tokens": m, "temperature": 0}
            if rng.random() < 0.5:
                fields["parameters"] = options
            else:
                fields.update(options)
            p.body = _json(fields)
    elif kind == "valid-sampled":
        p.expect, p.stream = "ok", rng.random() < 0.5
        prompt = rng.choice([" ".join(rng.choice(("sea", "the", "a", "ship", "é", "日本", "[", "{", "\"", "\\"))
                                      for _ in range(rng.randint(1, 40))),
                             [rng.randrange(1, 1000) for _ in range(rng.randint(1, 60))]])
        body = {"prompt": prompt, "max_tokens": rng.randint(1, 6), "stream": p.stream}
        for name, values in FINE.items():
            if rng.random() < 0.3:
                value = rng.choice(values)
                if value is not None:
                    body[name] = value
        p.body = _json(body)
    elif kind == "chat":
        p.path, p.expect = "/v1/chat/completions", "either"  # a tokenizer without a chat template says 400
        messages = [{"role": rng.choice(("user", "system", "assistant")),
                     "content": rng.choice(("Hi", "[{\"x\"]", "", "\ud800"))}
                    for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.4:
            bad = rng.choice(([], "hi", [{"role": "user"}], [{"role": 5, "content": "x"}], [{"content": "x"}],
                              [{"role": "user", "content": ["x"]}], None, [None]))
            messages, p.expect = bad, "4xx"
        p.body = _json({"messages": messages, "max_tokens": rng.randint(1, 4), "stream": rng.random() < 0.5})
    elif kind == "generate":
        p.path = f"/v2/models/{MODEL}/generate" + rng.choice(("", "_stream"))
        fields = rng.choice(({"text_input": "hi", "input_ids": [1, 2]}, {}, {"text_input": 5}, {"text_input": [1, 2]},
                             {"input_ids": "1 2"}, {"input_ids": {"0": 1}}, {"text_input": "\udfff"},
                             {"input_ids": "1 2"}, {"input_ids": [1, 2], "parameters": {"max_tokens": "x"}},
                             {"text_input": "hi", "parameters": [1]}, {"text_input": "hi", "max_tokens": 0}))
        p.expect = "either" if fields.get("parameters") == [1] else "4xx"
        p.body = _json(fields)
    elif kind == "bad-json":
        good = json.dumps(_completion(rng, canonical, False, m))
        how = rng.randrange(8)
        if how == 0:
            text = good[:rng.randrange(1, len(good) - 1)]  # every proper prefix of an object is invalid
        elif how == 1:
            text = good.replace('"', "'", rng.randint(1, 4))
        elif how == 2:
            text = good + rng.choice(("}", "x", ",", "]", "{}"))
        elif how == 3:
            text = good.replace(":", "", 1)
        elif how == 4:
            text = rng.choice(("", " ", "null", "true", "1", '"x"', "[]", "{", "}", "{]", "{\"prompt\": }",
                               "{\"prompt\": \"\\x\"}", "{\"prompt\": \"\\ud800\"}", "\ufeff{}"))
            if text in ("{\"prompt\": \"\\ud800\"}",):  # a lone surrogate parses; the prompt is then refused or served
                p.expect = "either"
        elif how == 5:
            p.body = good.encode()[:20] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))) + b"\xff\xfe"
        elif how == 6:
            p.body = b"\x00" * rng.randint(1, 100)
        else:
            text = "{" + ",".join(f'"k{k}":{k}' for k in range(rng.randint(1, 2000))) + ",}"
        if not p.body:
            p.body = text.encode("utf-8", "surrogatepass")
        p.path = rng.choice(("/v1/completions", "/v1/chat/completions", f"/v2/models/{MODEL}/generate",
                             f"/v2/models/{MODEL}/generate_stream"))
    elif kind == "deep-nesting":
        depth = rng.choice((9, 10, 50, 1000, 100000, rng.randint(9, 20000)))
        how = rng.randrange(4)
        if how == 0:
            p.body = b"[" * depth + b"]" * depth
        elif how == 1:
            p.body = b'{"a":' * depth + b"1" + b"}" * depth
        elif how == 2:
            p.body = _json({"prompt": "hi", "stop": None}).replace(b"null", b"[" * depth + b"]" * depth)
        else:  # brackets inside a string do not nest: a valid request
            p.expect = "ok"
            p.body = _json({"prompt": "[{" * rng.randint(10, 100) + "\\\"[", "max_tokens": 1, "temperature": 0})
        if how != 3 and depth > 5000 and rng.random() < 0.5:
            p.body = p.body[:len(p.body) // 2]  # unclosed
    elif kind == "huge-body":
        how = rng.randrange(6) if huge else rng.randrange(3)
        if how == 0:
            p.raw = _http("POST", "/v1/completions", headers=[("Content-Length", str(rng.choice(((4 << 20) + 1, 10**9,
                                                                                               10**30))))])
            p.expect = "4xx"
        elif how == 1:
            p.raw = _http("POST", "/v1/completions", headers=[("Content-Length", rng.choice(("-1", "1e3", "abc", "0x10",
                                                                                           " 5", "5, 5")))])
            p.expect, p.half_close = "4xx", True
        elif how == 2:  # a prompt that can never fit the pool or the context
            p.body = _json({"prompt": [5] * rng.randint(70000, 200000), "max_tokens": 1})
        elif how == 3:  # just over the limit, sent in full
            p.body = b'{"prompt": "' + b"a" * ((4 << 20) - 10) + b'"}'
        elif how == 4:  # chunked, no length: refused while it is read
            chunk = b"x" * 65536
            body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(70)) + b"0\r\n\r\n"
            p.raw = _http("POST", "/v1/completions", headers=[("Transfer-Encoding", "chunked")]) + body
        else:  # under the body limit, over the prompt's character limit
            p.body = _json({"prompt": "ab " * 400000, "max_tokens": 1})
    elif kind == "headers":
        body = _json(_completion(rng, canonical, False, m))
        how = rng.randrange(7)
        p.canonical, p.max_tokens, p.expect = canonical, m, "either"
        if how == 0:
            headers = [("X-Big", "a" * rng.choice((1000, 20000, 100000, 1 << 20)))]
        elif how == 1:
            headers = [(f"X-H{k}", str(k)) for k in range(rng.choice((100, 1000, 5000)))]
        elif how == 2:
            headers = [(rng.choice(("X Bad", "X:Bad", "", "\x01", "é")), "v")]
        elif how == 3:
            headers = [("Content-Length", str(len(body))), ("Content-Length", str(len(body) + 5))]
            p.expect = "4xx"
        elif how == 4:
            headers = [("Content-Type", rng.choice(("text/plain", "application/x-www-form-urlencoded", "multipart/x",
                                                    "application/json; charset=utf-16", "\x7f")))]
        elif how == 5:
            headers = [("Transfer-Encoding", "chunked"), ("Content-Length", str(len(body)))]
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        else:
            headers = [("X-Odd", "".join(chr(rng.randrange(0x80, 0x100)) for _ in range(50))),
                       ("Expect", "100-continue"), ("Connection", "keep-alive, upgrade"), ("Upgrade", "h2c")]
        p.raw = _http("POST", "/v1/completions", body, headers)
    elif kind == "wrong-types":
        endpoint = rng.randrange(3)
        fields = {"prompt": CANONICAL[canonical], "max_tokens": m, "temperature": 0}
        core = ("prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream")
        # mostly one bad field, so that each check is reached alone (the first bad field hides the others)
        bad = rng.sample(core if rng.random() < 0.7 else sorted(WRONG), rng.choices((1, 2, 3), (7, 2, 1))[0])
        if rng.random() < 0.15:
            bad = ["prompt"]  # the engine's own refusal (ids out of range), behind every parser check
        for name in bad:
            fields[name] = rng.choice(WRONG[name])
            if name == "prompt" and rng.random() < 0.5:  # ids out of range: refused by the engine, not the parser
                fields[name] = rng.choice(BAD_IDS)
        if endpoint == 2:
            bad = [n for n in bad if n in core]
            if not bad:  # the generate protocol ignores the OpenAI-only fields: make one it checks bad
                fields["max_tokens"] = 0
            p.path = f"/v2/models/{MODEL}/generate"
            fields["text_input"] = fields.pop("prompt")
            if not isinstance(fields["text_input"], str):
                fields["input_ids"] = fields.pop("text_input")
        elif endpoint == 1:
            p.path = "/v1/chat/completions"
            fields["messages"] = [{"role": "user", "content": "hi"}]
            if "prompt" in bad:
                fields["messages"] = fields.pop("prompt")
            else:
                fields.pop("prompt")
        text = json.dumps(fields, allow_nan=True)
        p.body = text.encode()
    elif kind == "forged-id":
        p.forge = rng.choice(("live", "live", "live", "done", "guess"))
        how = rng.randrange(4)
        if how <= 1:  # an id in a field, header or query string of an otherwise valid greedy request
            p.expect, p.canonical, p.max_tokens, p.stream = "ok", canonical, m, rng.random() < 0.5
            body = _completion(rng, canonical, p.stream, m)
            where = rng.choice(("field", "field", "parameters", "header", "query"))
            if where == "field":  # several names at once: whichever one a server might read
                for name in rng.sample(ID_FIELDS, rng.randint(1, len(ID_FIELDS))):
                    body[name] = "{ID}"
            elif where == "parameters":
                p.path = f"/v2/models/{MODEL}/generate" + ("_stream" if p.stream else "")
                body = {"text_input": body["prompt"], "parameters": {"max_tokens": m, "temperature": 0,
                                                                      rng.choice(ID_FIELDS): "{ID}"}}
            elif where == "header":
                p.headers = [(rng.choice(("X-Request-Id", "X-Sequence-Id", "Idempotency-Key", "Cookie",
                                          "Authorization", "OpenAI-Organization")), "{ID}")]
            else:
                p.path += rng.choice(("?id={ID}", "?request_id={ID}&sequence_id={ID}", "?cancel={ID}"))
            p.body = _json(body)
        else:  # paths that would address a request: none exist
            p.method = rng.choice(("GET", "DELETE", "POST", "PUT", "PATCH"))
            p.path = rng.choice(("/v1/completions/{ID}", "/v1/completions/{ID}/cancel", "/v1/chat/completions/{ID}",
                                 f"/v2/models/{MODEL}/generate/{{ID}}", "/v1/requests/{ID}", "/stats/{ID}",
                                 "/v1/responses/{ID}", f"/v2/models/{MODEL}/sequences/{{ID}}/end", "/cancel/{ID}"))
            p.body = b"" if p.method in ("GET", "DELETE") else _json({"id": "{ID}"})
            p.expect = "4xx"
    elif kind == "paths":
        p.method = rng.choice(("GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "TRACE", "PATCH", "BREW", "get"))
        p.path = rng.choice(("/", "/v1", "/v1/models/x", f"/v2/models/{MODEL}/infer", f"/v2/models/{MODEL}/config",
                             "/v2/repository/index", f"/v2/repository/models/{MODEL}/unload", "/v2/logging",
                             "/v2/trace/setting", "/v2/systemsharedmemory/region/x/register", "/metrics",
                             "/docs", "/openapi.json", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/%00",
                             "/v1/completions%00", "//v1//completions", "/v1/completions/", "/" + "a" * 70000,
                             "/v1/completions?" + "a=1&" * 5000, "/stats?x=" + "%" * 10, "*"))
        p.body = b"" if p.method in ("GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "get") else b"{}"
        p.expect = "either" if p.path.startswith("/stats") else "4xx"  # GET /stats?x=... is /stats
        if p.method == "POST" and p.path == "/v1/completions/":
            p.expect = "either"  # a redirect or a 404
        p.raw = _http(p.method, p.path, p.body)
    elif kind == "raw":
        p.transport, p.expect, p.half_close = "raw", "closed-ok", True
        p.raw = rng.choice((bytes(rng.randrange(256) for _ in range(rng.randint(1, 2000))),
                            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(rng.randrange(256) for _ in range(64)),
                            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello start
                            b"GET / HTTP/9.9\r\n\r\n", b"GET\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\n\r\n",
                            b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 20000 + b"\r\n",
                            b"GET /health HTTP/1.0\r\n\r\n" * 3, b"\r\n" * 1000,
                            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{}"))
    elif kind == "disconnect":
        p.expect, p.stream = "none", True
        how = rng.randrange(4)
        body = _completion(rng, canonical, how >= 2 or rng.random() < 0.5, rng.randint(8, 200))
        data = _http("POST", "/v1/completions", _json(body))
        if how == 0:  # mid-body
            p.raw = data[:rng.randrange(len(data) - len(_json(body)), len(data) - 1)]
        elif how == 1:  # after the request, before any answer
            p.raw, p.leave_after = data, None
        else:  # after a few lines of the stream
            p.raw, p.leave_after = data, rng.randint(1, 12)
        p.body = _json(body)
    else:  # gRPC
        p.transport = "grpc"
        p.grpc = _grpc_probe(rng, kind, canonical, m)
        if kind in ("grpc-valid", "grpc-forged-id"):
            p.expect, p.canonical, p.max_tokens = "ok", canonical, m
            if "sequence_id" in p.grpc.get("parameters", {}) or p.grpc.get("sequence_id") == "{ID}":
                # tritonserver refuses its reserved parameter names and string correlation ids over 128
                # characters (4xx, checked as such)
                p.expect = "either"
        elif kind == "grpc-cancel":
            p.expect = "none"
        elif kind == "grpc-admin":
            p.expect = "4xx"
        else:
            p.expect = p.grpc.pop("expect", "4xx")
        p.forge = "live" if kind == "grpc-forged-id" else None
    return p  # an http probe without raw bytes is built at send time (forged ids go in then)


def _grpc_probe(rng: random.Random, kind: str, canonical: int, m: int) -> dict:
    """A gRPC request as data: inputs [(name, dtype, shape, values)], options; built into tensors at send time."""
    text = CANONICAL[canonical]
    base = [("text_input", "UINT8", None, text), ("max_tokens", "INT32", [1], [m]),
            ("temperature", "FP32", [1], [0.0]), ("stream", "BOOL", [1], [rng.random() < 0.5])]
    if kind == "grpc-valid":
        return {"inputs": base}
    if kind == "grpc-forged-id":
        return {"inputs": base, "request_id": "{ID}",
                "sequence_id": rng.choice((0, 1, 2**63 - 1, "{ID}")), "parameters": rng.choice(
                    ({}, {"sequence_id": "{ID}"}, {"request_id": "{ID}", "max_tokens": 1000}))}
    if kind == "grpc-cancel":
        return {"inputs": [("text_input", "UINT8", None, text), ("max_tokens", "INT32", [1], [rng.randint(20, 200)]),
                           ("stream", "BOOL", [1], [True])], "cancel_after": rng.randint(0, 3)}
    if kind == "grpc-admin":
        return {"admin": rng.choice(("get_model_config", "get_log_settings", "update_log_settings",
                                     "get_system_shared_memory_status", "register_system_shared_memory",
                                     "get_trace_settings", "get_model_repository_index", "unload_model",
                                     "load_model", "infer"))}
    how = rng.randrange(12)
    inputs = list(base)
    expect = "4xx"
    if how == 0:
        inputs[0] = ("text_input", "BYTES", [1], [text.encode()])
    elif how == 1:
        inputs = inputs[1:]
    elif how == 2:
        inputs.append(("input_ids", "INT64", [2], [1, 2]))
    elif how == 3:
        inputs[0] = ("text_input", "UINT8", None, b"\xff\xfe\xc3(")
    elif how == 4:
        inputs[1] = ("max_tokens", "INT32", [1], [rng.choice((0, -1, -(2**31), 2**31 - 1))])
    elif how == 5:
        inputs[2] = ("temperature", "FP32", [1], [rng.choice((float("nan"), float("inf"), -1.0, 1e30))])
    elif how == 6:
        inputs.append(("top_p", "FP32", [1], [rng.choice((0.0, -0.5, 1.5, float("nan")))]))
    elif how == 7:
        inputs.append(("seed", "INT64", [1], [rng.choice((-1, -(2**63)))]))
    elif how == 8:
        inputs[1] = ("max_tokens", "INT32", [2], [1, 2])
    elif how == 9:
        inputs[0] = ("input_ids", "INT64", [3], [rng.choice((-1, 10**9, 2**62)), 1, 2])
    elif how == 10:
        inputs[1] = ("max_tokens", rng.choice(("INT64", "FP32", "UINT8")), [1], [4])
    else:
        inputs.append(("stop", "UINT8", None, rng.choice((b"\xff", "\0".join(["ab"] * 9).encode(), b"x" * 300))))
    return {"inputs": inputs, "expect": expect}


# --- sending and judging ----------------------------------------------------------------------

class Shared:
    """What the threads share: victims' ids and markers, every issued id, the baseline answers."""

    def __init__(self):
        self.lock = threading.Lock()
        self.live: list[str] = []
        self.done: list[str] = []
        self.victims: dict[str, str] = {}  # id -> secret marker of its prompt
        self.markers: set[str] = set()
        self.issued: Counter = Counter()
        self.baseline: dict[int, list[int]] = {}
        self.answers: list[tuple[Probe, bytes, bytes]] = []  # (probe, bytes sent, answer) for the leak scan

    def forged(self, how: str | None, rng: random.Random):
        with self.lock:
            pool = {"live": self.live, "done": self.done}.get(how or "", [])
            if pool:
                return rng.choice(pool)
        return rng.choice(GUESSES)


def _one_line(message: str) -> bool:
    return bool(message.strip()) and "\n" not in message.strip() and len(message) <= MAX_MESSAGE and \
        "Traceback" not in message and 'File "' not in message


def _message_of(body: bytes) -> str:
    try:
        value = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()
    if isinstance(value, dict):
        error = value.get("error", value.get("detail"))
        if isinstance(error, dict):
            error = error.get("message")
        if isinstance(error, str):
            return error
    return ""


class Client:
    def __init__(self, options: FuzzOptions, shared: Shared):
        parts = urlsplit(options.url if "://" in options.url else "http://" + options.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.options, self.shared = options, shared

    # HTTP ---------------------------------------------------------------------------------------

    def request_bytes(self, probe: Probe, rng: random.Random) -> bytes:
        if probe.raw is not None and probe.forge is None:
            return probe.raw
        forged = self.shared.forged(probe.forge, rng) if probe.forge else ""
        quoted = quote(str(forged), safe="")  # in a path or header: percent-encoded, as a client would send it
        if probe.raw is not None:
            return probe.raw.replace(b"{ID}", quoted.encode())
        path = probe.path.replace("{ID}", quoted) if probe.forge else probe.path
        headers = [(k, v.replace("{ID}", quoted)) for k, v in probe.headers]
        body = probe.body
        if probe.forge:  # the id goes into the JSON as a value of its own type
            value = json.loads(body) if body else None
            body = _json(_substitute(value, forged)) if value is not None else b""
        return _http(probe.method, path, body, headers)

    def send_http(self, data: bytes, probe: Probe) -> Reply:
        reply = Reply()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.options.timeout_s)
        except OSError as err:
            return Reply(error=f"cannot connect: {err}")
        try:
            try:
                sock.sendall(data)
                if probe.half_close:
                    sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server may answer (413) and close before it reads everything
            if probe.kind == "disconnect" and probe.leave_after is None:
                time.sleep(random.Random(data).random() * 0.05)
                return reply
            response = http.client.HTTPResponse(sock, method=probe.method.upper())
            try:
                response.begin()
            except (http.client.HTTPException, OSError) as err:
                reply.error = f"no answer ({type(err).__name__}: {err})"
                return reply
            reply.status = response.status
            if probe.leave_after == 0:
                return reply
            if (response.getheader("content-type") or "").startswith("text/event-stream"):
                return self._read_stream(response, reply, probe)
            reply.body = response.read(BODY_LIMIT)
            reply.message = _message_of(reply.body) if reply.status >= 400 else ""
            if reply.status == 200:
                self._parse_answer(reply)
            return reply
        except socket.timeout:
            reply.error = f"no complete answer in {self.options.timeout_s:g} s"
            return reply
        except (http.client.HTTPException, OSError) as err:
            reply.error = f"{type(err).__name__}: {err}"
            return reply
        finally:
            sock.close()

    def _read_stream(self, response, reply: Reply, probe: Probe) -> Reply:
        lines, tokens = [], []
        while True:
            line = response.readline(BODY_LIMIT)
            if not line:
                break
            lines.append(line)
            if probe.leave_after is not None and len(lines) >= probe.leave_after:
                reply.body = b"".join(lines)
                return reply
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                reply.finish = reply.finish or "?"
                break
            event = json.loads(data)
            if "error" in event:
                reply.message, reply.finish = _message_of(data), "error"
                continue
            choice = event.get("choices", [event])[0]
            tokens += choice.get("token_ids") or []
            if event.get("id"):
                reply.ids.add(event["id"])
            if choice.get("finish_reason"):
                reply.finish = choice["finish_reason"]
        reply.body = b"".join(lines)
        reply.tokens = tokens
        if not lines or lines[-1].strip() != b"data: [DONE]" and not any(x.strip() == b"data: [DONE]" for x in lines):
            reply.error = "the stream did not end with data: [DONE]"
        return reply

    @staticmethod
    def _parse_answer(reply: Reply) -> None:
        try:
            value = json.loads(reply.body)
        except ValueError:
            reply.error = "a 200 answer that is not JSON"
            return
        if not isinstance(value, dict):
            return
        if value.get("id"):
            reply.ids.add(value["id"])
        choice = (value.get("choices") or [value])[0]
        if "token_ids" in choice:
            reply.tokens = list(choice["token_ids"])
            reply.finish = choice.get("finish_reason")

    # gRPC ---------------------------------------------------------------------------------------

    def send_grpc(self, probe: Probe, rng: random.Random) -> tuple[Reply, bytes]:
        import numpy as np
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        spec = dict(probe.grpc)
        forged = str(self.shared.forged(probe.forge, rng)) if probe.forge else ""
        sent = json.dumps(spec, default=repr).replace("{ID}", forged).encode()
        reply = Reply()
        client = grpcclient.InferenceServerClient(self.options.grpc)
        try:
            if "admin" in spec:
                reply.status, reply.message = self._admin(client, spec["admin"], grpcclient, np)
                return reply, sent
            inputs = []
            for name, dtype, shape, values in spec["inputs"]:
                if dtype == "UINT8" and shape is None:
                    data = values.encode() if isinstance(values, str) else values
                    array = np.frombuffer(data, dtype=np.uint8).copy()
                elif dtype == "BYTES":
                    array = np.array(values, dtype=np.object_)
                else:
                    array = np.array(values, dtype={"INT32": np.int32, "INT64": np.int64, "FP32": np.float32,
                                                    "BOOL": np.bool_, "UINT8": np.uint8}[dtype]).reshape(shape)
                item = grpcclient.InferInput(name, list(array.shape), dtype)
                item.set_data_from_numpy(array)
                inputs.append(item)
            results: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            try:
                kwargs = {}
                if "request_id" in spec:
                    kwargs["request_id"] = spec["request_id"].replace("{ID}", forged)
                if "sequence_id" in spec:
                    value = spec["sequence_id"]
                    kwargs["sequence_id"] = forged if value == "{ID}" else value
                if spec.get("parameters"):
                    kwargs["parameters"] = {k: (forged if v == "{ID}" else v) for k, v in spec["parameters"].items()}
                try:
                    client.async_stream_infer(MODEL, inputs, **kwargs)
                except InferenceServerException as err:  # refused by the client library before sending
                    reply.status, reply.message = 400, str(err)
                    return reply, sent
                tokens, pieces = [], []
                deadline = time.monotonic() + self.options.timeout_s
                while True:
                    try:
                        result, error = results.get(timeout=max(deadline - time.monotonic(), 0.01))
                    except queue.Empty:
                        reply.error = f"no final gRPC response in {self.options.timeout_s:g} s"
                        break
                    if error is not None:
                        reply.status, reply.message = 400, str(error.message() if hasattr(error, "message")
                                                                 else error)
                        break
                    reply.status = 200
                    pieces.append(result)
                    ids = result.as_numpy("token_ids")
                    tokens += [] if ids is None else [int(t) for t in ids.reshape(-1)]
                    for name in ("id", "finish_reason", "text_output"):
                        array = result.as_numpy(name)
                        value = "" if array is None else array.astype(np.uint8).tobytes().decode("utf-8", "replace")
                        reply.body += value.encode() + b"\n"
                        if name == "id" and value:
                            reply.ids.add(value)
                        if name == "finish_reason" and value:
                            reply.finish = value
                    if "cancel_after" in spec and len(pieces) > spec["cancel_after"]:
                        break
                    if reply.finish:
                        break
                reply.tokens = tokens
            finally:
                # cancel what still runs; a finished request's stream is closed. (A stream that tritonserver
                # refused, then cancelled by its client, keeps the model loaded at shutdown in tritonserver
                # 2.51: the shutdown takes the whole exit timeout and exits 1; cancel_refused shows it.)
                running = reply.status is None or (reply.status == 200 and not reply.finish)
                client.stop_stream(cancel_requests=running or (reply.status == 400 and self.options.cancel_refused))
        finally:
            client.close()
        return reply, sent

    @staticmethod
    def _admin(client, call: str, grpcclient, np) -> tuple[int, str]:
        from tritonclient.utils import InferenceServerException

        try:
            if call == "infer":
                item = grpcclient.InferInput("text_input", [2], "UINT8")
                item.set_data_from_numpy(np.array([104, 105], dtype=np.uint8))
                client.infer(MODEL, [item])
            elif call == "update_log_settings":
                client.update_log_settings({"log_verbose_level": 9})
            elif call == "register_system_shared_memory":
                client.register_system_shared_memory("fuzz", "/fuzz-region", 64)
            elif call in ("unload_model", "load_model", "get_model_config"):
                getattr(client, call)(MODEL)
            else:
                getattr(client, call)()
        except InferenceServerException as err:
            return 400, str(err.message() or err)
        return 200, f"{call} succeeded"


def _substitute(value, forged: str):
    if value == "{ID}":
        return forged
    if isinstance(value, dict):
        return {k: _substitute(v, forged) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, forged) for v in value]
    return value


def judge(probe: Probe, reply: Reply, shared: Shared) -> list[str]:
    """What is wrong with ``reply`` to ``probe`` (module docstring); [] when nothing."""
    problems = []
    if probe.expect == "none":  # a client that left: nothing to check here (the pool check at the end)
        return problems
    if probe.kind == "grpc-admin":
        if reply.status == 200:
            problems.append(f"the admin call is open to any client ({reply.message})")
        elif "restricted" not in reply.message and "decoupled" not in reply.message:
            problems.append(f"the admin call was refused with {reply.message!r:.200}, expected 'restricted'")
        return problems
    status = reply.status
    if reply.error:
        # a request malformed at the HTTP level (too-large head, bad framing, garbage) may be closed by the
        # HTTP layer without an answer, or with a 4xx whose body the reset of the unread input loses
        malformed = probe.kind in PROTOCOL_KINDS and probe.expect != "ok" and (status is None or 400 <= status < 500)
        if not malformed:
            problems.append(reply.error)
        if malformed or status is None:
            return problems
    if status is None:
        if probe.expect in ("ok",) and not reply.error:
            problems.append("no answer")
        return problems
    if status >= 500:
        if not (status == 503 and "retry later" in reply.message):
            problems.append(f"HTTP {status} ({reply.message!r:.200}) for a client's request")
        return problems
    if 400 <= status < 500:
        if probe.expect == "ok":
            problems.append(f"a valid request was refused: {status} {reply.message!r:.300}")
        if probe.method.upper() != "HEAD" and not _one_line(reply.message):
            problems.append(f"a {status} without one clear message: {reply.body[:300]!r}")
        return problems
    if status == 200 and probe.expect == "4xx":
        problems.append(f"an invalid request was served (200): {reply.body[:200]!r}")
    if status == 200 and probe.method.upper() == "POST":
        if len(reply.ids) != 1 and reply.tokens is not None:
            problems.append(f"an answer with {len(reply.ids)} request ids {sorted(reply.ids)[:3]}, expected one")
        for rid in reply.ids:
            if not ID_PATTERN.fullmatch(rid):
                problems.append(f"a request id {rid!r:.80} that is not the server's (cmpl- + 32 hex digits)")
        if probe.stream and reply.finish == "error":
            problems.append(f"a valid stream ended with an error event: {reply.message!r:.200}")
        if probe.canonical is not None and reply.tokens is not None:
            want = shared.baseline[probe.canonical][:probe.max_tokens]
            if reply.tokens != want:
                problems.append(f"greedy tokens {reply.tokens} differ from the same prompt alone {want}")
        elif probe.canonical is not None and probe.expect == "ok":
            problems.append(f"a valid request got no tokens: {reply.body[:200]!r}")
        with shared.lock:
            for rid in reply.ids:
                shared.issued[rid] += 1
    return problems


# --- the run ----------------------------------------------------------------------------------

def _stats(client: Client) -> dict:
    reply = client.send_http(_http("GET", "/stats"), Probe(-1, "stats", method="GET", expect="ok"))
    if reply.status != 200:
        raise RuntimeError(f"GET /stats answered {reply.status} {reply.error or reply.message}")
    return json.loads(reply.body)


def _greedy(client: Client, canonical: int, max_tokens: int, marker: str = "") -> Reply:
    prompt = f"{marker} {CANONICAL[canonical]}" if marker else CANONICAL[canonical]
    probe = Probe(-1, "victim" if marker else "check", expect="ok", stream=bool(marker))
    probe.body = _json({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": bool(marker)})
    return client.send_http(_http("POST", "/v1/completions", probe.body), probe)


def check_options(options: FuzzOptions) -> None:
    """ValueError naming the option that is out of range."""
    if options.requests < 1 or options.concurrency < 1 or options.batch < 1:
        raise ValueError("requests, concurrency and batch must be >= 1")
    unknown = sorted(set(options.kinds or ()) - set(HTTP_KINDS + GRPC_KINDS))
    if unknown:
        raise ValueError(f"--kinds {','.join(unknown)}, expected some of {','.join(HTTP_KINDS + GRPC_KINDS)}")
    if options.grpc is None and any(k in GRPC_KINDS for k in options.kinds or ()):
        raise ValueError("--kinds has gRPC kinds, expected a gRPC address (--grpc, or --model without --no-grpc)")


def fuzz_server(options: FuzzOptions, alive=None) -> FuzzReport:
    """Fuzz the server at ``options.url`` (module docstring). ``alive()``: False once the server process died."""
    check_options(options)
    report = FuzzReport(options.seed)
    shared = Shared()
    client = Client(options, shared)
    started = time.monotonic()

    def fail(index, kind, what, request=""):
        report.failures.append(Failure(options.seed, index, kind, what, request))

    for canonical in range(len(CANONICAL)):
        reply = _greedy(client, canonical, BASE_TOKENS)
        if reply.status != 200 or reply.tokens is None:
            fail(-1, "baseline", f"the canonical prompt {canonical} alone: {reply.status} "
                 f"{reply.error or reply.message}")
            return report
        shared.baseline[canonical] = reply.tokens

    stop = threading.Event()

    def victim(k: int) -> None:
        n = 0
        while not stop.is_set():
            marker = f"vic{secrets.token_hex(6)}"
            with shared.lock:
                shared.markers.add(marker)
            probe = Probe(-1, "victim", expect="ok", stream=True)
            probe.body = _json({"prompt": f"{marker} {CANONICAL[(k + n) % len(CANONICAL)]}", "max_tokens": 40,
                                "temperature": 0, "stream": True})
            data = _http("POST", "/v1/completions", probe.body)
            reply = _VictimReply()
            reply.run(client, data, shared, marker)
            n += 1
            with shared.lock:
                report.victims += 1
            if reply.problem:
                fail(-1, "victim", reply.problem, probe.describe())

    victims = [threading.Thread(target=victim, args=(k,), daemon=True) for k in range(options.victims)]
    for t in victims:
        t.start()

    def one(index: int) -> None:
        probe = make_probe(options.seed, index, options.grpc is not None, options.huge, options.kinds)
        rng = random.Random(f"{options.seed}/{index}/send")
        if probe.transport == "grpc":
            reply, sent = client.send_grpc(probe, rng)
        else:
            sent = client.request_bytes(probe, rng)
            reply = client.send_http(sent, probe)
        with shared.lock:
            report.kinds[probe.kind] += 1
            key = ("grpc " if probe.transport == "grpc" else "") + (str(reply.status) if reply.status else
                                                                    "closed" if probe.expect != "none" else "left")
            report.statuses[key] += 1
            shared.answers.append((probe, sent, reply.body if reply.status is None or reply.status < 400
                                   else reply.message.encode(), reply))
        shown = probe.describe() if probe.transport == "grpc" else _show(sent)
        for problem in judge(probe, reply, shared):
            fail(index, probe.kind, problem, shown)

    last = options.first + options.requests
    with ThreadPoolExecutor(options.concurrency) as pool:
        for start in range(options.first, last, options.batch):
            list(pool.map(one, range(start, min(start + options.batch, last))))
            report.requests = min(start + options.batch, last) - options.first
            if alive is not None and not alive():
                fail(start, "alive", "the server process died during this batch")
                break
            canonical = start % len(CANONICAL)
            check = _greedy(client, canonical, BASE_TOKENS)
            if check.status != 200 or check.tokens != shared.baseline[canonical]:
                fail(start, "answering", f"after the batch from request {start}, a valid greedy request got "
                     f"{check.status} {check.error or check.message or check.tokens}")
                break
            if options.grpc is not None:  # and tritonserver's port too
                inputs = [("text_input", "UINT8", None, CANONICAL[canonical]),
                          ("max_tokens", "INT32", [1], [BASE_TOKENS]), ("temperature", "FP32", [1], [0.0]),
                          ("stream", "BOOL", [1], [True])]
                check, _ = client.send_grpc(Probe(-1, "check", transport="grpc", grpc={"inputs": inputs}), rng=None)
                if check.status != 200 or check.tokens != shared.baseline[canonical]:
                    fail(start, "answering", f"after the batch from request {start}, a valid gRPC stream got "
                         f"{check.status} {check.error or check.message or check.tokens}")
                    break
    stop.set()
    for t in victims:
        t.join(options.timeout_s + 10)

    # leaks: no answer carries a victim's id (unless its own request did) or a victim's marker
    with shared.lock:
        victims_ids, markers = dict(shared.victims), set(shared.markers)
    for probe, sent, body, reply in shared.answers:
        text = body.decode("utf-8", "replace")
        for rid in victims_ids:
            if rid in text and rid not in sent.decode("utf-8", "replace"):
                fail(probe.index, probe.kind, f"the answer holds another client's request id {rid}", _show(sent))
        for marker in markers:
            if marker in text and marker not in sent.decode("utf-8", "replace"):
                fail(probe.index, probe.kind, f"the answer holds the prompt of another client ({marker})",
                     _show(sent))
    for rid, n in shared.issued.items():
        if n > 1:
            fail(-1, "ids", f"the server issued request id {rid} {n} times")

    # the pool returns to empty
    deadline = time.monotonic() + options.timeout_s
    while True:
        try:
            stats = _stats(client)
        except (RuntimeError, ValueError) as err:
            fail(-1, "pool", f"/stats: {err}")
            break
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["free_blocks"] == stats["num_blocks"]:
            break
        if time.monotonic() > deadline:
            fail(-1, "pool", f"the pool did not return to empty in {options.timeout_s:g} s: {stats}")
            break
        time.sleep(0.2)

    # refusals do not depend on what else runs: the same answer on the idle server
    refused = [(p, s, r) for p, s, _, r in shared.answers
               if p.transport == "http" and r.status is not None and 400 <= r.status < 500 and r.message
               and p.kind not in ("disconnect", "raw")]
    pick = random.Random(f"{options.seed}/replay").sample(refused, min(options.replay, len(refused)))
    for probe, sent, first in pick:
        again = client.send_http(sent, probe)
        report.replayed += 1
        if (again.status, again.message) != (first.status, first.message):
            fail(probe.index, probe.kind, f"refused with {first.status} {first.message!r:.200} under load but "
                 f"{again.status} {again.message!r:.200} on the idle server", _show(sent))
    reply = client.send_http(_http("GET", "/health"), Probe(-1, "health", method="GET", expect="ok"))
    if reply.status != 200:
        fail(-1, "health", f"GET /health after the run: {reply.status} {reply.error or reply.message}")
    report.seconds = time.monotonic() - started
    return report


class _VictimReply:
    """One victim stream: its id and tokens; it must finish by itself (length or stop)."""

    problem: str | None = None

    def run(self, client: Client, data: bytes, shared: Shared, marker: str) -> None:
        try:
            sock = socket.create_connection((client.host, client.port), timeout=client.options.timeout_s)
        except OSError as err:
            self.problem = f"cannot connect: {err}"
            return
        rid = None
        try:
            sock.sendall(data)
            response = http.client.HTTPResponse(sock, method="POST")
            response.begin()
            if response.status != 200:
                self.problem = f"a victim stream got {response.status} {_message_of(response.read(BODY_LIMIT))!r}"
                return
            finish = None
            while True:
                line = response.readline(BODY_LIMIT)
                if not line or line.strip() == b"data: [DONE]":
                    break
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    finish = f"error {event['error']}"
                    continue
                if rid is None and event.get("id"):
                    rid = event["id"]
                    with shared.lock:
                        shared.live.append(rid)
                        shared.victims[rid] = marker
                        shared.issued[rid] += 1
                finish = event["choices"][0].get("finish_reason") or finish
            if finish not in ("length", "stop"):
                self.problem = f"a victim stream ({rid}) ended with {finish!r}, expected length or stop"
        except (OSError, http.client.HTTPException, ValueError) as err:
            self.problem = f"a victim stream ({rid}) broke: {type(err).__name__}: {err}"
        finally:
            sock.close()
            if rid is not None:
                with shared.lock:
                    shared.live.remove(rid)
                    shared.done.append(rid)


def _show(data: bytes) -> str:
    return f"{data[:500]!r}{'...' if len(data) > 500 else ''} ({len(data)} bytes)"
