"""The LLM server's engine in process, over the real LLMSession of a tiny exported Llama: the step
budget and chunking, waiting for the pool and its timeout, prompts that can never fit, cancellation,
a failing step, shutdown; and `tq-deploy serve`'s refusals at the edge."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from llama_support import random_checkpoint  # noqa: E402

from tq_deploy.runtime.generation import generate_ids  # noqa: E402
from tq_deploy.runtime.sampling import SamplingParams  # noqa: E402
from tq_deploy.serve.engine import ClientError, Engine, Sink, Unavailable  # noqa: E402

BLOCK = 8


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, ort_library):
    from tq_deploy.export.llm import export_llm

    folder = tmp_path_factory.mktemp("llama")
    random_checkpoint(folder, seed=3, head_dim=16, hidden_size=64, num_attention_heads=4)
    path = str(folder / "model.onnx")
    export_llm(str(folder), path, k_bits=4, v_bits=3, block_size=BLOCK, seed=7)
    return path


class Recorder:
    """The real session, with every step's packed rows kept (and an optional failure)."""

    def __init__(self, session, fail_at: int | None = None, delay_s: float = 0.0):
        self.session, self.fail_at, self.delay_s = session, fail_at, delay_s
        self.block_size, self.num_blocks, self.config = session.block_size, session.num_blocks, session.config
        self.vocab_size = session.vocab_size
        self.steps = []

    def step(self, inputs):
        self.steps.append((inputs.query_start.copy(), inputs.positions.copy()))
        if self.fail_at is not None and len(self.steps) == self.fail_at:
            raise RuntimeError("planted failure")
        if self.delay_s:
            threading.Event().wait(self.delay_s)  # a slower model: requests stay in flight long enough to meet
        return self.session.step(inputs)


class Collect(Sink):
    def __init__(self):
        self.tokens, self.reason, self.error = [], None, None
        self.done = threading.Event()

    def token(self, token_id):
        self.tokens.append(token_id)
        return False

    def finish(self, reason, error=None):
        self.reason, self.error = reason, error
        self.done.set()


def session(path, blocks):
    from tq_deploy.runtime.llm_session import LLMSession

    return LLMSession(path, num_blocks=blocks, threads=1)


def prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 96, n).tolist() for n in lengths]


def alone(path, prompt, new, chunk):
    backend = session(path, 64)
    return generate_ids(backend, [prompt], new, chunk_size=chunk)[0].tokens


def run_all(engine, items, new, timeout=120):
    sinks = [Collect() for _ in items]
    for p, s in zip(items, sinks):
        engine.submit(p, new, SamplingParams(), s)
    for s in sinks:
        assert s.done.wait(timeout)
    return sinks


SHORT_TOKENS = 240  # a busy machine may run ~100 steps before the long prompts arrive; 11 chunks follow


def test_budget_chunks_and_decode_interleave(model_path):
    """Prompts of 100 and 60 tokens join 3 decoding sequences under a budget of 24 tokens a step:
    every step keeps the decodes and stays within the budget (two chunks of 16 would pass it; the
    100-token prompt's last 4 leave room for the other's next 16), and every output equals its
    prompt run alone."""
    backend = Recorder(session(model_path, 128))
    engine = Engine(backend, chunk_size=16, step_tokens=24)
    short = prompts(1, [3, 5, 7])
    sinks = [Collect() for _ in short]
    with engine._cond:  # the three prefill in one step (steps[0]; the count below starts after it)
        for p, s in zip(short, sinks):  # long enough to keep decoding through every chunk below, however
            engine.submit(p, SHORT_TOKENS, SamplingParams(), s)  # late this thread submits them
    while not all(len(s.tokens) >= 2 for s in sinks):
        threading.Event().wait(0.01)
    long_prompts = prompts(2, [100, 60])
    long_sinks = [Collect() for _ in long_prompts]
    with engine._cond:  # both long prompts reach the same step (the chunk count below depends on it)
        for p, s in zip(long_prompts, long_sinks):
            engine.submit(p, 6, SamplingParams(), s)
    for s in sinks + long_sinks:
        assert s.done.wait(120)
    engine.close()
    for p, s in zip(short, sinks):
        assert s.tokens == alone(model_path, p, SHORT_TOKENS, 16)
    for p, s in zip(long_prompts, long_sinks):
        assert s.tokens == alone(model_path, p, 6, 16)
    # the steps after the short prompts' prefill that carried a chunk of a long prompt
    chunked = [np.diff(qs) for qs, _ in backend.steps[1:] if int(np.diff(qs).max()) > 1]
    assert sum(int((sizes > 1).sum()) for sizes in chunked) == -(-100 // 16) + -(-60 // 16)  # 7 + 4 chunks
    for sizes in chunked:
        assert int(sizes.sum()) <= 24 and int(sizes.max()) <= 16
        assert int((sizes == 1).sum()) >= 3  # the short sequences kept decoding beside the chunks
    assert engine.pool.free_blocks == 128


def test_waits_for_the_pool_then_runs(model_path):
    """A pool of 6 blocks holds one 30+10-token sequence at a time: the others wait and all finish equal."""
    engine = Engine(session(model_path, 6), chunk_size=16)
    items = prompts(3, [30, 28, 25])
    sinks = run_all(engine, items, 10)
    for p, s in zip(items, sinks):
        assert s.reason == "length" and s.tokens == alone(model_path, p, 10, 16)
    assert engine.snapshot()["peak_running"] == 1 and engine.pool.free_blocks == 6
    engine.close()


def test_wait_timeout_is_a_clear_unavailable(model_path):
    engine = Engine(Recorder(session(model_path, 6), delay_s=0.1), chunk_size=16, wait_timeout_s=0.3)
    first, second = Collect(), Collect()
    engine.submit(prompts(4, [40])[0], 8, SamplingParams(), first)
    engine.submit(prompts(5, [40])[0], 8, SamplingParams(), second)
    assert second.done.wait(30) and first.done.wait(60)
    assert first.reason == "length"
    assert second.reason == "error" and isinstance(second.error, Unavailable)
    assert "waiting for KV-cache space" in str(second.error)
    engine.close()


def test_a_prompt_that_can_never_fit_is_refused_at_once(model_path):
    engine = Engine(session(model_path, 4), chunk_size=16)
    with pytest.raises(ClientError, match=r"prompt has 33 tokens, expected at most 32 \(the KV-cache pool"):
        engine.submit(list(range(33)), 4, SamplingParams(), Collect())
    with pytest.raises(ClientError, match="token id 96"):
        engine.submit([1, 96], 4, SamplingParams(), Collect())
    with pytest.raises(ClientError, match="max_tokens=0"):
        engine.submit([1], 0, SamplingParams(), Collect())
    # prompt + max_tokens past the pool: admitted, ends at the pool's capacity ("length")
    sinks = run_all(engine, [list(range(30))], 50)
    assert sinks[0].reason == "length" and len(sinks[0].tokens) == 3
    assert engine.pool.free_blocks == 4
    engine.close()


def test_cancel_frees_blocks_at_once(model_path):
    engine = Engine(session(model_path, 32), chunk_size=16)
    sink = Collect()
    handle = engine.submit(prompts(6, [20])[0], 200, SamplingParams(), sink)
    while len(sink.tokens) < 3:
        threading.Event().wait(0.01)
    assert engine.cancel(handle.id)
    assert sink.done.wait(10) and sink.reason == "cancelled"
    assert engine.pool.free_blocks == 32 and engine.snapshot()["running"] == 0
    assert not engine.cancel(handle.id) and not engine.cancel("cmpl-guess")
    engine.close()


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(model_path):
    backend = Recorder(session(model_path, 32), fail_at=2)
    engine = Engine(backend, chunk_size=16)
    sinks = run_all(engine, prompts(7, [5, 6]), 4)
    assert all(s.reason == "error" and "planted failure" in str(s.error) for s in sinks)
    later = prompts(8, [9])
    assert run_all(engine, later, 4)[0].tokens == alone(model_path, later[0], 4, 16)
    assert engine.pool.free_blocks == 32
    engine.close()


def test_close_refuses_new_and_ends_what_is_left(model_path):
    engine = Engine(Recorder(session(model_path, 32), delay_s=0.05), chunk_size=16)
    sink = Collect()
    engine.submit(prompts(9, [10])[0], 10_000, SamplingParams(), sink)
    engine.close(drain_timeout_s=0.2)
    assert sink.done.is_set() and sink.reason == "error" and "stopped" in str(sink.error)
    with pytest.raises(Unavailable, match="shutting down"):
        engine.submit([1, 2], 2, SamplingParams(), Collect())


@pytest.mark.parametrize("args, words", [
    (["--host", "999.1.1.1"], "--host '999.1.1.1' is not an IP address"),
    (["--kv-memory", "0"], "argument --kv-memory: 0, expected GiB in (0, 1e5)"),
    (["--kv-memory", "nan"], "argument --kv-memory: nan, expected GiB in (0, 1e5)"),
    (["--chunk-size", "64", "--step-tokens", "32"], "--step-tokens 32, expected >= --chunk-size 64"),
    (["--wait-timeout", "inf"], "argument --wait-timeout: inf, expected seconds in (0, 1e6)"),
    (["--kv-preset", "quality"], "is an exported .onnx with --kv-preset, expected none of them"),
])
def test_serve_refuses_bad_options_in_one_line(model_path, args, words):
    result = subprocess.run([sys.executable, "-m", "tq_deploy.cli", "serve", "--model", model_path, *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
