"""tq-deploy run: run an exported model in ONNX Runtime with the TurboQuant custom-op library.

    tq-deploy run model.onnx                       # valid random inputs from the model's stored config
    tq-deploy run model.onnx --inputs x.npz        # given inputs (npz keys = graph input names)
    tq-deploy run model.onnx --repeat 50 --compare # timing, then a comparison with the PyTorch reference
    tq-deploy run model.onnx --provider cuda       # the CUDA EP (onnxruntime-gpu)

Prints every output's shape and dtype and the run time; with --compare also the
comparison table, and exits 1 when outside tolerance.
"""

from __future__ import annotations

import json

from tq_deploy.cli import count


def add_arguments(parser) -> None:
    parser.add_argument("model", help="the .onnx file (exported by tq-deploy export)")
    parser.add_argument("--inputs", help=".npz file with one array per graph input (default: random valid inputs)")
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                        help="ONNX Runtime execution provider: cpu, or cuda (CUDA EP, onnxruntime-gpu) (default cpu)")
    parser.add_argument("--library", help="custom-op library path (default: the built one, see runtime/library.py)")
    parser.add_argument("--repeat", type=count(1), default=10, help="timed runs after one warm-up (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--context-lens", type=int, nargs="+",
                        help="decode model: tokens per sequence, new token included (default: 1, a partial "
                             "block, a long one); single-op attention: context lengths")
    parser.add_argument("--compare", action="store_true", help="also compare with the PyTorch reference")
    parser.add_argument("--save-outputs", help="write the outputs to this .npz file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def load_inputs(path: str) -> dict:
    import numpy as np
    import torch

    from tq_deploy import files

    files.check_input(path, "--inputs", "an .npz file")
    try:
        with np.load(path) as data:
            return {name: torch.from_numpy(data[name].copy()) for name in data.files}
    except FileNotFoundError:
        raise ValueError(f"--inputs {path!r} does not exist, expected an .npz file") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"--inputs {path!r} is not a readable .npz file ({err})") from None


def check_context_memory(model, lens) -> None:
    """The random inputs hold a cache for ``lens`` (codes, norms and the float vectors encoded into
    it): refused before allocating when it cannot fit."""
    from tq_deploy.cli_checks import check_memory

    meta = model.config.__dict__ if model.kind == "model" else model.metadata
    heads, dim = meta.get("num_kv_heads") or 2, meta.get("head_dim") or 1
    check_memory(f"--context-lens {' '.join(map(str, lens))}", 16 * (sum(lens) + 64) * heads * dim)


def run(args) -> int:
    import io

    import numpy as np

    from tq_deploy import files
    from tq_deploy.export.loaded import ExportedModel
    from tq_deploy.runtime.session import make_session, time_runs
    from tq_deploy.validate.inputs import random_inputs

    if args.repeat < 1:
        raise ValueError(f"--repeat={args.repeat}, expected >= 1")
    if args.save_outputs:
        files.check_writable(args.save_outputs, "--save-outputs",
                             inputs=[("MODEL", args.model), ("--inputs", args.inputs), ("--library", args.library)])
    model = ExportedModel.load(args.model, library=args.library)
    if args.context_lens and not args.inputs:
        check_context_memory(model, args.context_lens)
    inputs = load_inputs(args.inputs) if args.inputs else random_inputs(model, seed=args.seed,
                                                                         context_lens=args.context_lens)
    session = make_session(model.serialized, provider=args.provider, library=model.library)
    outputs, timing = time_runs(session, inputs, repeat=args.repeat)
    result = {
        "model": args.model,
        "providers": session.get_providers(),
        "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in inputs.items()},
        "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in outputs.items()},
        "timing_ms": {"mean": timing.mean_ms, "min": timing.min_ms, "max": timing.max_ms, "repeat": timing.repeat},
    }
    if args.save_outputs:
        buffer = io.BytesIO()
        np.savez(buffer, **outputs)
        files.write_bytes(args.save_outputs, buffer.getvalue())
    status = 0
    report = None
    if args.compare:
        import torch

        from tq_deploy.validate.compare import compare
        from tq_deploy.validate.reference import bits_of_outputs, reference_outputs

        expected = reference_outputs(model, inputs)
        report = compare({k: torch.from_numpy(v) for k, v in outputs.items()}, expected,
                         title="ONNX Runtime vs PyTorch reference", code_bits=bits_of_outputs(model))
        result["comparison"] = report.to_dict()
        status = 0 if report.passed else 1
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return status
    print(f"{args.model} on {', '.join(result['providers'])}")
    for kind in ("inputs", "outputs"):
        for name, info in result[kind].items():
            print(f"  {kind[:-1]:6} {name:14} {info['dtype']:8} {info['shape']}")
    print(f"time: {timing}")
    if report is not None:
        print(report.to_text())
    return status
