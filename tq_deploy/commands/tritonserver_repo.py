"""tq-deploy triton-repo OUT: a Triton Inference Server model repository for the decode step.

    tq-deploy triton-repo repo/                         # export the default model, write repo/
    tq-deploy triton-repo repo/ --model model.onnx --max-tokens 4096 --device gpu --gpus 0 1
    tq-deploy triton-repo repo/ --server-path /models   # paths as a container will see the folder

Writes an onnxruntime-backend model (the custom-op library through model_operations) and a
tensorrt-backend variant, each keeping every sequence's KV cache in tritonserver as sequence-batcher
implicit state, plus repo/README.md with the versions the library needs and the commands to
start the server (tq_deploy/serve/repository.py has the details). Prints where everything went.
"""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("out", help="folder to write (new or empty, unless --force)")
    parser.add_argument("--model", help="the decode model (.onnx from tq-deploy export; default: export the "
                                        "default TQModelConfig model)")
    parser.add_argument("--max-tokens", type=int,
                        help="tokens one sequence may hold, rounded up to whole blocks (default: the model "
                             "config's max_blocks_per_seq x block_size)")
    parser.add_argument("--max-batch", type=int, default=32, help="sequences per batched step (default 32)")
    parser.add_argument("--max-sequences", type=int, default=256,
                        help="sequences the batcher serves at once (default 256)")
    parser.add_argument("--queue-delay-us", type=int, default=500, help="batcher wait to fill a step (default 500)")
    parser.add_argument("--idle-seconds", type=float, default=300.0,
                        help="tritonserver drops a sequence idle this long (default 300)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="instance_group kind (default cpu)")
    parser.add_argument("--gpus", type=int, nargs="+", help="GPU ids of a gpu instance group (default: all)")
    parser.add_argument("--instances", type=int, default=1, help="model instances per device (default 1)")
    parser.add_argument("--server-path", help="where the server sees OUT (default: OUT's absolute path)")
    parser.add_argument("--library", help="custom-op library to copy (default: the built one)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    import tempfile
    from pathlib import Path

    from tq_deploy.serve.repository import write_repository

    for flag in ("max_tokens", "max_batch", "max_sequences", "instances"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value}, expected >= 1")
    if args.queue_delay_us < 0:
        raise ValueError(f"--queue-delay-us {args.queue_delay_us}, expected >= 0")
    if not args.idle_seconds > 0:
        raise ValueError(f"--idle-seconds {args.idle_seconds}, expected > 0")
    if args.gpus and args.device != "gpu":
        raise ValueError(f"--gpus {args.gpus} with --device {args.device}, expected --device gpu")
    if args.server_path is not None and not args.server_path.startswith("/"):
        raise ValueError(f"--server-path {args.server_path!r}, expected an absolute path")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {args.out!r} is a file, expected a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ValueError(f"OUT {args.out!r} is not empty, expected a new or empty folder (or --force)")
    from tq_deploy.runtime.session import check_custom_nodes, check_library

    # what `run` refuses is refused here too, before it is copied into a repository a server loads
    check_library(args.library)
    if args.model is not None:
        from tq_deploy.export.loaded import ExportedModel

        check_custom_nodes(ExportedModel.load(args.model).proto)
    with tempfile.TemporaryDirectory(prefix="tq-deploy-repo-") as scratch:
        model = args.model
        if model is None:
            from tq_deploy.export.model import export_model

            if not args.json:
                print("tq-deploy triton-repo: exporting the default decode model", flush=True)
            model = export_model(None, str(Path(scratch) / "model.onnx"))
        repo = write_repository(out, model, max_tokens=args.max_tokens, max_batch=args.max_batch,
                                instances=args.instances, device=args.device, gpus=args.gpus,
                                max_sequences=args.max_sequences, queue_delay_us=args.queue_delay_us,
                                idle_seconds=args.idle_seconds, server_path=args.server_path,
                                library=args.library, overwrite=args.force)
    if args.json:
        print(json.dumps({k: v for k, v in repo.to_dict().items() if not k.endswith("_config")}, indent=2))
        return 0
    checked = f"checked against {repo.tritonclient_schema}'s model_config.proto" if repo.tritonclient_schema \
        else "not checked (tritonclient is not installed)"
    print(f"tq-deploy triton-repo: wrote {out}/ (configs {checked})")
    print(f"  onnxruntime backend: {out}/onnxruntime/tq_decode (op library {repo.op_library})")
    print(f"  tensorrt backend:    {out}/tensorrt/tq_decode (model.plan to build: see {out}/README.md)")
    print(f"  per sequence: up to {repo.max_tokens} tokens, {repo.state_bytes_per_sequence / 2**10:.1f} KiB of state")
    print(f"  start: tritonserver --model-repository={repo.op_library.rsplit('/lib/', 1)[0]}/onnxruntime")
    return 0
