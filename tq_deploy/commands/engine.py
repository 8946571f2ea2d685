"""tq-deploy engine: build a TensorRT engine of a TurboQuant model with the plugin library, and report.

    # export the decode model (same options as `tq-deploy export`), then build out/model.engine
    tq-deploy engine --out out/ --k-bits 4 --v-bits 4 --head-dim 128 --num-q-heads 32 --num-kv-heads 8
    # one op
    tq-deploy engine --out out/ --op TQPagedAttention --bits 3 --head-dim 128
    # an existing model, with profile ranges of its dynamic dims (min,opt,max)
    tq-deploy engine --onnx model.onnx --out out/ --dim batch=1,8,64 --dim num_blocks=1,256,4096

Prints a JSON report (tq_deploy.runtime.tensorrt.tensorrt_stage) and writes it to
OUT/engine_report.json. TensorRT-RTX builds the engine without a GPU; running it needs a GPU it
supports (not the H200). `tq-deploy validate model.onnx --engine OUT/model.engine` compares it.
Exit status: 0 built, 1 not built (TensorRT or the plugin library missing: the reason is printed).
"""

from __future__ import annotations

import json
import os
import sys

from tq_deploy.commands.export import add_model_arguments
from tq_deploy.ops import OPS_BY_NAME


def parse_dim(text: str) -> tuple[str, tuple[int, int, int]]:
    try:
        name, values = text.split("=", 1)
        lo, opt, hi = (int(v) for v in values.split(","))
    except ValueError:
        raise ValueError(f"--dim {text!r}, expected NAME=MIN,OPT,MAX (e.g. batch=1,8,64)") from None
    if not (1 <= lo <= opt <= hi):
        raise ValueError(f"--dim {text!r}, expected 1 <= MIN <= OPT <= MAX")
    return name, (lo, opt, hi)


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder (<model>.onnx when exported, <model>.engine, "
                                                     "engine_report.json)")
    parser.add_argument("--onnx", help="build this model instead of exporting one")
    parser.add_argument("--op", choices=sorted(OPS_BY_NAME), help="export one op instead of the decode model")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="float type of a single-op model's x/key/value/query (--op; the synthetic decode "
                             "model is float32 only)")
    parser.add_argument("--dim", action="append", default=[], metavar="NAME=MIN,OPT,MAX",
                        help="profile range of a dynamic dim (repeatable)")
    parser.add_argument("--backend", choices=("auto", "rtx", "tensorrt"), default=None,
                        help="TensorRT flavour (default: env TQ_DEPLOY_TRT_BACKEND or auto)")
    parser.add_argument("--no-aliasing", action="store_true",
                        help="do not enable aliased plugin I/O (TQCacheUpdate then copies its caches)")
    add_model_arguments(parser)


def run(args) -> int:
    from tq_deploy import files
    from tq_deploy.commands.export import model_from_args
    from tq_deploy.export.common import save_model
    from tq_deploy.export.loaded import ExportedModel
    from tq_deploy.runtime.tensorrt import tensorrt_stage

    dims = dict(parse_dim(d) for d in args.dim)
    if args.onnx and args.dtype != "float32":
        raise ValueError(f"--dtype={args.dtype!r} with --onnx, expected 'float32' (the default): a given model "
                         "keeps its own types")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a file, expected a folder")
    # the model first: a bad model or option leaves no folder behind
    model = ExportedModel.load(args.onnx) if args.onnx else None
    exported = model_from_args(args) if model is None else None
    os.makedirs(args.out, exist_ok=True)
    files.check_writable(os.path.join(args.out, "engine_report.json"), "--out")
    if model is None:
        path = os.path.join(args.out, f"{args.op or 'model'}.onnx")
        model = ExportedModel(exported, path)
        save_model(model.proto, path)
    report = tensorrt_stage(model, args.out, dims=dims or None, backend=args.backend,
                            aliased_plugin_io=not args.no_aliasing)
    text = json.dumps(report, indent=2, default=str)
    files.write_text(os.path.join(args.out, "engine_report.json"), text)
    print(text)
    if report["status"] != "built":
        print(f"tq-deploy engine: engine not built: {report['reason']}", file=sys.stderr)
        return 1
    return 0
