"""Client side of the LLM server's gRPC protocol (tritonclient): the request tensors and the text back.

    with grpcclient.InferenceServerClient("127.0.0.1:8001") as client:
        for piece in stream_generate(client, "The capital of France is", max_tokens=16):
            print(piece.text, piece.token_ids, piece.finish_reason)

Text is UTF-8 in UINT8 tensors (tq_deploy.serve.tritonserver_llm says why); ``stop`` strings are
joined by NUL bytes.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

MODEL = "tq_llm"


@dataclass
class Piece:
    text: str
    token_ids: list[int]
    finish_reason: str  # "" until the last response
    id: str


def _utf8(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def request_inputs(prompt: str | Sequence[int], max_tokens: int | None = None, temperature: float | None = None,
                   top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = (),
                   stream: bool = True) -> list:
    import tritonclient.grpc as grpcclient

    def tensor(name, array, kind):
        item = grpcclient.InferInput(name, list(array.shape), kind)
        item.set_data_from_numpy(array)
        return item

    inputs = [tensor("text_input", _utf8(prompt), "UINT8") if isinstance(prompt, str)
              else tensor("input_ids", np.asarray(prompt, dtype=np.int64), "INT64")]
    if max_tokens is not None:
        inputs.append(tensor("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32"))
    if temperature is not None:
        inputs.append(tensor("temperature", np.array([temperature], dtype=np.float32), "FP32"))
    if top_p is not None:
        inputs.append(tensor("top_p", np.array([top_p], dtype=np.float32), "FP32"))
    if seed is not None:
        inputs.append(tensor("seed", np.array([seed], dtype=np.int64), "INT64"))
    if stop:
        inputs.append(tensor("stop", _utf8("\0".join(stop)), "UINT8"))
    inputs.append(tensor("stream", np.array([stream], dtype=bool), "BOOL"))
    return inputs


def piece_of(result) -> Piece:
    def text(name):
        array = result.as_numpy(name)
        return "" if array is None else array.astype(np.uint8).tobytes().decode("utf-8")

    ids = result.as_numpy("token_ids")
    return Piece(text("text_output"), [] if ids is None else [int(t) for t in ids.reshape(-1)],
                 text("finish_reason"), text("id"))


def stream_generate(client, prompt, timeout_s: float = 300.0, **options) -> Iterator[Piece]:
    """Pieces of one request over ``client``'s bidirectional stream (one stream per call); an error
    response raises tritonclient's InferenceServerException."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(MODEL, request_inputs(prompt, stream=True, **options))
        while True:
            result, error = results.get(timeout=timeout_s)
            if error is not None:
                raise error
            piece = piece_of(result)
            yield piece
            if piece.finish_reason:
                return
    finally:
        client.stop_stream(cancel_requests=True)
