"""The LLM server (`tq-deploy serve --model LLM.onnx`) on the CPU, end to end through real clients.

One server for the module: a tiny random Llama with SmolLM2's tokenizer, exported here, served by
the real CLI with a pool of 64 blocks of 8 tokens (smaller than the model's context, so that the
pool is what a too-long prompt meets) and small prompt chunks (--chunk-size 16, --step-tokens 32),
so that prompts are prefilled over several steps beside other sequences' decode.

- 8 concurrent streams through tritonclient (gRPC streaming) and 8 through the `openai` package
  (SSE): each stream's greedy tokens equal `generate` of the same prompt alone (same chunk size),
  though they share steps, and some wait for the pool;
- faults without stopping the server: a client that leaves mid-stream frees its blocks (HTTP and
  gRPC), a prompt longer than the pool gets one clear 4xx line while another stream goes on, and
  hostile bodies get 4xx; the admin APIs are closed; then SIGTERM ends the server cleanly with a
  stream in flight.
A load test (TQ_DEPLOY_LOAD_TEST=1; not in CI) holds 32 streams for 2 minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_support import ServeProcess, free_ports, tritonserver_or_skip

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

BLOCKS, BLOCK_SIZE, CHUNK = 64, 8, 16
NEW_TOKENS = 12


def _server_or_skip():
    pytest.importorskip("tritonclient.grpc")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    tritonserver_or_skip()


EXPORT_FLAGS = dict(k_bits=4, v_bits=3, block_size=BLOCK_SIZE, seed=11)


def export_tiny_llm(folder):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer in ``folder``, exported with EXPORT_FLAGS:
    (path of the .onnx, the tokenizer)."""
    from llama_support import random_checkpoint

    from tq_deploy.export.llm import export_llm
    from tq_deploy.models import load_tokenizer

    random_checkpoint(folder, seed=5, vocab_size=49152, head_dim=16, hidden_size=64, num_attention_heads=4,
                      tie_word_embeddings=True, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    tokenizer = load_tokenizer("smollm2")
    tokenizer.save_pretrained(folder)
    path = str(folder / "model.onnx")
    export_llm(str(folder), path, **EXPORT_FLAGS)
    return path, tokenizer


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """(path of the exported tiny LLM, its tokenizer, the checkpoint folder)."""
    _server_or_skip()
    folder = tmp_path_factory.mktemp("tiny-llama")
    path, tokenizer = export_tiny_llm(folder)
    return path, tokenizer, str(folder)


def kv_memory_for(blocks: int, path: str) -> str:
    from tq_deploy.serve.engine import pool_size

    block_bytes = pool_size(path, 1.0).block_bytes
    return repr((blocks + 0.5) * block_bytes / 2**30)


class LLMServer(ServeProcess):
    """``tq-deploy serve --model LLM`` in a subprocess, ready when constructed."""

    def __init__(self, model: str, *extra: str, kv_memory: str):
        self.http, self.grpc, self.metrics = free_ports(3)
        args = [sys.executable, "-m", "tq_deploy.cli", "serve", "--model", model, "--kv-memory", kv_memory,
                "--chunk-size", str(CHUNK), "--step-tokens", str(2 * CHUNK),
                "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
                "--threads", "1", "--wait-timeout", "120", *extra]
        super().__init__(args)
        self.wait_ready(180)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.base}/stats", timeout=10) as response:
            return json.loads(response.read())

    def wait_empty(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats["running"] == 0 and stats["waiting"] == 0 and stats["free_blocks"] == stats["num_blocks"]:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"the pool did not empty in {timeout} s: {stats}")
            time.sleep(0.1)

    def stop(self, signum=signal.SIGTERM, timeout: float = 90.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


@pytest.fixture(scope="module")
def server(llm):
    """The checkpoint folder, exported by serve with the width flags export takes: the same graph as llm[0]."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in EXPORT_FLAGS.items()]
    s = LLMServer(llm[2], *flags, kv_memory=kv_memory_for(BLOCKS, llm[0]))
    yield s
    s.stop()


def prompts_of(tokenizer, count: int, seed: int) -> list[str]:
    """Prompts from the shipped texts, 3..60 words: 4 to about 90 tokens, so 1 to 6 chunks of 16."""
    from tq_deploy.bench.serve_llm import shipped_prompts

    return shipped_prompts(count, 3, 60, seed=seed)


def alone(path: str, prompt, max_new_tokens: int = NEW_TOKENS) -> list[int]:
    """Greedy tokens of ``generate`` for the prompt by itself, with the server's chunk size."""
    from tq_deploy.runtime.generate import generate

    return generate(path, prompt, max_new_tokens=max_new_tokens, chunk_size=CHUNK)[0].tokens


def test_ready_line(server):
    assert any("exporting" in line for line in server.lines)  # the folder was exported first
    ready = next(line for line in server.lines if "ready:" in line)
    assert f"OpenAI base URL http://127.0.0.1:{server.http}/v1" in ready
    assert f"{BLOCKS} blocks x {BLOCK_SIZE} = {BLOCKS * BLOCK_SIZE} tokens" in ready
    assert "fp16 cache holds" in ready


def test_tritonclient_streams_equal_generate_alone(llm, server):
    import tritonclient.grpc as grpcclient

    from tq_deploy.serve.llm_client import stream_generate

    path, tokenizer, _ = llm
    prompts = prompts_of(tokenizer, 8, seed=1)

    def one(prompt):
        with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}") as client:
            pieces = list(stream_generate(client, prompt, max_tokens=NEW_TOKENS))
        return pieces

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, prompts))
    for prompt, pieces in zip(prompts, results):
        ids = [t for p in pieces for t in p.token_ids]
        assert ids == alone(path, prompt), prompt
        assert pieces[-1].finish_reason in ("length", "stop")
        assert len({p.id for p in pieces}) == 1 and len(pieces[0].id) >= 32  # one server-issued id
        assert "".join(p.text for p in pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    server.wait_empty()


def test_openai_streams_equal_generate_alone(llm, server):
    openai = pytest.importorskip("openai")
    path, tokenizer, _ = llm
    prompts = prompts_of(tokenizer, 8, seed=2)
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0)

    def one(prompt):
        ids, text = [], []
        for chunk in client.completions.create(model="tq_llm", prompt=prompt, max_tokens=NEW_TOKENS,
                                               temperature=0, stream=True):
            choice = chunk.choices[0]
            ids += (choice.model_extra or {}).get("token_ids") or []
            text.append(choice.text)
        return ids, "".join(text)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, prompts))
    for prompt, (ids, text) in zip(prompts, results):
        assert ids == alone(path, prompt), prompt
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
    # the chat endpoint: the model's chat template, then the same loop
    reply = client.chat.completions.create(model="tq_llm", messages=[{"role": "user", "content": "Hello there"}],
                                           max_tokens=NEW_TOKENS, temperature=0)
    template = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                             add_generation_prompt=True, tokenize=False)
    expected = alone(path, template)
    assert reply.choices[0].model_extra["token_ids"] == expected
    assert reply.usage.completion_tokens == len(expected)
    server.wait_empty()


def test_stop_strings_and_seeded_sampling(llm, server):
    from tq_deploy.runtime.generate import generate

    path, tokenizer, _ = llm
    prompt = "It is a truth universally acknowledged"
    full = generate(path, prompt, max_new_tokens=NEW_TOKENS, chunk_size=CHUNK)[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full.index(stop)

    def post(fields):
        request = urllib.request.Request(f"{server.base}/v1/completions", data=json.dumps(fields).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["choices"][0]

    answer = post({"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stop": [stop]})
    assert answer["text"] == full[:cut] and answer["finish_reason"] == "stop"
    sampled = generate(path, prompt, max_new_tokens=NEW_TOKENS, temperature=0.9, top_p=0.95, seed=1234,
                       chunk_size=CHUNK)[0].tokens
    answer = post({"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.9, "top_p": 0.95, "seed": 1234})
    assert answer["token_ids"] == sampled
    server.wait_empty()


def test_client_leaving_mid_stream_frees_its_blocks(llm, server):
    import tritonclient.grpc as grpcclient

    from tq_deploy.serve.llm_client import stream_generate

    # HTTP: read two events of a long stream, then close the connection
    cancelled = server.stats()["cancelled"]
    body = json.dumps({"prompt": "It is a truth universally acknowledged", "max_tokens": 400, "temperature": 0,
                       "stream": True}).encode()
    request = urllib.request.Request(f"{server.base}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    response = urllib.request.urlopen(request, timeout=60)
    events = 0
    for raw in response:
        events += raw.startswith(b"data: ")
        if events == 2:
            break
    assert server.stats()["running"] == 1
    response.close()
    stats = server.wait_empty()
    assert stats["free_blocks"] == BLOCKS and stats["cancelled"] == cancelled + 1
    # HTTP without streaming: hang up while the answer is being made
    import socket

    body = json.dumps({"prompt": "Call me Ishmael", "max_tokens": 500, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", server.http), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.monotonic() + 30
    while server.stats()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    sock.close()
    assert server.wait_empty()["cancelled"] == cancelled + 2
    # gRPC: leave the stream after two pieces (stop_stream cancels the request)
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}") as client:
        for k, _piece in enumerate(stream_generate(client, "Once upon a time", max_tokens=400)):
            if k == 1:
                break
    assert server.wait_empty()["cancelled"] == cancelled + 3


def test_prompt_longer_than_pool_is_one_clear_error_others_go_on(llm, server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from tq_deploy.serve.llm_client import stream_generate

    path, tokenizer, _ = llm
    words = " ".join(["word"] * (BLOCKS * BLOCK_SIZE + 50))
    assert BLOCKS * BLOCK_SIZE < len(tokenizer(words).input_ids) < 1024  # the pool, not the context, refuses it
    other = prompts_of(tokenizer, 1, seed=3)[0]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: [t for p in stream_generate(
            grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}"), other, max_tokens=NEW_TOKENS)
            for t in p.token_ids])
        body = json.dumps({"prompt": words, "max_tokens": 4}).encode()
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(urllib.request.Request(f"{server.base}/v1/completions", data=body), timeout=60)
        assert caught.value.code == 400
        message = json.loads(caught.value.read())["error"]["message"]
        assert f"expected at most {BLOCKS * BLOCK_SIZE} (the KV-cache pool" in message and "\n" not in message
        with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}") as client:
            with pytest.raises(InferenceServerException, match="the KV-cache pool"):
                list(stream_generate(client, words, max_tokens=4))
        assert running.result(timeout=120) == alone(path, other)
    server.wait_empty()


@pytest.mark.parametrize("body, status, words", [
    (b"[" * 5000 + b"]" * 5000, 400, "nests deeper"),
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "expected an object"),
    (json.dumps({"prompt": 5}).encode(), 400, "prompt=5"),
    (json.dumps({"prompt": "hi", "max_tokens": 10**30}).encode(), 400, "max_tokens="),
    (json.dumps({"prompt": "hi", "temperature": -1}).encode(), 400, "temperature=-1"),
    (json.dumps({"prompt": "hi", "seed": 1.5}).encode(), 400, "seed=1.5"),
    (json.dumps({"prompt": [1, 10**9]}).encode(), 400, "token id 1000000000"),
    (json.dumps({"prompt": "hi", "model": "other"}).encode(), 400, "model='other'"),
    (json.dumps({"prompt": "hi", "stop": [""]}).encode(), 400, "stop="),
    (json.dumps({"prompt": "hi", "logprobs": 3}).encode(), 400, "logprobs=3 is not supported"),
    (json.dumps({"prompt": "hi", "n": 2}).encode(), 400, "n=2, expected 1"),
])
def test_hostile_bodies_get_one_line_4xx(server, body, status, words):
    request = urllib.request.Request(f"{server.base}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == status
    message = json.loads(caught.value.read())["error"]["message"]
    assert words in message and "\n" not in message
    assert server.stats()["running"] == 0  # and the server answers


def test_a_huge_body_is_refused_before_it_is_read(server):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.http, timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(10**9))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    assert "request body of 1000000000 bytes" in json.loads(response.read())["error"]["message"]
    connection.close()
    assert server.stats()["running"] == 0


def test_admin_apis_are_closed_and_tritonserver_http_is_not_exposed(server):
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}") as client:
        assert client.is_model_ready("tq_llm")
        # a string tensor where the model takes UTF-8 bytes: refused by tritonserver before the model
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
        results = []
        client.start_stream(callback=lambda result, error: results.append(error))
        client.async_stream_infer("tq_llm", [text])
        deadline = time.monotonic() + 30
        while not results and time.monotonic() < deadline:
            time.sleep(0.05)
        client.stop_stream()
        assert results and "data-type is 'BYTES', but model 'tq_llm' expects 'UINT8'" in str(results[0]), results
        assert client.is_model_ready("tq_llm")
        for call in (lambda: client.get_model_config("tq_llm"), lambda: client.get_log_settings(),
                     lambda: client.get_system_shared_memory_status(), lambda: client.get_trace_settings(),
                     lambda: client.get_model_repository_index()):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
    # the HTTP port is the front end's: tritonserver's own infer endpoint is not there
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(urllib.request.Request(f"{server.base}/v2/models/tq_llm/infer", data=b"{}"),
                               timeout=10)
    assert caught.value.code in (404, 405)


def test_triton_generate_endpoints(llm, server):
    path, _, _ = llm
    body = json.dumps({"text_input": "The sea", "max_tokens": 5}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{server.base}/v2/models/tq_llm/generate", data=body),
                                timeout=60) as response:
        answer = json.loads(response.read())
    assert answer["token_ids"] == alone(path, "The sea", 5) and answer["finish_reason"] in ("length", "stop")
    with urllib.request.urlopen(urllib.request.Request(f"{server.base}/v2/models/tq_llm/generate_stream",
                                                       data=body), timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.read().decode().splitlines()
                  if line.startswith("data: {")]
    assert [t for e in events for t in e["token_ids"]] == answer["token_ids"]


@pytest.mark.xfail(strict=False, reason="known bug: on a loaded machine tritonserver sometimes exits 1 after the "
                   "stream ended (the LLM model's finalize outlives tritonserver's exit timeout); the stream part "
                   "of this test passes every time")
def test_sigterm_ends_in_flight_work_and_exits_cleanly(llm, server):
    """Last in this module: it stops the module's server."""
    body = json.dumps({"prompt": "It was the best of times", "max_tokens": 60, "temperature": 0,
                       "stream": True}).encode()
    response = urllib.request.urlopen(urllib.request.Request(f"{server.base}/v1/completions", data=body),
                                      timeout=120)
    first = response.readline()
    assert first.startswith(b"data: ")
    server.process.send_signal(signal.SIGTERM)
    rest = response.read().decode()
    # finished ("length" or "stop") or refused with a clear error, and the stream closed properly
    assert rest.rstrip().endswith("data: [DONE]")
    last = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")][-1]
    assert "error" in last or last["choices"][0]["finish_reason"] in ("length", "stop")
    assert server.stop(timeout=90) == 0
    assert any("stopped (tritonserver exit status 0)" in line for line in server.lines), server.lines


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TQ_DEPLOY_LOAD_TEST"),
                    reason="a 2-minute load test, not in CI: set TQ_DEPLOY_LOAD_TEST=1 to run it")
def test_load_32_streams_for_2_minutes(llm):
    """32 concurrent streams for 120 s: no request lost, the pool empty after, the server's memory flat."""
    from tq_deploy.bench.serve_llm import run_load

    s = LLMServer(llm[0], kv_memory=kv_memory_for(1024, llm[0]))
    try:
        stub = _stub_pid(s.process.pid)
        samples = []
        stop = threading.Event()

        def sample():
            while not stop.wait(5):
                samples.append((time.monotonic(), _rss_mib(stub)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        row = run_load(s.base, 32, seconds=120, warmup=10, max_tokens=32, prompt_words=(8, 200), seed=7)
        stop.set()
        sampler.join()
        stats = s.wait_empty(60)
        after_warmup = [m for _, m in samples[4:]]  # from 20 s on
        print(f"load: {row}; stats {stats}; stub RSS MiB {samples[0][1]:.0f} at 5 s, {after_warmup[0]:.0f} at 25 s, "
              f"max {max(after_warmup):.0f}, last {after_warmup[-1]:.0f}")
        assert row["errors"] == 0 and row["requests"] > 0
        assert stats["peak_running"] >= 32
        assert max(after_warmup) - after_warmup[0] < 0.1 * after_warmup[0] + 64
    finally:
        assert s.stop() == 0


def _stub_pid(cli_pid: int) -> int:
    """The Python-backend stub process under tq-deploy serve (tritonserver's child)."""
    def children(pid):
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return [int(c) for c in f.read().split()]
        except OSError:
            return []

    todo = children(cli_pid)
    while todo:
        pid = todo.pop()
        with open(f"/proc/{pid}/comm") as f:
            if "python_backend" in f.read() or "triton_python" in open(f"/proc/{pid}/cmdline").read():
                return pid
        todo += children(pid)
    raise AssertionError("no Python-backend stub under the server")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
