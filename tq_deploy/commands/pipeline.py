"""tq-deploy pipeline: the main job on a built-in default model, end to end, as one flow of data.

By default the model is a real LLM (the shipped SmolLM2-135M; ``--model PATH|NAME`` another
Llama-family checkpoint): commands/pipeline_llm.py says what its steps do. ``--synthetic`` runs
the synthetic decode step with random weights instead (the unit tests' model):

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

Each step is a function below, handed the one :class:`~tq_deploy.export.loaded.ExportedModel`
(proto, metadata, config, library) the export made. Exit status: 0 within tolerance, 1 outside,
2 bad options.
"""

from __future__ import annotations

import json
import os
import time

from typing import TYPE_CHECKING

from tq_deploy.cli import count
from tq_deploy.commands.export import add_model_arguments, config_from_args

if TYPE_CHECKING:
    from tq_deploy.export.loaded import ExportedModel


def add_arguments(parser) -> None:
    parser.add_argument("--out-dir", default="out", help="where model.onnx, model.engine and report.json go "
                                                         "(default out/)")
    parser.add_argument("--library", help="custom-op library path (default: the built one)")
    parser.add_argument("--input-seed", type=int, default=1, help="seed of the random inputs (default 1)")
    parser.add_argument("--context-lens", type=int, nargs="+",
                        help="tokens per sequence, new token included (default: 1, a partial block, a long one)")
    parser.add_argument("--repeat", type=count(1), default=5, help="timed ORT runs (default 5)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--model", default="smollm2", metavar="PATH|NAME",
                        help="the LLM: smollm2 (default, shipped), a transformers folder or a GGUF file")
    parser.add_argument("--synthetic", action="store_true",
                        help="the synthetic decode step (random weights, --hidden-size ... options) instead of an LLM")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="the LLM's weights")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="a prompt of the generate step, repeatable (default: two fixed prompts)")
    parser.add_argument("--new-tokens", type=count(1), default=8, help="greedy tokens per prompt (default 8)")
    add_model_arguments(parser)


def run(args) -> int:
    if not args.synthetic:
        from tq_deploy.commands import pipeline_llm

        return pipeline_llm.run(args)
    return run_synthetic(args)


def run_synthetic(args) -> int:
    from tq_deploy import files
    from tq_deploy.runtime.tensorrt import tensorrt_stage
    from tq_deploy.validate.inputs import default_context_lens

    config = _check_options(args)
    steps = {}
    model = _export(config, os.path.join(args.out_dir, "model.onnx"), args.library, steps)
    typed_outputs = _check_shapes(model)
    context_lens = args.context_lens or default_context_lens(config)
    feeds, expected = _reference(model, context_lens, args.input_seed, steps)
    report = _ort_cpu(model, feeds, expected, args.repeat, steps)
    cuda_report, why_not_cuda = _ort_cuda(model, feeds, expected, args.repeat)
    report.extra.update({"model_path": model.path, "config": config.to_dict(), "context_lens": context_lens,
                         "ir_version": model.proto.ir_version, "custom_ops": model.custom_ops, "steps": steps,
                         "ort_cuda": cuda_report.to_dict() if cuda_report else {"status": "skipped",
                                                                               "reason": why_not_cuda}})
    engine = tensorrt_stage(model, args.out_dir, name="model")
    report.extra["tensorrt"] = engine
    polygraphy = polygraphy_stage(model, feeds, expected, engine)
    report.extra["polygraphy"] = {k: v for k, v in polygraphy.items() if k != "text"}
    passed = report.passed and (cuda_report is None or cuda_report.passed) and polygraphy.get("passed", True)
    # "passed" is the whole job's verdict (the exit status); "ort_cpu_passed" the CPU comparison's alone
    text = json.dumps({**report.to_dict(), "passed": passed, "ort_cpu_passed": report.passed}, indent=2, default=str)
    files.write_text(os.path.join(args.out_dir, "report.json"), text)
    if args.json:
        print(text)
    else:
        _print_steps(model, report, cuda_report, why_not_cuda, engine, polygraphy, typed_outputs, args.out_dir)
    return 0 if passed else 1


def _check_options(args):
    """The model config of the options; --out-dir made and writable."""
    if args.repeat < 1:
        raise ValueError(f"--repeat={args.repeat}, expected >= 1")
    config = config_from_args(args)
    make_out_dir(args.out_dir)
    return config


def make_out_dir(out_dir: str) -> None:
    """--out-dir made, and writable for the report (one line when it is a file or read-only)."""
    from tq_deploy import files

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out-dir {out_dir!r} is a file, expected a folder")
    os.makedirs(out_dir, exist_ok=True)
    files.check_writable(os.path.join(out_dir, "report.json"), "--out-dir")


def _export(config, path: str, library, steps: dict) -> ExportedModel:
    """1. The reference decode model as ONNX (onnx.checker full_check runs inside), written to ``path``."""
    from tq_deploy.export.common import save_model
    from tq_deploy.export.loaded import ExportedModel
    from tq_deploy.export.model import export_model

    start = time.perf_counter()
    model = ExportedModel(export_model(config), path, library)
    save_model(model.proto, path)
    steps["export_s"] = time.perf_counter() - start
    return model


def _check_shapes(model: ExportedModel) -> int:
    """2. Shape inference with the TurboQuant schemas types every node output; returns their count."""
    from tq_deploy.export.schemas import infer_shapes

    inferred = infer_shapes(model.proto)
    typed = {v.name for v in (*inferred.graph.value_info, *inferred.graph.output) if v.type.tensor_type.HasField("shape")}
    node_outputs = [o for n in inferred.graph.node for o in n.output if o]
    untyped = [o for o in node_outputs if o not in typed]
    if untyped:
        raise RuntimeError(f"shape inference left {len(untyped)} values without a shape: {untyped[:5]}")
    return len(node_outputs)


def _reference(model: ExportedModel, context_lens, seed: int, steps: dict):
    """4. Fresh random valid inputs and the reference's outputs for them (computed once)."""
    from tq_deploy.validate.inputs import random_inputs
    from tq_deploy.validate.reference import reference_outputs

    feeds = random_inputs(model, seed=seed, context_lens=context_lens)
    start = time.perf_counter()
    expected = reference_outputs(model, feeds)
    steps["reference_s"] = time.perf_counter() - start
    return feeds, expected


def _ort_cpu(model: ExportedModel, feeds, expected, repeat: int, steps: dict):
    """3 and 5. An ONNX Runtime session (CPU EP) with the custom-op library, timed, compared with the reference."""
    from tq_deploy.validate.ort import validate_with_ort

    start = time.perf_counter()
    report = validate_with_ort(model, feeds, expected, repeat=repeat)
    steps["ort_cpu_s"] = time.perf_counter() - start
    report.title = (f"pipeline: {model.path} ({', '.join(model.custom_ops)}) in ONNX Runtime (CPU EP) "
                    "vs PyTorch reference")
    return report


def _ort_cuda(model: ExportedModel, feeds, expected, repeat: int):
    """5b. The same on the CUDA EP; (None, why) where it cannot run."""
    from tq_deploy.runtime.session import cuda_unavailable_reason
    from tq_deploy.validate.ort import validate_with_ort

    why_not_cuda = cuda_unavailable_reason(model.library)
    if why_not_cuda:
        return None, why_not_cuda
    report = validate_with_ort(model, feeds, expected, provider="cuda", repeat=repeat)
    report.title = f"pipeline: {model.path} in ONNX Runtime (CUDA EP) vs PyTorch reference"
    return report, ""


def _print_steps(model: ExportedModel, report, cuda_report, why_not_cuda, engine, polygraphy, typed_outputs: int,
                 out_dir) -> None:
    c, steps, custom = model.config, report.extra["steps"], model.custom_ops
    print(f"1. export   {model.path}: IR {model.proto.ir_version}, {len(model.proto.graph.node)} nodes, custom "
          f"{', '.join(custom)}; H={c.hidden_size} Hq={c.num_q_heads} Hkv={c.num_kv_heads} D={c.head_dim} "
          f"{_widths(c)} B={c.block_size} ({steps['export_s']:.1f} s)")
    print(f"2. check    onnx.checker full_check ok; shape inference typed all {typed_outputs} node outputs")
    print(f"3. session  {', '.join(report.extra['providers'])} with the TurboQuant custom-op library")
    print(f"4. run      context_lens={report.extra['context_lens']}: ORT {report.extra['ort_ms_mean']:.3f} ms/step "
          f"(mean of {report.extra['repeat']})")
    print("5. compare")
    print("   " + report.to_text().replace("\n", "\n   "))
    if cuda_report is not None:
        print(f"5b. ORT CUDA {cuda_report.extra['ort_ms_mean']:.3f} ms/step")
        print("   " + cuda_report.to_text().replace("\n", "\n   "))
    else:
        print(f"5b. ORT CUDA skipped: {why_not_cuda}")
    print(engine_line(engine))
    if polygraphy["status"] == "ran":
        print(f"7. polygraphy  runners {', '.join(polygraphy['runners'])}; TensorRT runner: {polygraphy['tensorrt']}")
        print("   " + polygraphy["text"].replace("\n", "\n   "))
    else:
        print(f"7. polygraphy  skipped: {polygraphy['reason']}")
    verdict = report.passed and (cuda_report is None or cuda_report.passed) and polygraphy.get("passed", True)
    print(f"result: {'PASSED' if verdict else 'FAILED'}; report: {os.path.join(out_dir, 'report.json')}")


def engine_line(engine: dict) -> str:
    """Step 6's line: the engine built (size, backend, time, where it can run) or why not."""
    if engine["status"] == "built":
        return (f"6. engine   {engine['engine_path']}: {engine['engine_bytes']} bytes, {engine['backend']} "
                f"{engine['tensorrt_version']}, {engine['build_seconds']:.2f} s; {engine['runtime_note']}")
    return f"6. engine   skipped: {engine['reason']}"


def _widths(c) -> str:
    if c.num_layers == 1:
        return f"k_bits={c.k_bits} v_bits={c.v_bits}"
    return f"{c.num_layers} layers, k/v bits " + " ".join(f"{k}/{v}" for k, v in (c.bits_of_layer(i)
                                                                               for i in range(c.num_layers)))


def polygraphy_stage(model: ExportedModel, feeds, expected, engine: dict) -> dict:
    """polygraphy's Comparator over the reference, ORT and (where usable) the engine already built;
    skipped without polygraphy."""
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return {"status": "skipped", "reason": "polygraphy is not installed (pip install 'tq-deploy[rtx]')"}
    from tq_deploy.validate.polygraphy_run import compare_with_polygraphy

    built = engine.get("engine_path") if engine.get("status") == "built" else None
    return {"status": "ran", **compare_with_polygraphy(model, feeds=feeds, expected=expected, engine=built)}
