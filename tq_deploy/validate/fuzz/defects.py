"""Defects: one way to make a case's call invalid, and who must refuse it.

Which defects an op can carry follows from its contract (:mod:`tq_deploy.ops`): the inputs and
attributes it has, named the same in every op. :data:`DEFECTS` lists each defect with the
contract names it needs, in the order the random choice draws from (so a seed replays).
"""

from __future__ import annotations

import numpy as np

from tq_deploy.validate.fuzz.case import Case

# (defect, the input or attribute names an op must have for it; any one of a tuple's members)
DEFECTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bits-range", ()), ("bits-float", ()), ("rotation-size", ()), ("codebook-size", ()),
    ("codebook-order", ()), ("codebook-nan", ()), ("rank", ()), ("unknown-attribute", ()),
    ("packed-size", ("codes", "k_codes")),
    ("ctx-negative", ("context_lens",)), ("ctx-over", ("context_lens",)), ("table-entry", ("block_tables",)),
    ("heads", ("query",)),
    ("scale-negative", ("scale",)), ("scale-nan", ("scale",)), ("scale-int", ("scale",)),
    ("table-dtype", ("block_tables",)),
    ("norms-shape", ("norms", "block_tables")),  # norms the op reads (a cache write only overwrites them)
    ("slot-over", ("slot_mapping",)), ("value-shape", ("value",)), ("value-dtype", ("value",)),
    ("slot-dtype", ("slot_mapping",)),
    ("norms-dtype", ("norms",)),
    ("x-scalar", ("x",)), ("x-dtype", ("x",)),
    ("query-start", ("query_start",)),
)


def defects_of(spec) -> list[str]:
    """The defects an op can carry, in draw order."""
    names = set(spec.input_names()) | {a.name for a in spec.attributes}
    return [defect for defect, needs in DEFECTS if not needs or names & set(needs)]


def add_defect(rng, case: Case) -> None:
    """Make ``case`` invalid in one way, and say who must refuse it."""
    inp = case.inputs
    bits_attrs = [a for a in case.attrs if a.endswith("bits")]
    books = [k for k in inp if k.endswith("codebook")]
    defects = defects_of(case.spec)
    defect = str(rng.choice(defects))
    both, data = True, False
    if defect == "bits-range":
        name = str(rng.choice(bits_attrs))
        case.attrs[name] = (int(rng.choice([0, 9, -1, 16])), "int")
    elif defect == "bits-float":
        name = str(rng.choice(bits_attrs))
        case.attrs[name] = (float(case.attrs[name][0]), "float")
    elif defect == "rotation-size":
        # an op that reads D from the rotation alone (TQDecode): only a size that changes the packed size is wrong
        d = inp["rotation"].shape[0] + (8 if "codes" in inp else int(rng.choice([-1, 1, 8])))
        inp["rotation"] = np.eye(max(d, 1), dtype=np.float32)
    elif defect == "codebook-size":
        name = str(rng.choice(books))
        inp[name] = np.sort(rng.uniform(-1, 1, inp[name].size * 2)).astype(np.float32)
    elif defect == "codebook-order":
        name = str(rng.choice(books))
        inp[name] = inp[name][::-1].copy()
        data = True
    elif defect == "codebook-nan":
        name = str(rng.choice(books))
        inp[name] = inp[name].copy()
        inp[name][int(rng.integers(0, inp[name].size))] = np.nan
        data = True
    elif defect == "rank":
        # x, codes and norms take any number of leading dims: a rank change is valid there
        name = str(rng.choice([k for k in inp if k not in ("x", "codes", "norms")]))
        a = inp[name]
        inp[name] = a[None] if a.ndim <= 1 or rng.random() < 0.5 else a.reshape(-1)
    elif defect == "unknown-attribute":
        case.attrs[str(rng.choice(["scal", "bit", "kbits", "alpha"]))] = (1, "int")
        both = False  # a keyword the PyTorch API does not have: nothing to call it with
    elif defect == "packed-size":
        name = "codes" if "codes" in inp else str(rng.choice(["k_codes", "v_codes"]))
        a = inp[name]
        inp[name] = np.zeros((*a.shape[:-1], a.shape[-1] + 1), np.uint8)
    elif defect == "ctx-negative":
        if not inp["context_lens"].size:
            return add_defect(rng, case)
        inp["context_lens"] = inp["context_lens"].copy()
        inp["context_lens"][int(rng.integers(0, inp["context_lens"].size))] = -int(rng.integers(1, 100))
        data = True
    elif defect == "ctx-over":
        if not inp["context_lens"].size:
            return add_defect(rng, case)
        m, b = inp["block_tables"].shape[1], inp["k_codes"].shape[1]
        inp["context_lens"] = inp["context_lens"].copy()
        inp["context_lens"][int(rng.integers(0, inp["context_lens"].size))] = m * b + int(rng.integers(1, 50))
        data = True
    elif defect == "table-entry":
        ctx, tables = inp["context_lens"], inp["block_tables"].copy()
        b, n = inp["k_codes"].shape[1], inp["k_codes"].shape[0]
        used = [(i, j) for i in range(tables.shape[0]) for j in range(-(-int(ctx[i]) // b))]
        if not used:
            return add_defect(rng, case)
        i, j = used[int(rng.integers(0, len(used)))]
        tables[i, j] = int(rng.choice([-1, n, n + 7, -(2**31), 2**31 - 1]))
        inp["block_tables"] = tables
        data = True
    elif defect == "heads":
        q = inp["query"]
        hkv = inp["k_codes"].shape[2]
        if hkv == 1:
            inp["query"] = np.zeros((q.shape[0], 0, q.shape[2]), q.dtype)
        else:
            inp["query"] = np.zeros((q.shape[0], q.shape[1] + 1, q.shape[2]), q.dtype)
    elif defect == "scale-negative":
        case.attrs["scale"] = (-float(rng.uniform(0.01, 2)), "float")
    elif defect == "scale-nan":
        case.attrs["scale"] = (float(rng.choice([np.nan, np.inf])), "float")
    elif defect == "scale-int":
        case.attrs["scale"] = (int(rng.integers(1, 4)), "int")
        both = False  # a Python int is a number to the PyTorch API; an INT attribute is refused in ONNX
    elif defect == "table-dtype":
        inp["block_tables"] = inp["block_tables"].astype(np.int64)
    elif defect == "norms-shape":
        name = "norms" if "norms" in inp else str(rng.choice(["k_norms", "v_norms"]))
        a = inp[name]
        inp[name] = np.zeros((*a.shape[:-1], a.shape[-1] + 1) if a.ndim else (1,), np.float32)
    elif defect == "slot-over":
        if not inp["slot_mapping"].size:
            return add_defect(rng, case)
        n, b = inp["k_codes"].shape[:2]
        inp["slot_mapping"] = inp["slot_mapping"].copy()
        inp["slot_mapping"][int(rng.integers(0, inp["slot_mapping"].size))] = n * b + int(rng.integers(0, 5))
        data = True
    elif defect == "value-shape":
        v = inp["value"]
        inp["value"] = np.zeros((v.shape[0] + 1, *v.shape[1:]), v.dtype)
    elif defect == "value-dtype":
        inp["value"] = inp["value"].astype(np.float16 if inp["value"].dtype == np.float32 else np.float32)
    elif defect == "slot-dtype":
        inp["slot_mapping"] = inp["slot_mapping"].astype(np.float32)
    elif defect == "norms-dtype":
        inp["norms"] = inp["norms"].astype(np.float64)
    elif defect == "x-scalar":
        inp["x"] = np.asarray(1.0, inp["x"].dtype)
    elif defect == "x-dtype":
        inp["x"] = inp["x"].astype(np.float64)
    elif defect == "query-start":
        starts = inp["query_start"].copy()
        if starts.size < 2:
            return add_defect(rng, case)
        i = int(rng.integers(0, starts.size))
        starts[i] = int(rng.choice([-1, starts[-1] + 1, int(inp["query"].shape[0]) + 5]))
        if np.array_equal(starts, inp["query_start"]):
            return add_defect(rng, case)
        inp["query_start"] = starts
        data = True
    case.defect = defect
    case.ref_refuses = both
    case.ort_refuses = True
    case.data_defect = data
