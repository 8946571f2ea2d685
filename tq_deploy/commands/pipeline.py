"""tq-deploy pipeline: the main job on a built-in default model, end to end, as one flow of data.

    1. export      the reference decode model to ONNX ("turboquant" custom nodes), kept in memory and
                   written to OUT/model.onnx
    2. check       onnx.checker (full) and shape inference with the TurboQuant schemas
    3. session     ONNX Runtime with the custom-op library (CPU EP)
    4. run         on fresh random valid inputs (timed); the reference's outputs for them, once
    5. compare     ORT CPU with the reference: max abs/rel error, mismatched codes
    5b. ORT CUDA   the same inputs on the CUDA EP (onnxruntime-gpu and a CUDA device), else "skipped: why"
    6. engine      TensorRT engine build with the TurboQuant IPluginV3 plugins (TensorRT-RTX on a
                   CPU-only machine; skipped, with the reason, when TensorRT or the plugin library is absent)
    7. polygraphy  the reference, ORT (CPU, CUDA where it runs) and the engine of step 6 (on a GPU
                   TensorRT accepts) through polygraphy's Comparator, on the inputs of step 4

Exit status: 0 within tolerance, 1 outside, 2 bad options.
"""

from __future__ import annotations

import os
import time

from tq_deploy.cli import count
from tq_deploy.commands.export import add_model_arguments, config_from_args


def add_arguments(parser) -> None:
    parser.add_argument("--out-dir", default="out", help="where model.onnx, model.engine and report.json go "
                                                         "(default out/)")
    parser.add_argument("--library", help="custom-op library path (default: the built one)")
    parser.add_argument("--input-seed", type=int, default=1, help="seed of the random inputs (default 1)")
    parser.add_argument("--context-lens", type=int, nargs="+",
                        help="tokens per sequence, new token included (default: 1, a partial block, a long one)")
    parser.add_argument("--repeat", type=count(1), default=5, help="timed ORT runs (default 5)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_model_arguments(parser)


def run(args) -> int:
    from tq_deploy import files
    from tq_deploy.export.common import save_model
    from tq_deploy.export.model import export_model
    from tq_deploy.export.schemas import infer_shapes
    from tq_deploy.runtime.session import cuda_unavailable_reason
    from tq_deploy.runtime.tensorrt import tensorrt_stage
    from tq_deploy.validate.inputs import default_context_lens, random_inputs
    from tq_deploy.validate.ort import validate_with_ort
    from tq_deploy.validate.reference import reference_outputs

    if args.repeat < 1:
        raise ValueError(f"--repeat={args.repeat}, expected >= 1")
    config = config_from_args(args)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise ValueError(f"--out-dir {args.out_dir!r} is a file, expected a folder")
    os.makedirs(args.out_dir, exist_ok=True)
    files.check_writable(os.path.join(args.out_dir, "report.json"), "--out-dir")
    path = os.path.join(args.out_dir, "model.onnx")
    steps = {}

    start = time.perf_counter()
    model = export_model(config)  # runs onnx.checker full_check
    save_model(model, path)
    steps["export_s"] = time.perf_counter() - start

    inferred = infer_shapes(model)
    typed = {v.name for v in (*inferred.graph.value_info, *inferred.graph.output) if v.type.tensor_type.HasField("shape")}
    node_outputs = [o for n in inferred.graph.node for o in n.output if o]
    untyped = [o for o in node_outputs if o not in typed]
    if untyped:
        raise RuntimeError(f"shape inference left {len(untyped)} values without a shape: {untyped[:5]}")
    custom = sorted({n.op_type for n in model.graph.node if n.domain == "turboquant"})

    context_lens = args.context_lens or default_context_lens(config)
    feeds = random_inputs(model, seed=args.input_seed, context_lens=context_lens)
    start = time.perf_counter()
    expected = reference_outputs(model, feeds)
    steps["reference_s"] = time.perf_counter() - start
    start = time.perf_counter()
    report = validate_with_ort(model, feeds, expected, library=args.library, repeat=args.repeat)
    steps["ort_cpu_s"] = time.perf_counter() - start
    report.title = f"pipeline: {path} ({', '.join(custom)}) in ONNX Runtime (CPU EP) vs PyTorch reference"
    why_not_cuda = cuda_unavailable_reason(args.library)
    cuda_report = None
    if not why_not_cuda:
        cuda_report = validate_with_ort(model, feeds, expected, provider="cuda", library=args.library,
                                        repeat=args.repeat)
        cuda_report.title = f"pipeline: {path} in ONNX Runtime (CUDA EP) vs PyTorch reference"
    report.extra.update({"model_path": path, "config": config.to_dict(), "context_lens": context_lens,
                         "ir_version": model.ir_version, "custom_ops": custom, "steps": steps,
                         "ort_cuda": cuda_report.to_dict() if cuda_report else {"status": "skipped",
                                                                               "reason": why_not_cuda}})
    engine = tensorrt_stage(model, args.out_dir, name="model")
    report.extra["tensorrt"] = engine
    polygraphy = _polygraphy_stage(model, feeds, expected, engine, args.library)
    report.extra["polygraphy"] = {k: v for k, v in polygraphy.items() if k != "text"}
    files.write_text(os.path.join(args.out_dir, "report.json"), report.to_json())
    passed = report.passed and (cuda_report is None or cuda_report.passed) and polygraphy.get("passed", True)

    if args.json:
        print(report.to_json())
        return 0 if passed else 1
    c = config
    print(f"1. export   {path}: IR {model.ir_version}, {len(model.graph.node)} nodes, custom {', '.join(custom)}; "
          f"H={c.hidden_size} Hq={c.num_q_heads} Hkv={c.num_kv_heads} D={c.head_dim} "
          f"{_widths(c)} B={c.block_size} ({steps['export_s']:.1f} s)")
    print(f"2. check    onnx.checker full_check ok; shape inference typed all {len(node_outputs)} node outputs")
    print(f"3. session  {', '.join(report.extra['providers'])} with the TurboQuant custom-op library")
    print(f"4. run      context_lens={context_lens}: ORT {report.extra['ort_ms_mean']:.3f} ms/step "
          f"(mean of {report.extra['repeat']})")
    print("5. compare")
    print("   " + report.to_text().replace("\n", "\n   "))
    if cuda_report is not None:
        print(f"5b. ORT CUDA {cuda_report.extra['ort_ms_mean']:.3f} ms/step")
        print("   " + cuda_report.to_text().replace("\n", "\n   "))
    else:
        print(f"5b. ORT CUDA skipped: {why_not_cuda}")
    if engine["status"] == "built":
        print(f"6. engine   {engine['engine_path']}: {engine['engine_bytes']} bytes, {engine['backend']} "
              f"{engine['tensorrt_version']}, {engine['build_seconds']:.2f} s; {engine['runtime_note']}")
    else:
        print(f"6. engine   skipped: {engine['reason']}")
    if polygraphy["status"] == "ran":
        print(f"7. polygraphy  runners {', '.join(polygraphy['runners'])}; TensorRT runner: {polygraphy['tensorrt']}")
        print("   " + polygraphy["text"].replace("\n", "\n   "))
    else:
        print(f"7. polygraphy  skipped: {polygraphy['reason']}")
    print(f"report: {os.path.join(args.out_dir, 'report.json')}")
    return 0 if passed else 1


def _widths(c) -> str:
    if c.num_layers == 1:
        return f"k_bits={c.k_bits} v_bits={c.v_bits}"
    return f"{c.num_layers} layers, k/v bits " + " ".join(f"{k}/{v}" for k, v in (c.bits_of_layer(i)
                                                                               for i in range(c.num_layers)))


def _polygraphy_stage(model, feeds, expected, engine: dict, library) -> dict:
    """polygraphy's Comparator over the reference, ORT and (where usable) the engine already built;
    skipped without polygraphy."""
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return {"status": "skipped", "reason": "polygraphy is not installed (pip install 'tq-deploy[rtx]')"}
    from tq_deploy.validate.polygraphy_run import compare_with_polygraphy

    built = engine.get("engine_path") if engine.get("status") == "built" else None
    return {"status": "ran", **compare_with_polygraphy(model, feeds=feeds, expected=expected, engine=built,
                                                       library=library)}
