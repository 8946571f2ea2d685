"""ONNX Runtime on the CUDA EP: the TurboQuant node and the whole decode step, against what an ORT
user would run instead.

    tq-deploy bench ort-cuda [--shapes 8x32768,1x131072,1x32768] [--runs 50]

node   TQPagedAttention alone in an ORT CUDA session (IO binding on device buffers, no copies)
       against the same kernel called from PyTorch (tq_deploy.dispatch.plan_paged_attention):
       the ORT overhead per call, with ORT running the node (Run -> Compute -> launch) and with
       ORT replaying it as a captured CUDA graph (the CUDA EP's enable_cuda_graph).
step   one decode step of a layer with Hq=32, Hkv=8, D=128, hidden 4096, fp32 projections:
       the model `tq-deploy export` writes (4-bit TurboQuant cache, TQCacheUpdate +
       TQPagedAttention) run as a DecodeSession (cache resident on the device, updated in place),
       and the same graph with its TurboQuant nodes' activations in fp16 (Casts around them: float32
       queries run the float32 attention kernel, fp16 ones the tensor cores), against the same
       layer with an fp16 KV cache through ONNX Runtime's own
       com.microsoft.GroupQueryAttention (past and present key/value sharing one device buffer
       of the full context, rotary inside the op): step time and KV-cache bytes side by side.
       Each as ORT runs it node by node and as a captured CUDA graph (DecodeSession(cuda_graph=True);
       the GQA layer with enable_cuda_graph, reported n/a with ORT's reason if it refuses); the TQ
       graph step also alone (DecodeSession.replay: inputs and output left on the device, as the
       GQA step is timed).
Wall time per call with the device synchronized (ORT's Run returns after its stream finished;
the PyTorch side synchronizes the same way); medians over --runs after warm-up.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time

from tq_deploy.cli import count
from tq_deploy.ops import SUPPORTED_BITS

HQ, HKV, DIM, BLOCK, HIDDEN = 32, 8, 128, 16, 4096


def add_arguments(p) -> None:
    p.add_argument("--shapes", default="8x32768,1x131072,1x32768", help="B x S list")
    p.add_argument("--runs", type=count(1), default=50, help="timed runs per measurement (median reported)")
    p.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4,
                   help="k_bits = v_bits of the TurboQuant cache (default 4)")
    p.add_argument("--json", default=None, help="where to write the results (default $OUT/bench_ort_cuda.json)")


def _median_ms(fn, runs: int, warmup: int = 5) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _bind(binding, name, tensor):
    """Bind a torch CUDA tensor's memory to an ORT input or output (no copy)."""
    import numpy as np
    import torch

    np_type = {torch.float32: np.float32, torch.float16: np.float16, torch.int32: np.int32, torch.int64: np.int64,
               torch.uint8: np.uint8}[tensor.dtype]
    return np_type, ("cuda", tensor.device.index or 0, np_type, list(tensor.shape), tensor.data_ptr())


def bind_input(binding, name, tensor):
    _, (dev, idx, t, shape, ptr) = _bind(binding, name, tensor)
    binding.bind_input(name, dev, idx, t, shape, ptr)


def bind_output(binding, name, tensor):
    _, (dev, idx, t, shape, ptr) = _bind(binding, name, tensor)
    binding.bind_output(name, dev, idx, t, shape, ptr)


def bench_node(batch, seq, bits, runs):
    """TQPagedAttention alone in ORT (CUDA EP) vs the same launch from PyTorch."""
    import torch

    from tq_deploy.bench.gpu import constants, make_tq_inputs
    from tq_deploy.dispatch import plan_paged_attention
    from tq_deploy.export.single_op import make_op_model
    from tq_deploy.runtime.session import make_session

    rot, kcb, vcb = constants(DIM, bits, bits)
    model = make_op_model("TQPagedAttention", head_dim=DIM, bits=bits, num_q_heads=HQ, num_kv_heads=HKV,
                          block_size=BLOCK, dtype="float16", rotation=rot.cpu().numpy(),
                          codebooks=[kcb.cpu().numpy(), vcb.cpu().numpy()])
    session = make_session(model.SerializeToString(), provider="cuda")
    q, kc, kn, vc, vn, bt, ctx = make_tq_inputs(batch, seq, HQ, HKV, DIM, BLOCK, bits, bits, seed=3)
    out_ort, out_pt, out_graph = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)

    def bound(session, out):
        binding = session.io_binding()
        for name, t in (("query", q), ("k_codes", kc), ("k_norms", kn), ("v_codes", vc), ("v_norms", vn),
                        ("block_tables", bt), ("context_lens", ctx)):
            bind_input(binding, name, t)
        bind_output(binding, "out", out)
        return binding

    binding = bound(session, out_ort)
    plan = plan_paged_attention(q, kc, kn, vc, vn, bt, ctx, rot, kcb, vcb, bits, bits)
    ort_ms = _median_ms(lambda: session.run_with_iobinding(binding), runs)
    torch_ms = _median_ms(lambda: plan.run(q, bt, ctx, out_pt), runs)
    # the same node in a session with the CUDA EP's graph capture: ORT replays the captured launch
    graph_session = make_session(model.SerializeToString(), provider="cuda", cuda_graph=True)
    graph_binding = bound(graph_session, out_graph)
    graph_ms = _median_ms(lambda: graph_session.run_with_iobinding(graph_binding), runs)
    same = torch.equal(out_ort, out_pt) and torch.equal(out_graph, out_pt)
    return {"B": batch, "S": seq, "ort_ms": ort_ms, "ort_graph_ms": graph_ms, "torch_ms": torch_ms,
            "overhead_us": (ort_ms - torch_ms) * 1e3, "overhead_pct": 100 * (ort_ms / torch_ms - 1),
            "graph_overhead_us": (graph_ms - torch_ms) * 1e3, "graph_overhead_pct": 100 * (graph_ms / torch_ms - 1),
            "identical_outputs": bool(same)}


def _gqa_step_model(batch, max_seq):
    """The fp16-cache layer through com.microsoft.GroupQueryAttention (rotary in the op), fp32
    projections like the exported TurboQuant model: hidden fp32 -> MatMul -> fp16 q/k/v -> GQA with
    past/present key and value sharing one [B, Hkv, max_seq, D] buffer -> fp32 -> MatMul."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    q_width, kv_width = HQ * DIM, HKV * DIM
    w_qkv = (rng.standard_normal((HIDDEN, q_width + 2 * kv_width)) / math.sqrt(HIDDEN)).astype(np.float32)
    w_o = (rng.standard_normal((q_width, HIDDEN)) / math.sqrt(q_width)).astype(np.float32)
    inv = 10000.0 ** (-np.arange(DIM // 2) / (DIM // 2))
    angles = np.arange(max_seq)[:, None] * inv[None, :]
    nodes = [
        helper.make_node("MatMul", ["hidden", "w_qkv"], ["qkv32"]),
        helper.make_node("Cast", ["qkv32"], ["qkv16"], to=TensorProto.FLOAT16),
        helper.make_node("Split", ["qkv16", "split_sizes"], ["q2", "k2", "v2"], axis=-1),
        helper.make_node("Unsqueeze", ["q2", "axis1"], ["q"]),
        helper.make_node("Unsqueeze", ["k2", "axis1"], ["k"]),
        helper.make_node("Unsqueeze", ["v2", "axis1"], ["v"]),
        helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key", "past_value", "seqlens_k",
                                                 "total_sequence_length", "cos_cache", "sin_cache"],
                         ["attn", "present_key", "present_value"], domain="com.microsoft", num_heads=HQ,
                         kv_num_heads=HKV, do_rotary=1),
        helper.make_node("Squeeze", ["attn", "axis1"], ["attn2"]),
        helper.make_node("Cast", ["attn2"], ["attn32"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["attn32", "w_o"], ["out"]),
    ]
    inits = [numpy_helper.from_array(w_qkv, "w_qkv"), numpy_helper.from_array(w_o, "w_o"),
             numpy_helper.from_array(np.array([q_width, kv_width, kv_width], np.int64), "split_sizes"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.cos(angles).astype(np.float16), "cos_cache"),
             numpy_helper.from_array(np.sin(angles).astype(np.float16), "sin_cache")]
    cache = ["batch", HKV, max_seq, DIM]
    graph = helper.make_graph(
        nodes, "gqa_fp16_step",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", HIDDEN]),
         helper.make_tensor_value_info("past_key", TensorProto.FLOAT16, cache),
         helper.make_tensor_value_info("past_value", TensorProto.FLOAT16, cache),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
         helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", HIDDEN]),
         helper.make_tensor_value_info("present_key", TensorProto.FLOAT16, cache),
         helper.make_tensor_value_info("present_value", TensorProto.FLOAT16, cache)],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def bench_gqa_step(batch, seq, runs, cuda_graph=False):
    import numpy as np
    import onnxruntime as ort
    import torch

    cache_bytes = 2 * batch * HKV * seq * DIM * 2  # fp16 past key and value

    def failed(err):
        return {"ms": None, "why": " ".join(str(err).split())[:200], "cache_bytes": cache_bytes}

    model = _gqa_step_model(batch, seq)
    options = {"use_tf32": 0, **({"enable_cuda_graph": 1} if cuda_graph else {})}
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=[("CUDAExecutionProvider", options)])
    except Exception as err:  # noqa: BLE001 - ORT refuses graph capture for some graphs: report why
        return failed(err)
    hidden = torch.randn(batch, HIDDEN, device="cuda")
    past_k = torch.randn(batch, HKV, seq, DIM, device="cuda", dtype=torch.float16)
    past_v = torch.randn_like(past_k)
    seqlens = torch.full((batch,), seq - 2, dtype=torch.int32, device="cuda")  # the new token at seq - 1
    out = torch.empty(batch, HIDDEN, device="cuda")
    binding = session.io_binding()
    bind_input(binding, "hidden", hidden)
    bind_input(binding, "past_key", past_k)
    bind_input(binding, "past_value", past_v)
    bind_input(binding, "seqlens_k", seqlens)
    binding.bind_cpu_input("total_sequence_length", np.array(seq - 1, dtype=np.int32))
    bind_output(binding, "out", out)
    bind_output(binding, "present_key", past_k)  # the shared buffer: updated in place
    bind_output(binding, "present_value", past_v)
    try:
        ms = _median_ms(lambda: session.run_with_iobinding(binding), runs)
    except Exception as err:  # noqa: BLE001
        return failed(err)
    return {"ms": ms, "cache_bytes": cache_bytes}


def layer_config(bits):
    from tq_deploy.reference.model import TQModelConfig

    return TQModelConfig(hidden_size=HIDDEN, num_q_heads=HQ, num_kv_heads=HKV, head_dim=DIM, k_bits=bits,
                         v_bits=bits, block_size=BLOCK, num_blocks=64, max_blocks_per_seq=8)


@functools.lru_cache(maxsize=None)
def exported_layer(bits, attention_dtype="float32"):
    """The decode step `tq-deploy export` writes for this layer (once per bit width: ~30 s).

    ``attention_dtype="float16"``: the same graph with its TurboQuant nodes fed and read in fp16 (a Cast
    before the keys, values and queries, one after the attention), the precision of the GQA step's
    q/k/v; float32 queries run the float32 attention kernel, fp16 ones the tensor-core kernel.
    """
    from tq_deploy.export import export_model

    if attention_dtype not in ("float32", "float16"):
        raise ValueError(f"attention_dtype={attention_dtype!r}, expected 'float32' or 'float16'")
    if attention_dtype == "float16":  # the float32 export (cached), with the Casts added
        model, export_s = exported_layer(bits)
        return fp16_attention(model), export_s
    start = time.perf_counter()
    return export_model(layer_config(bits)), time.perf_counter() - start


def fp16_attention(model):
    """``model`` with the TurboQuant nodes' activations in fp16: Cast(to fp16) on the cache update's key
    and value and the attention's query, Cast(to fp32) on the attention's output."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = []
    for node in model.graph.node:
        if node.domain == "turboquant" and node.op_type in ("TQCacheUpdate", "TQPagedAttention"):
            for i in range(2 if node.op_type == "TQCacheUpdate" else 1):
                half = f"{node.input[i]}_fp16"
                nodes.append(helper.make_node("Cast", [node.input[i]], [half], to=TensorProto.FLOAT16))
                node.input[i] = half
            nodes.append(node)
            if node.op_type == "TQPagedAttention":
                out = node.output[0]
                node.output[0] = f"{out}_fp16"
                nodes.append(helper.make_node("Cast", [node.output[0]], [out], to=TensorProto.FLOAT))
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]
    return model


def random_step(model, config, batch, seq, provider="cuda", cuda_graph=False, seed=1):
    """A DecodeSession of the exported ``model`` (of TQModelConfig ``config``) whose cache holds random
    codes and norms (timing on zeros would flatter the kernels), and the inputs of one step of ``batch``
    sequences of ``seq`` tokens over shuffled blocks."""
    import numpy as np

    from tq_deploy.ops import packed_size
    from tq_deploy.runtime.decode_session import DecodeSession

    block, hkv, dim = config.block_size, config.num_kv_heads, config.head_dim
    per_seq = -(-seq // block)
    blocks = batch * per_seq
    step = DecodeSession(model, provider=provider, num_blocks=blocks, cuda_graph=cuda_graph)
    rng = np.random.default_rng(seed)
    shape = (blocks, block, hkv)
    step.load_cache({
        "k_codes": rng.integers(0, 256, (*shape, packed_size(dim, config.k_bits)), dtype=np.uint8),
        "k_norms": rng.random(shape, dtype=np.float32) + 0.5,
        "v_codes": rng.integers(0, 256, (*shape, packed_size(dim, config.v_bits)), dtype=np.uint8),
        "v_norms": rng.random(shape, dtype=np.float32) + 0.5,
    })
    tables = rng.permutation(blocks).astype(np.int32).reshape(batch, per_seq)
    last = seq - 1
    feeds = [rng.standard_normal((batch, config.hidden_size), dtype=np.float32), np.full(batch, last, np.int64),
             (tables[:, last // block].astype(np.int64) * block + last % block), tables,
             np.full(batch, seq, np.int32)]
    return step, feeds


def bench_tq_step(batch, seq, bits, runs, cuda_graph=False, attention_dtype="float32"):
    model, export_s = exported_layer(bits, attention_dtype)
    step, feeds = random_step(model, layer_config(bits), batch, seq, cuda_graph=cuda_graph)
    ms = _median_ms(lambda: step.run(*feeds), runs)
    result = {"ms": ms, "cache_bytes": step.cache_bytes(), "export_s": export_s}
    if cuda_graph:  # the step alone, inputs already on the device and out left there (as the GQA step runs)
        result["device_ms"] = _median_ms(step.replay, runs)
    return result


def run(a) -> int:
    import torch

    from tq_deploy.runtime.session import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason:
        raise ValueError(f"tq-deploy bench ort-cuda needs the ORT CUDA EP: {reason}")
    if a.runs < 1:
        raise ValueError(f"--runs={a.runs}, expected >= 1")
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    except ValueError:
        raise ValueError(f"--shapes {a.shapes!r}: expected e.g. 8x32768,1x131072") from None
    path = a.json or (os.path.join(os.environ["OUT"], "bench_ort_cuda.json") if os.environ.get("OUT") else None)
    if path:
        from tq_deploy.files import check_writable

        check_writable(path, "--json")  # before the benchmarks, not after them
    nodes, steps = [], []
    for batch, seq in shapes:
        nodes.append(bench_node(batch, seq, a.bits, a.runs))
        print(json.dumps(nodes[-1]), flush=True)
    for batch, seq in shapes:
        tq = bench_tq_step(batch, seq, a.bits, a.runs)
        tq_graph = bench_tq_step(batch, seq, a.bits, a.runs, cuda_graph=True)
        tq16_graph = bench_tq_step(batch, seq, a.bits, a.runs, cuda_graph=True, attention_dtype="float16")
        gqa = bench_gqa_step(batch, seq, a.runs)
        steps.append({"B": batch, "S": seq, "tq": tq, "tq_graph": tq_graph, "tq16_graph": tq16_graph, "gqa": gqa})
        print(json.dumps(steps[-1]), flush=True)
        torch.cuda.empty_cache()
    # last: a refused or failed capture of ORT's own GQA graph must not disturb the rows above
    for r in steps:
        r["gqa_graph"] = bench_gqa_step(r["B"], r["S"], a.runs, cuda_graph=True)
        print(json.dumps({"B": r["B"], "S": r["S"], "gqa_graph": r["gqa_graph"]}), flush=True)
        torch.cuda.empty_cache()
    if path:
        from tq_deploy.files import write_text

        write_text(path, json.dumps({"device": torch.cuda.get_device_name(), "node": nodes, "step": steps}, indent=1))
    print()
    print(f"ORT CUDA EP, {torch.cuda.get_device_name()}: Hq={HQ} Hkv={HKV} D={DIM} block {BLOCK}, {a.bits}-bit "
          f"TurboQuant, median ms over {a.runs} runs")
    print("TQPagedAttention node alone (device-bound IO) vs the same kernel from PyTorch:")
    print(f"{'B x S':>10} {'PyTorch':>9} {'ORT node':>9} {'overhead':>13} {'ORT graph':>10} {'overhead':>13}  outputs")
    for r in nodes:
        print(f"{r['B']:>4}x{r['S']:<5} {r['torch_ms']:9.3f} {r['ort_ms']:9.3f} {r['overhead_us']:6.1f} us "
              f"{r['overhead_pct']:4.1f}% {r['ort_graph_ms']:10.3f} {r['graph_overhead_us']:6.1f} us "
              f"{r['graph_overhead_pct']:4.1f}%  {'identical' if r['identical_outputs'] else 'DIFFER'}")

    def ms(v):
        return f"{v:.3f}" if v is not None else "n/a"

    print(f"\nwhole decode step, hidden {HIDDEN} (ms; run = DecodeSession.run, host inputs and output; device = "
          "inputs and output on the device, as the GQA step; fp32 = the exported layer as is, its float32 queries "
          "on the float32 attention kernel; fp16 = its TurboQuant nodes fed fp16, as GQA's q/k/v, on the "
          "tensor cores; best/best = GQA's best over TQ fp16's best):")
    print(f"{'B x S':>10} {'fp32 run':>9} {'fp32 graph':>11} {'fp32 device':>12} {'fp16 graph':>11} "
          f"{'fp16 device':>12} {'GQA fp16':>9} {'GQA graph':>10} {'best/best':>10} {'TQ cache':>9} "
          f"{'fp16 cache':>11} {'ratio':>6}")
    for r in steps:
        tq, tqg, tq16, gqa, gqag = r["tq"], r["tq_graph"], r["tq16_graph"], r["gqa"], r["gqa_graph"]
        best_tq = min(v for v in (tq16["ms"], tq16.get("device_ms")) if v is not None)
        best_gqa = min((v for v in (gqa["ms"], gqag["ms"]) if v is not None), default=None)
        ratio = f"{best_gqa / best_tq:9.2f}x" if best_gqa is not None else f"{'n/a':>10}"
        print(f"{r['B']:>4}x{r['S']:<5} {ms(tq['ms']):>9} {ms(tqg['ms']):>11} {ms(tqg.get('device_ms')):>12} "
              f"{ms(tq16['ms']):>11} {ms(tq16.get('device_ms')):>12} {ms(gqa['ms']):>9} {ms(gqag['ms']):>10} {ratio} "
              f"{tq['cache_bytes'] / 2**30:7.2f} G {gqa['cache_bytes'] / 2**30:9.2f} G "
              f"{gqa['cache_bytes'] / tq['cache_bytes']:5.2f}x")
    for r in steps:
        for key, label in (("gqa", "GQA"), ("gqa_graph", "GQA graph")):
            if r[key]["ms"] is None:
                print(f"{label} {r['B']}x{r['S']}: {r[key]['why']}")
    return 0
