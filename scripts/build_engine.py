#!/usr/bin/env python3
"""Build a TensorRT engine of a TurboQuant ONNX model with the plugin library, and report.

    # export the decode model (same options as `tq-deploy export`), then build out/model.engine
    python scripts/build_engine.py --out out/ --k-bits 4 --v-bits 4 --head-dim 128 --num-q-heads 32 --num-kv-heads 8
    # one op
    python scripts/build_engine.py --out out/ --op TQPagedAttention --bits 3 --head-dim 128
    # an existing model, with profile ranges of its dynamic dims (min,opt,max)
    python scripts/build_engine.py --onnx model.onnx --out out/ --dim batch=1,8,64 --dim num_blocks=1,256,4096
    # also compare ONNX Runtime (and TensorRT, where a GPU can run it) with the reference through polygraphy
    python scripts/build_engine.py --out out/ --polygraphy

Prints a JSON report (tq_deploy.runtime.tensorrt.tensorrt_stage) and writes it to out/engine_report.json.
TensorRT-RTX builds the engine without a GPU; running it needs a GPU it supports (not the H200).
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tq_deploy.commands.export import add_model_arguments, config_from_args  # noqa: E402
from tq_deploy.ops import OPS_BY_NAME  # noqa: E402


def parse_dim(text: str) -> tuple[str, tuple[int, int, int]]:
    try:
        name, values = text.split("=", 1)
        lo, opt, hi = (int(v) for v in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dim {text!r}, expected NAME=MIN,OPT,MAX (e.g. batch=1,8,64)") from None
    return name, (lo, opt, hi)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (model.onnx, <model>.engine, engine_report.json)")
    parser.add_argument("--onnx", help="build this model instead of exporting one")
    parser.add_argument("--op", choices=sorted(OPS_BY_NAME), help="export one op instead of the decode model")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="float type of a single-op model's x/key/value/query")
    parser.add_argument("--dim", action="append", type=parse_dim, default=[],
                        help="profile range of a dynamic dim: NAME=MIN,OPT,MAX (repeatable)")
    parser.add_argument("--backend", choices=("auto", "rtx", "tensorrt"), default=None,
                        help="TensorRT flavour (default: env TQ_DEPLOY_TRT_BACKEND or auto)")
    parser.add_argument("--no-aliasing", action="store_true",
                        help="do not enable aliased plugin I/O (TQCacheUpdate then copies its caches)")
    parser.add_argument("--polygraphy", action="store_true",
                        help="also compare ORT (+ TensorRT when runnable) with the reference via polygraphy")
    parser.add_argument("--input-seed", type=int, default=1, help="seed of the polygraphy comparison inputs")
    add_model_arguments(parser)
    args = parser.parse_args(argv)

    from tq_deploy.runtime.tensorrt import tensorrt_stage

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.onnx:
        onnx_path = Path(args.onnx)
        if not onnx_path.is_file():
            parser.error(f"--onnx {args.onnx!r} does not exist")
    else:
        config = config_from_args(args)
        if args.op:
            from tq_deploy.export import make_op_model

            model = make_op_model(args.op, head_dim=config.head_dim, k_bits=config.k_bits, v_bits=config.v_bits,
                                  bits=config.k_bits, num_q_heads=config.num_q_heads,
                                  num_kv_heads=config.num_kv_heads, block_size=config.block_size, dtype=args.dtype,
                                  seed=config.seed)
            onnx_path = out / f"{args.op}.onnx"
            import onnx

            onnx.save(model, onnx_path)
        else:
            from tq_deploy.export import export_model

            onnx_path = out / "model.onnx"
            export_model(config, onnx_path)
    report = tensorrt_stage(onnx_path, out, dims=dict(args.dim) or None, backend=args.backend,
                            aliased_plugin_io=not args.no_aliasing)
    if args.polygraphy:
        from tq_deploy.validate.polygraphy_run import compare_with_polygraphy

        comparison = compare_with_polygraphy(onnx_path, seed=args.input_seed)
        print(comparison.pop("text"), file=sys.stderr)
        report["polygraphy"] = comparison
    (out / "engine_report.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    if report["status"] != "built":
        print(f"engine not built: {report['reason']}", file=sys.stderr)
        return 1
    return 0 if report.get("polygraphy", {}).get("passed", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
