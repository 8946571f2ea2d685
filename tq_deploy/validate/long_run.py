"""Long-run stability of a decode loop in ONNX Runtime: memory stays flat, outputs stay right.

    tq-deploy soak --steps 100000                      # CPU EP
    tq-deploy soak --steps 100000 --provider cuda      # CUDA EP (onnxruntime-gpu, a CUDA build of the library)

One small graph, TQCacheUpdate feeding TQPagedAttention (the decode step's two custom ops), runs
``steps`` times with IO binding: the four cache tensors are bound as inputs and as their own
``*_out`` outputs (updated in place, never copied), the step's inputs are rewritten in place in
pre-bound OrtValues, and the attention output goes to a pre-bound buffer, so a step allocates
nothing on our side. Each of ``S`` sequences owns ``M`` blocks of ``B`` slots used as a ring: token
``t`` goes to ring position ``t % (M * B)`` and attends to the last ``min(t + 1, M * B)`` tokens, so
the cache keeps being overwritten for as long as the run lasts.

Checked at the end:

* resident memory (``VmRSS`` of /proc/self/status) after a warm-up is flat: its growth over the rest
  of the run is under ``max_growth`` (1 %), and so is the device memory in use on CUDA;
* the cache equals the reference's (the last ``M * B`` tokens of every sequence re-encoded by
  :func:`tq_deploy.reference.paged.cache_update_reference`: earlier ones were overwritten), codes
  identical except rounding ties, and the last step's output equals the reference attention over it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from tq_deploy import ops

CACHE = ("k_codes", "k_norms", "v_codes", "v_norms")


def rss_bytes() -> int:
    """Resident set size of this process (VmRSS of /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only)")


def device_bytes_in_use(device_id: int = 0) -> int | None:
    """Bytes in use on CUDA device ``device_id`` (every process), or None without torch CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(device_id)
        return total - free
    except Exception:  # noqa: BLE001 - a measurement only: no CUDA torch means no number
        return None


def step_model(head_dim: int, bits: int, num_q_heads: int, num_kv_heads: int, block_size: int, dtype: str):
    """TQCacheUpdate -> TQPagedAttention as one graph; caches in, updated caches out, ``out``."""
    import onnx

    from tq_deploy.export.single_op import make_op_model

    kw = dict(head_dim=head_dim, bits=bits, num_kv_heads=num_kv_heads, block_size=block_size, dtype=dtype)
    update = make_op_model("TQCacheUpdate", **kw)
    attend = make_op_model("TQPagedAttention", num_q_heads=num_q_heads, **kw)
    graph = onnx.GraphProto()
    graph.CopyFrom(update.graph)
    node = onnx.NodeProto()
    node.CopyFrom(attend.graph.node[0])
    for i, name in enumerate(node.input):  # attention reads the updated caches
        if name in CACHE:
            node.input[i] = f"{name}_out"
    graph.node.append(node)
    have = {v.name for v in graph.input}
    graph.input.extend(v for v in attend.graph.input if v.name not in have)
    graph.output.extend(attend.graph.output)
    return onnx.helper.make_model(graph, opset_imports=update.opset_import, ir_version=update.ir_version)


@dataclass
class SoakReport:
    steps: int
    seconds: float
    provider: str
    shapes: dict
    rss_warm: int
    rss_end: int
    rss_max: int
    rss_growth: float  # (max after warm-up - warm) / warm
    device_warm: int | None = None
    device_end: int | None = None
    device_growth: float | None = None
    max_growth: float = 0.01
    code_mismatch: float = 0.0
    max_rel_error: float = 0.0
    rss_samples: list = field(default_factory=list)  # (step, VmRSS bytes) from the warm-up on
    problems: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def to_text(self) -> str:
        mib = 1 << 20
        lines = [f"soak: {self.steps} decode steps on {self.provider} in {self.seconds:.1f} s "
                 f"({self.seconds / max(self.steps, 1) * 1e6:.0f} us/step), {self.shapes}",
                 f"  VmRSS after warm-up {self.rss_warm / mib:.1f} MiB, max later {self.rss_max / mib:.1f} MiB, "
                 f"end {self.rss_end / mib:.1f} MiB: growth {self.rss_growth * 100:.3f}% "
                 f"(limit {self.max_growth * 100:.1f}%)"]
        if self.device_growth is not None:
            lines.append(f"  device memory in use {self.device_warm / mib:.1f} -> {self.device_end / mib:.1f} MiB: "
                         f"growth {self.device_growth * 100:.3f}%")
        lines.append(f"  end state vs reference: {self.code_mismatch:.2e} of codes differ (ties), attention max "
                     f"relative error {self.max_rel_error:.2e}")
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)


def soak(steps: int = 100_000, *, num_seqs: int = 2, num_q_heads: int = 4, num_kv_heads: int = 2,
         head_dim: int = 72, bits: int = 3, block_size: int = 4, blocks_per_seq: int = 3, spare_blocks: int = 2,
         provider: str = "cpu", library=None, seed: int = 0, warmup: int | None = None,
         max_growth: float = 0.01, threads: int | None = 1, dtype: str = "float32",
         leak_per_step: int = 0) -> SoakReport:
    """Run the decode loop of the module docstring for ``steps`` steps and check it.
    ``leak_per_step`` bytes are kept alive per step: a planted leak, for the test that shows the
    measurement sees one."""
    import onnxruntime as ort
    import torch

    from tq_deploy.export.single_op import initializer_arrays
    from tq_deploy.reference.paged import cache_update_reference, paged_attention_reference
    from tq_deploy.runtime.session import make_session

    if steps < 1:
        raise ValueError(f"steps={steps}, expected >= 1")
    warmup = max(1, min(steps // 10, 2000)) if warmup is None else warmup
    s, hq, hkv, d, b, m = num_seqs, num_q_heads, num_kv_heads, head_dim, block_size, blocks_per_seq
    n = s * m + spare_blocks
    window = m * b
    np_dtype = np.float16 if dtype == "float16" else np.float32
    model = step_model(d, bits, hq, hkv, b, dtype)
    init = {k: torch.from_numpy(v.copy()) for k, v in initializer_arrays(model).items()}
    session = make_session(model.SerializeToString(), provider=provider, library=library, threads=threads)
    device = "cuda" if provider == "cuda" else "cpu"

    rng = np.random.default_rng(seed)
    tables = rng.permutation(n)[: s * m].reshape(s, m).astype(np.int32)  # spare blocks stay untouched
    pool = 61  # a prime number of pre-drawn steps, cycled: token t of a sequence uses entry t % pool
    keys = rng.standard_normal((pool, s, hkv, d)).astype(np_dtype)
    values = (rng.standard_normal((pool, s, hkv, d)) * 2).astype(np_dtype)
    queries = rng.standard_normal((pool, s, hq, d)).astype(np_dtype)

    def slots_of(t: int) -> np.ndarray:
        pos = t % window
        return (tables[:, pos // b].astype(np.int64) * b + pos % b).astype(np.int64)

    def ctx_of(t: int) -> np.ndarray:
        return np.full(s, min(t + 1, window), np.int32)

    def value(array):
        # a copy: on the CPU an OrtValue wraps the numpy buffer itself, and update_inplace would
        # then overwrite the pool entry it was made from
        return ort.OrtValue.ortvalue_from_numpy(np.array(array, copy=True, order="C"), device, 0)

    caches = {name: value(np.zeros(shape, dtype))
              for name, (shape, dtype) in {
                  "k_codes": ((n, b, hkv, ops.packed_size(d, bits)), np.uint8), "k_norms": ((n, b, hkv), np.float32),
                  "v_codes": ((n, b, hkv, ops.packed_size(d, bits)), np.uint8), "v_norms": ((n, b, hkv), np.float32),
              }.items()}
    step_inputs = {"key": value(keys[0]), "value": value(values[0]), "slot_mapping": value(slots_of(0)),
                   "query": value(queries[0]), "block_tables": value(tables), "context_lens": value(ctx_of(0))}
    out = value(np.zeros((s, hq, d), np_dtype))
    binding = session.io_binding()
    for name, v in {**step_inputs, **caches}.items():
        binding.bind_ortvalue_input(name, v)
    for name in CACHE:
        binding.bind_ortvalue_output(f"{name}_out", caches[name])
    binding.bind_ortvalue_output("out", out)

    rss = []
    device_warm = None
    leaked = []
    # the first device reading initializes torch's CUDA context (~15 MiB of VmRSS): before the loop,
    # so that the baseline taken after the warm-up already holds it
    device_bytes_in_use()
    start = time.perf_counter()
    for t in range(steps):
        if leak_per_step:
            leaked.append(bytearray(leak_per_step))  # zero-filled: its pages count in VmRSS
        i = t % pool
        step_inputs["key"].update_inplace(keys[i])
        step_inputs["value"].update_inplace(values[i])
        step_inputs["query"].update_inplace(queries[i])
        step_inputs["slot_mapping"].update_inplace(slots_of(t))
        step_inputs["context_lens"].update_inplace(ctx_of(t))
        session.run_with_iobinding(binding)
        if t + 1 == warmup:
            binding.synchronize_outputs()
            rss.append((t + 1, rss_bytes()))
            device_warm = device_bytes_in_use()
        elif t + 1 > warmup and (t + 1 - warmup) % max(1, (steps - warmup) // 50) == 0:
            rss.append((t + 1, rss_bytes()))
    binding.synchronize_outputs()
    seconds = time.perf_counter() - start
    rss.append((steps, rss_bytes()))
    leaked.clear()
    samples, rss = rss, [r for _, r in rss]
    device_end = device_bytes_in_use()

    report = SoakReport(steps=steps, seconds=seconds, provider=provider, max_growth=max_growth,
                        shapes={"S": s, "Hq": hq, "Hkv": hkv, "D": d, "bits": bits, "B": b, "M": m, "N": n,
                                "dtype": dtype},
                        rss_warm=rss[0], rss_end=rss[-1], rss_max=max(rss), rss_growth=(max(rss) - rss[0]) / rss[0],
                        rss_samples=samples)
    if report.rss_growth >= max_growth:
        report.problems.append(f"VmRSS grew {report.rss_growth * 100:.2f}% after warm-up "
                               f"({rss[0]} -> max {max(rss)} bytes), expected < {max_growth * 100:.1f}%")
    if device_warm is not None and device_end is not None:
        report.device_warm, report.device_end = device_warm, device_end
        report.device_growth = (device_end - device_warm) / max(device_warm, 1)
        if report.device_growth >= max_growth:
            report.problems.append(f"device memory in use grew {report.device_growth * 100:.2f}%, expected "
                                   f"< {max_growth * 100:.1f}%")

    # The reference's end state: the last `window` tokens of every sequence (older ones were overwritten).
    ref = [torch.zeros(caches[name].shape(), dtype=torch.uint8 if "codes" in name else torch.float32)
           for name in CACHE]
    for t in range(max(0, steps - window), steps):
        i = t % pool
        cache_update_reference(torch.from_numpy(keys[i]), torch.from_numpy(values[i]), torch.from_numpy(slots_of(t)),
                               *ref, init["rotation"], init["k_codebook"], init["v_codebook"], bits, bits)
    got = {name: caches[name].numpy() for name in CACHE}
    from tq_deploy.validate.fuzz import close_rows

    for name, want in zip(CACHE, ref):
        if "norms" in name:
            problem = close_rows(got[name].reshape(-1, 1), want.numpy().reshape(-1, 1), 2e-6, name)
            if problem:
                report.problems.append(f"end cache {problem}")
    from tq_deploy.reference.packing import unpack_codes

    differ = total = 0
    for name in ("k_codes", "v_codes"):
        g = unpack_codes(torch.from_numpy(got[name]), bits, d).int()
        w = unpack_codes(ref[CACHE.index(name)], bits, d).int()
        differ += int((g != w).sum())
        total += g.numel()
        if int((g - w).abs().max()) > 1:
            report.problems.append(f"end cache {name}: a code differs by more than 1 from the reference's")
    report.code_mismatch = differ / max(total, 1)
    if report.code_mismatch >= 1e-3:
        report.problems.append(f"end cache: {report.code_mismatch:.2e} of codes differ from the reference's, "
                               "expected only rounding ties (< 1e-3)")
    # The last step's output, against the reference attention over the ORT cache itself (so a tie in
    # a code cannot move it) and over the reference's cache.
    last = steps - 1
    query = torch.from_numpy(queries[last % pool])
    expected = paged_attention_reference(query, *(torch.from_numpy(got[c]) for c in CACHE), torch.from_numpy(tables),
                                         torch.from_numpy(ctx_of(last)), init["rotation"], init["k_codebook"],
                                         init["v_codebook"], bits, bits).float().numpy()
    actual = out.numpy().astype(np.float32)
    rtol = 2e-3 if dtype == "float16" else 1e-4
    problem = close_rows(actual, expected, rtol, "last step's out")
    if problem:
        report.problems.append(problem)
    report.max_rel_error = float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))
    return report
