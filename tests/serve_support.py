"""Shared pieces of the serving tests (test_serve*.py): one exported model per test run, the
PyTorch reference run of a sequence, free ports, the server's pool gauges."""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import socket
import tempfile
import urllib.request

import numpy as np
import pytest
import torch

from tq_deploy.reference.model import TQDecodeModel, TQModelConfig
from tq_deploy.reference.paged import PagedTQCache, allocate_cache

# Small and fast, with blocks of 8 tokens so that short sequences cross block boundaries, GQA 2,
# and different key/value bits.
CONFIG = TQModelConfig(hidden_size=64, num_q_heads=4, num_kv_heads=2, head_dim=32, k_bits=4, v_bits=3,
                       block_size=8, num_blocks=16, max_blocks_per_seq=8, seed=5)
TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}  # as tests/test_ort_model.py: ties may flip a code

_exported: dict[str, str] = {}


def exported_model() -> str:
    """Path of CONFIG's decode model, exported once per test process."""
    if "path" not in _exported:
        from tq_deploy.export import export_model

        folder = tempfile.mkdtemp(prefix="tq-serve-tests-")
        atexit.register(shutil.rmtree, folder, True)
        path = os.path.join(folder, "model.onnx")
        export_model(CONFIG, path)
        _exported["path"] = path
    return _exported["path"]


def library_or_skip() -> str:
    from tq_deploy.runtime import library

    try:
        return library.locate("ort")
    except library.NativeLibraryNotFoundError as err:
        pytest.skip(f"custom-op library not built: {err}")


def fresh_seed() -> int:
    value = int(os.environ.get("TQ_TEST_SEED", secrets.randbits(31)))
    print(f"fresh seed={value}")
    return value


class ReferenceSequence:
    """One sequence decoded by the PyTorch reference on a private cache, token by token."""

    def __init__(self, model: TQDecodeModel, max_tokens: int):
        c = model.config
        self.model = model
        self.blocks = -(-max_tokens // c.block_size)
        self.cache = allocate_cache(self.blocks, c.block_size, c.num_kv_heads, c.head_dim, c.k_bits, c.v_bits)
        self.length = 0

    @torch.no_grad()
    def step(self, hidden: np.ndarray) -> np.ndarray:
        t = self.length
        out, *caches = self.model(torch.from_numpy(hidden.reshape(1, -1)), torch.tensor([t]), torch.tensor([t]),
                                  torch.arange(self.blocks, dtype=torch.int32)[None], torch.tensor([t + 1], dtype=torch.int32),
                                  *self.cache.tensors())
        self.cache = PagedTQCache(*caches)
        self.length += 1
        return out[0].numpy()


def reference_outputs(hiddens: list[np.ndarray]) -> list[np.ndarray]:
    """The reference's output for each token of one sequence (hiddens: one [H] array per token)."""
    sequence = ReferenceSequence(TQDecodeModel(CONFIG).eval(), len(hiddens))
    return [sequence.step(h) for h in hiddens]


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def pool_gauges(metrics_url: str) -> dict[str, float]:
    """The server's tq_pool_* gauges: {"free": ..., "total": ..., "sequences": ...}."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r'tq_pool_blocks\{.*state="(\w+)".*\} (\S+)', line)
        if match:
            values[match.group(1)] = float(match.group(2))
        match = re.match(r"tq_pool_sequences\{.*\} (\S+)", line)
        if match:
            values["sequences"] = float(match.group(1))
    return values
