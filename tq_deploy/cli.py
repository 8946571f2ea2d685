"""The ``tq-deploy`` command line.

Each subcommand lives in its own module, imported only when it runs, so that
``tq-deploy validate`` does not pay for importing ONNX Runtime or Triton. A
command module defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": ("tq_deploy.commands.pipeline",
                 "the main job: export, ORT session(s), TensorRT engine build and polygraphy comparison"),
    "export": ("tq_deploy.commands.export", "export the reference decode model (or one op) to ONNX"),
    "run": ("tq_deploy.commands.run", "run an exported model in ONNX Runtime with the custom-op library"),
    "engine": ("tq_deploy.commands.engine", "build a TensorRT engine of a model with the TurboQuant plugins"),
    "validate": ("tq_deploy.commands.validate",
                 "compare every backend that runs here (ONNX Runtime CPU/CUDA, TensorRT) with the reference"),
    "bench": ("tq_deploy.commands.bench", "benchmarks: quantizer, gpu, ort, profile, sass"),
    "bounds": ("tq_deploy.commands.bounds", "the quantizer's measured MSE against the paper's bounds"),
    "eval-ppl": ("tq_deploy.commands.eval_ppl", "perplexity of a real model with a TurboQuant KV cache"),
    "calibrate": ("tq_deploy.commands.calibrate",
                  "per-layer key/value sensitivity on a text -> a per-layer bit plan (JSON) for a PPL or memory budget"),
    "info": ("tq_deploy.commands.info", "what this install has: native libraries, providers, GPU backends"),
    "serve": ("tq_deploy.commands.serve",
              "serve the decode step in Triton Inference Server with the KV cache kept on the server"),
    "triton-repo": ("tq_deploy.commands.triton_repo",
                    "write a Triton model repository (onnxruntime and tensorrt backends) for the decode step"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tq-deploy", description="TurboQuant KV-cache compression for ONNX Runtime and TensorRT deployment."
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module_name)
        # Arguments are added lazily below, only for the command being run.
    return parser


def _command_position(argv: list[str]) -> int | None:
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            return i
    return None


def error_line(err: BaseException) -> str:
    """One line for a user: the message of an error we raise on purpose, the type with it otherwise."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return text
    return f"{type(err).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    at = _command_position(argv)
    if at is not None and argv[at] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[at]][0])
        sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        module.add_arguments(sub_action.choices[argv[at]])
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"tq-deploy {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every user-facing failure is one line (--debug: the traceback)
        if args.debug:
            raise
        print(f"tq-deploy {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
