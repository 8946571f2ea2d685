"""Shared pieces of the serving tests (test_serve*.py): one exported model per test run, the
PyTorch reference run of a sequence, free ports, the server's pool gauges."""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.request

import numpy as np
import pytest
import torch

from tq_deploy.reference.model import ReferenceOps, TQDecodeModel, TQModelConfig
from tq_deploy.reference.paged import PagedTQCache, allocate_cache, cache_update_reference, paged_attention_reference

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


def tritonserver_or_skip() -> None:
    """Skip (with the reason) where the bundled tritonserver or the libpython its Python backend needs is
    missing, or the custom-op library is not built."""
    from tq_deploy.serve.server import ServeUnavailableError, bundled_tritonserver, libpython_dir

    try:
        bundled_tritonserver()
        libpython_dir()
    except ServeUnavailableError as err:
        pytest.skip(str(err))
    library_or_skip()


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


TIE_DISTANCE = 1e-5  # a rotated unit-vector coordinate this close to a boundary may round either way


class _TakingTies:
    """The reference's ops, with the cache update taking the neighbouring code for the chosen rounding
    ties ({slot: [(kind, head, coordinate, code)]}), as a backend whose float32 rounding differs may."""

    def __init__(self, flips: dict):
        self.flips = flips

    def cache_update(self, key, value, slot_mapping, *rest):
        from tq_deploy.reference.packing import pack_codes, unpack_codes

        caches = cache_update_reference(key, value, slot_mapping, *rest)
        for slot in slot_mapping.tolist():
            for kind, head, coordinate, code in self.flips.get(slot, ()):
                codes, bits = (caches[0], CONFIG.k_bits) if kind == "k" else (caches[2], CONFIG.v_bits)
                row = codes.view(-1, CONFIG.num_kv_heads, codes.shape[-1])[slot, head]
                unpacked = unpack_codes(row, bits, CONFIG.head_dim)
                unpacked[coordinate] = code
                row.copy_(pack_codes(unpacked, bits))
        return caches

    paged_attention = staticmethod(paged_attention_reference)


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


def reference_outputs(hiddens: list[np.ndarray], flips: dict | None = None) -> list[np.ndarray]:
    """The reference's output for each token of one sequence (hiddens: one [H] array per token); with
    ``flips`` ({position: [(kind, head, coordinate, code)]}) taking those neighbouring codes at ties."""
    model = TQDecodeModel(CONFIG, ops=_TakingTies(flips) if flips else ReferenceOps).eval()
    sequence = ReferenceSequence(model, len(hiddens))
    return [sequence.step(h) for h in hiddens]


@torch.no_grad()
def rounding_ties(hiddens: list[np.ndarray]) -> list[tuple]:
    """(position, kind, head, coordinate, the other code) of every key and value coordinate of the sequence
    within TIE_DISTANCE of the boundary between two codes: where a backend may have taken the code on the
    boundary's other side. The synthetic model's keys and values depend on the token alone, so the ties
    of a sequence are independent of each other."""
    from tq_deploy.reference.codebook import codebook_boundaries
    from tq_deploy.reference.quantizer import normalize, quantize_coordinates, rotate

    model = TQDecodeModel(CONFIG).eval()
    ties = []
    for position, hidden in enumerate(hiddens):
        _, k, v = model.project_qkv(torch.from_numpy(hidden.reshape(1, -1)), torch.tensor([position]))
        for kind, x, codebook in (("k", k, model.k_codebook), ("v", v, model.v_codebook)):
            y = rotate(normalize(x[0])[0], model.rotation)  # [Hkv, D], as the reference encodes it
            codes = quantize_coordinates(y, codebook)
            near = ((y[..., None] - codebook_boundaries(codebook)).abs() < TIE_DISTANCE).nonzero().tolist()
            for head, coordinate, j in near:  # boundary j lies between codes j and j + 1
                ties.append((position, kind, head, coordinate, j + 1 if int(codes[head, coordinate]) == j else j))
    return ties


def assert_matches_reference(got: list[np.ndarray], hiddens: list[np.ndarray], what: str = "sequence") -> None:
    """``got`` (one output per token) equals the reference's run of ``hiddens`` to TOLERANCE, or the
    reference's run with some of the sequence's rounding ties (rounding_ties) taken the other way: a
    flipped code moves every later output of the sequence by far more than rounding."""
    import itertools

    got = np.stack(got)
    want = np.stack(reference_outputs(hiddens))
    if np.allclose(got, want, **TOLERANCE):
        return
    ties = rounding_ties(hiddens)[:6]
    for count in range(1, len(ties) + 1):
        for chosen in itertools.combinations(ties, count):
            flips: dict = {}
            for position, *flip in chosen:
                flips.setdefault(position, []).append(tuple(flip))
            if np.allclose(got, np.stack(reference_outputs(hiddens, flips)), **TOLERANCE):
                return
    np.testing.assert_allclose(got, want, err_msg=f"{what} (nor with any of its {len(ties)} rounding ties "
                               "taken the other way)", **TOLERANCE)


class _CacheAsGiven:
    """The reference's ops with a cache update that leaves the cache as a backend wrote it."""

    @staticmethod
    def cache_update(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms, *_):
        return k_codes, k_norms, v_codes, v_norms

    paged_attention = staticmethod(paged_attention_reference)


_MODELS: dict[str, TQDecodeModel] = {}


@torch.no_grad()
def reference_on_codes(hidden: np.ndarray, position: int, state_out: dict) -> np.ndarray:
    """The reference's output for one token of one sequence over the cache a backend left after the step
    (``state_out``: k_codes ... of the sequence's own blocks, [blocks, B, Hkv, P]): teacher-forced on the
    backend's codes, so a rounding tie it flipped earlier is not measured through the reference's own,
    differently rounded history. The new token's codes must be the reference's encode of its key and
    value, rounding ties allowed (tests/codes_match.py)."""
    from codes_match import assert_codes_match

    from tq_deploy.reference.quantizer import encode_reference

    if "model" not in _MODELS:
        _MODELS["model"] = TQDecodeModel(CONFIG, ops=_CacheAsGiven).eval()
    model = _MODELS["model"]
    caches = [torch.from_numpy(np.ascontiguousarray(state_out[n])) for n in ("k_codes", "k_norms", "v_codes", "v_norms")]
    blocks, b = caches[0].shape[0], CONFIG.block_size
    x = torch.from_numpy(hidden.reshape(1, -1))
    pos = torch.tensor([position])
    _, k, v = model.project_qkv(x, pos)
    for new, codes, bits, codebook in ((k, caches[0], CONFIG.k_bits, model.k_codebook),
                                       (v, caches[2], CONFIG.v_bits, model.v_codebook)):
        want, _ = encode_reference(new[0], model.rotation, codebook, bits)
        got = codes[position // b, position % b]
        assert_codes_match(got, want, bits, CONFIG.head_dim, "new token's codes", x=new[0], rot=model.rotation,
                           cb=codebook)
    out, *_ = model(x, pos, pos, torch.arange(blocks, dtype=torch.int32)[None],
                    torch.tensor([position + 1], dtype=torch.int32), *caches)
    return out[0].numpy()


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


class ServeProcess:
    """``tq-deploy serve`` (``args``: its whole command line) in a subprocess; ``lines`` collects its
    output, ``wait_ready`` waits for its "ready:" line or fails the test with what it printed."""

    def __init__(self, args: list[str]):
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if "ready:" in line:
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 120.0) -> None:
        self._ready.wait(timeout)
        if self.process.poll() is not None or not any("ready:" in line for line in self.lines):
            self.process.kill()
            pytest.fail("tq-deploy serve did not get ready:\n" + "\n".join(self.lines))
