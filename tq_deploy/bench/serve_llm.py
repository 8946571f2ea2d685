"""tq-deploy bench serve --model LLM: concurrent token streams against the LLM server.

    tq-deploy bench serve --model smollm2.onnx --concurrency 1 8 32     # start a server here, one row each
    tq-deploy bench serve --url http://127.0.0.1:8000 --concurrency 8   # a running tq-deploy serve (LLM)

Each of N client threads streams completions back to back through the OpenAI-compatible endpoint
(SSE, one HTTP connection each), greedy, prompts cut from the shipped public-domain texts at
varied lengths (--prompt-tokens, in words, uniformly between its two bounds). For the requests
that finish within --seconds after a --warmup: time to first token (TTFT) and the gaps between
tokens (inter-token latency) as the client sees them, p50 and p99; generated tokens per second
over all streams; and the largest number of sequences the server's pool held at once (its /stats).
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np


def shipped_words() -> list[str]:
    from tq_deploy.eval.model import SHIPPED_TEXTS, shipped_text_path

    words = []
    for name in sorted(SHIPPED_TEXTS):
        words += shipped_text_path(SHIPPED_TEXTS[name]).read_text(encoding="utf-8").split()
    return words


def shipped_prompts(count: int, low: int, high: int, seed: int = 0) -> list[str]:
    """``count`` prompts of ``low``..``high`` words, each from a random place of the shipped texts."""
    words = shipped_words()
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        n = rng.randint(low, high)
        start = rng.randrange(0, len(words) - n)
        prompts.append(" ".join(words[start:start + n]))
    return prompts


@dataclass
class StreamResult:
    ttft: float
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    finished: float = 0.0
    error: str | None = None


def stream_completion(base_url: str, prompt: str, max_tokens: int, timeout_s: float = 600.0) -> StreamResult:
    """One streamed completion over SSE (the raw protocol: no client library between the timing and the socket)."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    request = urllib.request.Request(f"{base_url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    result, last = StreamResult(ttft=float("nan")), None
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                result.error = event["error"]["message"]
                break
            ids = event["choices"][0].get("token_ids") or []
            if not ids:
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft = now - start
            else:
                result.gaps.append((now - last) / len(ids))
            last = now
            result.tokens += len(ids)
    result.finished = time.perf_counter()
    return result


def read_stats(base_url: str) -> dict:
    root = base_url[:-3] if base_url.endswith("/v1") else base_url
    with urllib.request.urlopen(f"{root}/stats", timeout=10) as response:
        return json.loads(response.read())


def run_load(base_url: str, concurrency: int, seconds: float, warmup: float, max_tokens: int,
             prompt_words: tuple[int, int], seed: int = 0) -> dict:
    """N threads streaming completions back to back; the measured window's figures (module docstring)."""
    prompts = shipped_prompts(max(64, 4 * concurrency), *prompt_words, seed=seed)
    results: list[StreamResult] = []
    errors: list[str] = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    begin, end = t0 + warmup, t0 + warmup + seconds

    def client(k: int) -> None:
        i = k
        while time.perf_counter() < end:
            try:
                r = stream_completion(base_url, prompts[i % len(prompts)], max_tokens)
            except Exception as err:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{type(err).__name__}: {err}")
                return
            with lock:
                if r.error:
                    errors.append(r.error)
                elif begin <= r.finished <= end:
                    results.append(r)
            i += concurrency

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ttft = np.array([r.ttft for r in results]) * 1e3
    gaps = np.array([g for r in results for g in r.gaps]) * 1e3
    tokens = sum(r.tokens for r in results)

    def pct(values, q):
        return float(np.percentile(values, q)) if len(values) else float("nan")

    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99), "tokens_per_s": tokens / seconds}


def is_llm_run(a) -> bool:
    """Whether ``tq-deploy bench serve`` should drive the LLM server: an http:// --url, or a --model
    that is a checkpoint (folder, GGUF, name) or an exported LLM."""
    if a.url is not None:
        return a.url.startswith(("http://", "https://"))
    if a.model is None:
        return False
    if not a.model.endswith(".onnx"):
        return True
    from tq_deploy.export.loaded import ExportedModel

    return ExportedModel.load(a.model).kind == "llm"


def run(a) -> int:
    """The LLM rows of ``tq-deploy bench serve`` (module docstring)."""
    import platform
    import subprocess
    import sys

    from tq_deploy.bench.serve import _free_ports

    if any(c < 1 for c in a.concurrency):
        raise ValueError(f"--concurrency {a.concurrency}, expected values >= 1")
    if a.max_tokens < 1:
        raise ValueError(f"--max-tokens {a.max_tokens}, expected >= 1")
    low, high = a.prompt_words
    if not 1 <= low <= high <= 4000:
        raise ValueError(f"--prompt-words {low} {high}, expected 1 <= LOW <= HIGH <= 4000")
    if not a.seconds > 0 or a.warmup < 0:
        raise ValueError(f"--seconds {a.seconds} / --warmup {a.warmup}, expected > 0 / >= 0")
    process = None
    base = a.url.rstrip("/") if a.url else None
    try:
        if base is None:
            http, grpc, metrics = _free_ports(3)
            args = [sys.executable, "-m", "tq_deploy.cli", "serve", "--model", a.model, "--provider", a.provider,
                    "--kv-memory", str(a.kv_memory), "--http-port", str(http), "--grpc-port", str(grpc),
                    "--metrics-port", str(metrics), "--max-sequences", str(max(256, max(a.concurrency)))]
            if a.threads:
                args += ["--threads", str(a.threads)]
            print(f"starting tq-deploy serve --model {a.model} ({a.provider.upper()} EP, --kv-memory {a.kv_memory} "
                  "GiB) ...", flush=True)
            process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            ready = None
            for line in process.stdout:
                if "ready:" in line:
                    ready = line.strip()
                    break
            if ready is None:
                raise RuntimeError(f"tq-deploy serve exited with status {process.wait()} before it was ready")
            print(ready, flush=True)
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            base = f"http://127.0.0.1:{http}"
        base = base[:-3] if base.endswith("/v1") else base
        print(f"{platform.node()}: {', '.join(str(c) for c in a.concurrency)} concurrent streams, greedy, "
              f"{a.max_tokens} new tokens, prompts of {low}..{high} words from the shipped texts; "
              f"{a.warmup:g} s warm-up, {a.seconds:g} s measured per row")
        print(f"{'streams':>7} {'requests':>8} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8} "
              f"{'tokens/s':>9} {'peak seqs':>9} {'errors':>6}")
        failed = False
        for n in a.concurrency:
            peak, stop = [0], threading.Event()

            def sample():
                while not stop.wait(0.1):
                    try:
                        peak[0] = max(peak[0], read_stats(base)["running"])
                    except OSError:
                        pass

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            row = run_load(base, n, a.seconds, a.warmup, a.max_tokens, (low, high),
                           a.seed)
            stop.set()
            sampler.join()
            failed |= row["errors"] > 0
            print(f"{n:>7} {row['requests']:>8} {row['ttft_p50_ms']:>7.1f}ms {row['ttft_p99_ms']:>6.1f}ms "
                  f"{row['itl_p50_ms']:>6.1f}ms {row['itl_p99_ms']:>6.1f}ms {row['tokens_per_s']:>9.1f} "
                  f"{peak[0]:>9} {row['errors']:>6}", flush=True)
            if row["first_error"]:
                print(f"  first error: {row['first_error']}", flush=True)
        return 1 if failed else 0
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
