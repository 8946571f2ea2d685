"""tq-deploy validate: compare every backend that runs here with the PyTorch reference, through polygraphy.

    tq-deploy validate model.onnx                          # ORT CPU (+ ORT CUDA, TensorRT where they run)
    tq-deploy validate model.onnx --engine out/model.engine --seed 3 --json

Runners (polygraphy's Comparator, the same random valid inputs for all): the reference
(tq_deploy.reference rebuilt from the model's metadata), ONNX Runtime on the CPU EP, ONNX Runtime
on the CUDA EP when onnxruntime-gpu and a CUDA device are present, and TensorRT when an engine can
run here (a given --engine, else one built from the model). Each is compared with the reference
(packed codes per code). A runner that cannot run here is listed with the reason. Exit status:
0 every runner within tolerance, 1 otherwise.
"""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("model", help="an .onnx file exported by tq-deploy (its metadata rebuilds the reference)")
    parser.add_argument("--engine", help="a TensorRT engine of the model to compare too (else built when usable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--context-lens", type=int, nargs="+",
                        help="decode model: tokens per sequence, new token included (default: 1, a partial "
                             "block, a long one)")
    parser.add_argument("--library", help="custom-op library path (default: the built one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args) -> int:
    from tq_deploy.export.loaded import ExportedModel
    from tq_deploy.validate.inputs import random_inputs
    from tq_deploy.validate.polygraphy_run import compare_with_polygraphy
    from tq_deploy.validate.reference import reference_outputs

    if args.engine is not None:
        from tq_deploy import files

        files.check_engine(args.engine)  # where TensorRT cannot run, the engine would be skipped silently
    model = ExportedModel.load(args.model, library=args.library)
    feeds = random_inputs(model, seed=args.seed, context_lens=args.context_lens)
    expected = reference_outputs(model, feeds)
    result = compare_with_polygraphy(model, feeds=feeds, expected=expected, engine=args.engine)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "text"}, indent=2, default=str))
    else:
        print(f"{args.model}: runners {', '.join(result['runners'])}")
        for name, why in result["skipped"].items():
            print(f"  {name}: skipped: {why}")
        print(result["text"])
    return 0 if result["passed"] else 1
