"""tq-deploy pipeline: the main job on a built-in default model, end to end.

    1. export   the reference decode model to ONNX ("turboquant" custom nodes)
    2. check    onnx.checker (full) and shape inference with the TurboQuant schemas
    3. session  ONNX Runtime with the custom-op library
    4. run      on fresh random valid inputs (timed)
    5. compare  with the PyTorch reference: max abs/rel error, mismatched codes
    6. engine   TensorRT engine build with the TurboQuant IPluginV3 plugins (TensorRT-RTX on a
                CPU-only machine; skipped, with the reason, when TensorRT or the plugin library is absent)
    7. polygraphy  the reference, ONNX Runtime and (on a GPU TensorRT accepts) the engine through
                polygraphy's Comparator; every runner compared with the reference

Exit status: 0 within tolerance, 1 outside, 2 bad options.
"""

from __future__ import annotations

import os
import time

from tq_deploy.commands.export import add_model_arguments, config_from_args

def add_arguments(parser) -> None:
    parser.add_argument("--out-dir", default="out", help="where model.onnx and report.json go (default out/)")
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"],
                        help="ONNX Runtime execution providers (default CPUExecutionProvider)")
    parser.add_argument("--library", help="custom-op library path (default: the built one)")
    parser.add_argument("--input-seed", type=int, default=1, help="seed of the random inputs (default 1)")
    parser.add_argument("--context-lens", type=int, nargs="+",
                        help="tokens per sequence, new token included (default: 1, a partial block, a long one)")
    parser.add_argument("--repeat", type=int, default=5, help="timed ORT runs (default 5)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_model_arguments(parser)


def run(args) -> int:
    import onnx

    from tq_deploy.export.model import export_model
    from tq_deploy.export.schemas import infer_shapes
    from tq_deploy.runtime.tensorrt import tensorrt_stage
    from tq_deploy.validate.inputs import default_context_lens
    from tq_deploy.validate.ort import validate_with_ort

    config = config_from_args(args)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "model.onnx")
    steps = {}

    start = time.perf_counter()
    model = export_model(config, path)  # runs onnx.checker full_check
    steps["export_s"] = time.perf_counter() - start

    inferred = infer_shapes(onnx.load(path))
    typed = {v.name for v in (*inferred.graph.value_info, *inferred.graph.output) if v.type.tensor_type.HasField("shape")}
    node_outputs = [o for n in inferred.graph.node for o in n.output if o]
    untyped = [o for o in node_outputs if o not in typed]
    if untyped:
        raise RuntimeError(f"shape inference left {len(untyped)} values without a shape: {untyped[:5]}")
    custom = sorted({n.op_type for n in model.graph.node if n.domain == "turboquant"})

    context_lens = args.context_lens or default_context_lens(config)
    start = time.perf_counter()
    report = validate_with_ort(path, providers=args.providers, library=args.library, seed=args.input_seed,
                               context_lens=context_lens, repeat=args.repeat)
    steps["ort_and_reference_s"] = time.perf_counter() - start
    report.title = f"pipeline: {path} ({', '.join(custom)}) in ONNX Runtime vs PyTorch reference"
    report.extra.update({"model_path": path, "config": config.to_dict(), "context_lens": context_lens,
                         "ir_version": model.ir_version, "custom_ops": custom, "steps": steps})
    engine = tensorrt_stage(path, args.out_dir)
    report.extra["tensorrt"] = engine
    polygraphy = _polygraphy_stage(path, args.input_seed)
    report.extra["polygraphy"] = {k: v for k, v in polygraphy.items() if k != "text"}
    with open(os.path.join(args.out_dir, "report.json"), "w") as f:
        f.write(report.to_json())

    if args.json:
        print(report.to_json())
    else:
        c = config
        print(f"1. export   {path}: IR {model.ir_version}, {len(model.graph.node)} nodes, custom {', '.join(custom)}; "
              f"H={c.hidden_size} Hq={c.num_q_heads} Hkv={c.num_kv_heads} D={c.head_dim} "
              f"k_bits={c.k_bits} v_bits={c.v_bits} B={c.block_size} ({steps['export_s']:.1f} s)")
        print(f"2. check    onnx.checker full_check ok; shape inference typed all {len(node_outputs)} node outputs")
        print(f"3. session  {', '.join(report.extra['providers'])} with the TurboQuant custom-op library")
        print(f"4. run      context_lens={context_lens}: ORT {report.extra['ort_ms_mean']:.3f} ms/step "
              f"(mean of {report.extra['repeat']})")
        print("5. compare")
        print("   " + report.to_text().replace("\n", "\n   "))
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
    return 0 if report.passed and polygraphy.get("passed", True) else 1


def _polygraphy_stage(path: str, seed: int) -> dict:
    """polygraphy's Comparator over the reference, ORT and (where usable) TensorRT; skipped without polygraphy."""
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return {"status": "skipped", "reason": "polygraphy is not installed (pip install 'tq-deploy[rtx]')"}
    from tq_deploy.validate.polygraphy_run import compare_with_polygraphy

    return {"status": "ran", **compare_with_polygraphy(path, seed=seed)}
