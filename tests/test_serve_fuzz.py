"""The LLM server under `tq-deploy fuzz-server`: hostile and valid requests, HTTP and gRPC, in parallel.

One server for the module (`tq-deploy serve --model` on the tiny random Llama of test_serve_llm.py,
a pool of 256 blocks of 8 tokens, chunks of 16). The fuzz runs through the real CLI against it
with a fresh seed (TQ_TEST_SEED replays one; every failure prints the seed and the request); then
the bodies that the fuzzer found answered wrongly (a 500 and requests served as something they
were not) are checked one by one, and last the server must stop on SIGTERM with status 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from serve_support import fresh_seed

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

BLOCKS = 256


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_serve_llm import LLMServer, _server_or_skip, export_tiny_llm, kv_memory_for

    _server_or_skip()
    path, _ = export_tiny_llm(tmp_path_factory.mktemp("tiny-llama-fuzz"))
    s = LLMServer(path, kv_memory=kv_memory_for(BLOCKS, path))
    yield s
    s.stop()


def test_probes_are_reproducible_and_cover_every_kind():
    from tq_deploy.serve.fuzz import GRPC_KINDS, HTTP_KINDS, make_probe

    first = [make_probe(3, i, grpc=True) for i in range(600)]
    again = [make_probe(3, i, grpc=True) for i in range(600)]
    assert [p.describe() for p in first] == [p.describe() for p in again]
    assert {p.kind for p in first} == set(HTTP_KINDS + GRPC_KINDS)
    assert [p.describe() for p in first] != [make_probe(4, i, grpc=True).describe() for i in range(600)]


def test_fuzz_keeps_the_server_answering_leak_free_and_its_pool_empty(server, tmp_path):
    seed = fresh_seed()
    report = tmp_path / "fuzz.json"
    done = subprocess.run([sys.executable, "-m", "tq_deploy.cli", "fuzz-server", "--url", server.base, "--grpc",
                           f"127.0.0.1:{server.grpc}", "--seed", str(seed), "--requests", "1000", "--json",
                           str(report)], capture_output=True, text=True, timeout=600)
    print(done.stdout[-6000:], done.stderr[-2000:])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    result = json.loads(report.read_text())
    assert result["passed"] and result["requests"] == 1000
    statuses = result["statuses"]
    # the run reached every layer: answers, refusals by the front end, the HTTP layer and tritonserver
    assert statuses.get("200", 0) > 50 and statuses.get("400", 0) > 50 and statuses.get("404", 0) > 0
    assert statuses.get("grpc 200", 0) > 10 and statuses.get("grpc 400", 0) > 10
    assert result["victims"] >= 2 and result["replayed"] > 20
    assert "PASS: 0 failures" in done.stdout
    assert server.wait_empty()["running"] == 0


@pytest.mark.parametrize("path, body, words", [
    # a 500 (the tokenizer's TypeError) before: JSON escapes can carry a lone surrogate
    ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 1}', "prompt has a lone surrogate"),
    ("/v1/completions", b'{"prompt": "hi", "stop": ["a\\udc00"], "max_tokens": 1}', "stop has a lone surrogate"),
    ("/v2/models/tq_llm/generate", b'{"text_input": "\\udfff"}', "prompt has a lone surrogate"),
    # served as something else before: text in input_ids was tokenized, ids in text_input were a token prompt
    ("/v2/models/tq_llm/generate", b'{"input_ids": "1 2"}', "input_ids='1 2', expected a non-empty list"),
    ("/v2/models/tq_llm/generate_stream", b'{"text_input": [1, 2]}', "text_input=[1, 2], expected a string"),
])
def test_what_the_fuzzer_found_is_one_line_400(server, path, body, words):
    request = urllib.request.Request(f"{server.base}{path}", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 400
    answer = json.loads(caught.value.read())["error"]
    message = answer["message"] if isinstance(answer, dict) else answer
    assert words in message and "\n" not in message


def test_the_server_exits_cleanly_after_the_fuzz(server):
    """Last in this module: it stops the module's server."""
    server.wait_empty()
    assert server.stop(timeout=120) == 0, server.lines[-5:]
    assert any("stopped (tritonserver exit status 0)" in line for line in server.lines), server.lines[-5:]
