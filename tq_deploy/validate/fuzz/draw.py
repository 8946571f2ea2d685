"""Drawing cases: random shapes, attributes and hostile values for one op call.

Case ``i`` of seed ``s`` draws from its own generator (``s``, ``i``), so any case replays alone.
The values are what a kernel must survive: zero-size dims, head dims that are not multiples of 8,
any block size, NaN, +-inf, zero vectors, 1e20s and 1e-30s, garbage code bytes with padding bits
set, block tables whose unused entries hold junk, negative and repeated slots, NaN norms in
unused slots. An op with a drawer in :data:`DRAWERS` gets those; any other op of the contract
draws its valid inputs from its ``make_inputs`` entry (:mod:`tq_deploy.ops`) with random sizes,
bit widths, rotation and codebooks, so a new op is fuzzed from the day its entries exist.
"""

from __future__ import annotations

import math

import numpy as np

from tq_deploy import ops
from tq_deploy.validate.fuzz.case import Case, all_ops, stem
from tq_deploy.validate.fuzz.defects import add_defect

DIMS = (2, 3, 5, 8, 13, 16, 24, 64, 72, 100, 128)
DEFECT_RATE = 0.35


def _codebook(rng, dim: int, bits: int) -> np.ndarray:
    """Finite, strictly ascending centroids: any such codebook is valid input (the ops must not
    assume Lloyd-Max ones, whose 8-bit solve also takes seconds). Half spread like the coordinates
    of a unit vector (about 1/sqrt(D)), half over [-1, 1]."""
    spread = 2.0 / math.sqrt(dim) if rng.random() < 0.5 else 1.0
    values = np.sort(rng.uniform(-spread, spread, 2**bits))
    values = values + np.arange(2**bits) * spread * 1e-4  # strictly ascending even where draws coincide
    return values.astype(np.float32)


def _rotation(rng, dim: int) -> np.ndarray:
    if rng.random() < 0.15:  # the ops compute the same formula for any matrix: not checked
        return rng.standard_normal((dim, dim)).astype(np.float32) / math.sqrt(dim)
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def specials(rng, a: np.ndarray, rate: float, values=(np.nan, np.inf, -np.inf, 0.0)) -> np.ndarray:
    """Sprinkle non-finite values and zeros into a float array."""
    if a.size and rng.random() < 0.3:
        mask = rng.random(a.shape) < rate
        a = a.copy()
        a[mask] = rng.choice(values, int(mask.sum()))
    return a


def _vectors(rng, shape, dtype) -> np.ndarray:
    scale = rng.choice([1.0, 1.0, 3.0, 1e-3, 1e20, 1e-30]) if dtype == np.float32 else rng.choice([1.0, 3.0, 1e-3])
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if x.ndim >= 1 and x.shape[-1] and x.size and rng.random() < 0.2:
        x.reshape(-1, x.shape[-1])[0] = 0.0  # a zero vector
    with np.errstate(over="ignore"):
        return specials(rng, x, 0.02).astype(dtype)


def _bits(rng) -> int:
    return int(rng.integers(1, 9))


def _encode_case(rng, index, dim, dtype) -> Case:
    bits = _bits(rng)
    lead = tuple(int(v) for v in rng.integers(0, 5, size=int(rng.integers(1, 3))))
    return Case(index, "TQEncode", {"x": _vectors(rng, (*lead, dim), dtype), "rotation": _rotation(rng, dim),
                                    "codebook": _codebook(rng, dim, bits)}, {"bits": (bits, "int")})


def _decode_case(rng, index, dim, dtype) -> Case:
    bits = _bits(rng)
    lead = tuple(int(v) for v in rng.integers(0, 5, size=int(rng.integers(1, 3))))
    codes = rng.integers(0, 256, (*lead, ops.packed_size(dim, bits)), dtype=np.uint8)  # padding bits too
    norms = specials(rng, rng.uniform(0, 4, lead).astype(np.float32), 0.05, (np.nan, np.inf, 0.0, 1e30))
    return Case(index, "TQDecode", {"codes": codes, "norms": norms, "rotation": _rotation(rng, dim),
                                    "codebook": _codebook(rng, dim, bits)}, {"bits": (bits, "int")})


def _random_cache(rng, n, b, hkv, dim, k_bits, v_bits):
    norms = np.float16 if rng.random() < 0.3 else np.float32  # the cache's norm type (ops.py: TN)
    return {
        "k_codes": rng.integers(0, 256, (n, b, hkv, ops.packed_size(dim, k_bits)), dtype=np.uint8),
        "k_norms": rng.uniform(0, 3, (n, b, hkv)).astype(norms),
        "v_codes": rng.integers(0, 256, (n, b, hkv, ops.packed_size(dim, v_bits)), dtype=np.uint8),
        "v_norms": rng.uniform(0, 3, (n, b, hkv)).astype(norms),
    }


def _cache_update_case(rng, index, dim, dtype) -> Case:
    k_bits, v_bits = _bits(rng), _bits(rng)
    n, b, hkv, t = int(rng.integers(1, 5)), int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.integers(0, 7))
    slots = rng.integers(-1, n * b, t).astype(np.int64)  # negative: skipped; repeats: the last one wins
    rot = _rotation(rng, dim)
    return Case(index, "TQCacheUpdate", {
        "key": _vectors(rng, (t, hkv, dim), dtype), "value": _vectors(rng, (t, hkv, dim), dtype),
        "slot_mapping": slots, **_random_cache(rng, n, b, hkv, dim, k_bits, v_bits), "rotation": rot,
        "k_codebook": _codebook(rng, dim, k_bits), "v_codebook": _codebook(rng, dim, v_bits)},
        {"k_bits": (k_bits, "int"), "v_bits": (v_bits, "int")})


def _attention_case(rng, index, dim, dtype) -> Case:
    k_bits, v_bits = _bits(rng), _bits(rng)
    s, hkv, group = int(rng.integers(0, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 5))
    n, b, m = int(rng.integers(1, 7)), int(rng.integers(1, 6)), int(rng.integers(0, 5))
    if rng.random() < 0.12:  # long contexts: many tiles of the online softmax, and split contexts merged
        s, hkv, b, m = int(rng.integers(1, 3)), 1, 16, int(rng.integers(20, 70))
        n = s * m + 2
    cache = _random_cache(rng, n, b, hkv, dim, k_bits, v_bits)
    ctx = rng.integers(0, m * b + 1, s).astype(np.int32)
    # used entries point into the cache; the others hold junk the kernels must never read
    tables = rng.integers(-(2**31), 2**31 - 1, (s, m), dtype=np.int64).astype(np.int32)
    for i in range(s):
        used = -(-int(ctx[i]) // b)
        tables[i, :used] = rng.integers(0, n, used)
    if rng.random() < 0.3:  # NaN/inf norms: in used slots they reach the output, in unused ones never
        cache["k_norms"] = specials(rng, cache["k_norms"], 0.05, (np.nan, np.inf, 0.0))
        cache["v_norms"] = specials(rng, cache["v_norms"], 0.05, (np.nan, np.inf, 0.0))
    query = (rng.standard_normal((s, hkv * group, dim)) * rng.choice([0.3, 1.0, 2.0])).astype(np.float32)
    attrs = {"k_bits": (k_bits, "int"), "v_bits": (v_bits, "int")}
    if rng.random() < 0.6:
        attrs["scale"] = (float(rng.choice([0.0, rng.uniform(0.01, 0.5)])), "float")
    inputs = {
        "query": specials(rng, query, 0.01, (np.nan, 0.0)).astype(dtype), **cache, "block_tables": tables,
        "context_lens": ctx, "rotation": _rotation(rng, dim), "k_codebook": _codebook(rng, dim, k_bits),
        "v_codebook": _codebook(rng, dim, v_bits)}
    if dim % 2 == 0 and rng.random() < 0.3:  # the optional key mean (ops.py), large like real keys' means
        inputs["key_mean"] = (rng.standard_normal((hkv, dim)) * rng.choice([0.5, 3.0])).astype(np.float32)
        inputs["rope_inv_freq"] = (1.0 / rng.choice([1e4, 1e5]) ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    return Case(index, "TQPagedAttention", inputs, attrs)


def _prefill_case(rng, index, dim, dtype) -> Case:
    """A decode case's cache and tables, with each sequence's last n_s <= context tokens as query rows
    packed along T (zero-row sequences and empty contexts included)."""
    case = _attention_case(rng, index, dim, dtype)
    inp = case.inputs
    ctx = inp["context_lens"]
    rows = [int(rng.integers(0, min(int(c), 8) + 1)) if rng.random() < 0.85 else int(c) for c in ctx]
    starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
    hq = inp["query"].shape[1]
    query = (rng.standard_normal((int(starts[-1]), hq, dim)) * rng.choice([0.3, 1.0, 2.0])).astype(np.float32)
    inputs = {"query": specials(rng, query, 0.01, (np.nan, 0.0)).astype(dtype)}
    for name, value in inp.items():
        if name == "query":
            continue
        inputs[name] = value
        if name == "context_lens":
            inputs["query_start"] = starts
    return Case(index, "TQPagedPrefill", inputs, case.attrs)


def contract_case(rng, index, dim, dtype, op: str) -> Case:
    """A valid call of any op from its ``make_inputs`` entry, with the model-metadata config the
    entry reads (tq_deploy.export.single_op) drawn at random."""
    import torch

    spec = ops.OPS_BY_NAME[op]
    bits = {name: _bits(rng) for name in spec.bit_attributes()}
    hkv, group, block = int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(1, 6))
    lead = [int(v) for v in rng.integers(0, 5, size=int(rng.integers(1, 3)))]
    config = {"op": op, "head_dim": dim, **bits, "dtype": "float16" if dtype == np.float16 else "float32",
              "num_q_heads": hkv * group, "num_kv_heads": hkv, "block_size": block,
              "leading_dims": lead, "scale": 0.0}
    fixed = {"rotation": _rotation(rng, dim)}
    for t in spec.inputs:
        if t.name.endswith("codebook"):  # codebook -> bits, k_codebook -> k_bits
            fixed[t.name] = _codebook(rng, dim, bits[t.name.replace("codebook", "bits")])
    lens = [int(v) for v in rng.integers(0, 3 * block + 1, int(rng.integers(1, 4)))]
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**31)))
    drawn = spec.entry("make_inputs")(config, {k: torch.from_numpy(v) for k, v in fixed.items()}, gen,
                                      context_lens=lens, num_tokens=min(int(rng.integers(1, 7)), 2 * block), leading_sizes=lead)
    values = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in drawn.items()}
    inputs = {t.name: values[t.name] if t.name in values else fixed[t.name] for t in spec.required_inputs()}
    attrs = {name: (value, "int") for name, value in bits.items()}
    if any(a.name == "scale" for a in spec.attributes) and rng.random() < 0.6:
        attrs["scale"] = (float(rng.choice([0.0, rng.uniform(0.01, 0.5)])), "float")
    return Case(index, op, inputs, attrs)


# The ops whose valid calls are drawn by hand, with the hostile values above; the others go
# through contract_case.
DRAWERS = {"TQEncode": _encode_case, "TQDecode": _decode_case, "TQCacheUpdate": _cache_update_case,
           "TQPagedAttention": _attention_case, "TQPagedPrefill": _prefill_case}


def coverage(op_names=None) -> tuple[tuple[str, ...], dict[str, str]]:
    """The ops of ``op_names`` (default: all of the contract) the fuzzer can run, and why each other
    one is left out."""
    from tq_deploy import dispatch

    runnable, left_out = [], {}
    for op in op_names or all_ops():
        spec = ops.OPS_BY_NAME[op]
        if not callable(getattr(dispatch, stem(op), None)):
            left_out[op] = f"tq_deploy.dispatch has no {stem(op)}(): the PyTorch API the fuzzer compares with"
            continue
        if op not in DRAWERS:
            try:
                spec.entry("make_inputs")
            except (ImportError, AttributeError, ValueError) as err:
                left_out[op] = f"its make_inputs entry {spec.make_inputs!r} does not resolve ({err})"
                continue
        runnable.append(op)
    return tuple(runnable), left_out


def draw_case(seed: int, index: int, op_names=None) -> Case:
    """Case ``index`` of ``seed``: a valid call, or about a third of the time one with a defect
    (:mod:`.defects`). ``op_names`` defaults to every op the fuzzer can run (:func:`coverage`)."""
    op_names = tuple(op_names) if op_names else coverage()[0]
    rng = np.random.default_rng([seed, index])
    op = str(rng.choice(list(op_names)))
    dim = int(rng.choice(DIMS))
    dtype = np.float16 if rng.random() < 0.25 else np.float32
    draw = DRAWERS.get(op)
    case = draw(rng, index, dim, dtype) if draw else contract_case(rng, index, dim, dtype, op)
    if rng.random() < DEFECT_RATE:
        add_defect(rng, case)
    return case
