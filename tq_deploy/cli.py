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
    "validate": ("tq_deploy.commands.validate", "measured MSE per bit width against the paper's bounds"),
    "bench": ("tq_deploy.commands.bench", "encode/decode throughput and the MSE table"),
    "export": ("tq_deploy.commands.export", "export the reference model (or one op) to ONNX"),
    "run": ("tq_deploy.commands.run", "run an exported model in ONNX Runtime with the custom-op library"),
    "pipeline": ("tq_deploy.commands.pipeline", "the main job: export, ORT session, comparison with the reference"),
    "eval-ppl": ("tq_deploy.commands.eval_ppl", "perplexity of a real model with a TurboQuant KV cache"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tq-deploy", description="TurboQuant KV-cache compression for ONNX Runtime and TensorRT deployment."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module_name)
        # Arguments are added lazily below, only for the command being run.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Find the command name first, then let its module add its arguments.
    known, _ = parser.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    module = importlib.import_module(known._module)
    sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    module.add_arguments(sub_action.choices[known.command])
    args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input or a missing build: one line, not a traceback
        print(f"tq-deploy {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
