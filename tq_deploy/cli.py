"""The ``tq-deploy`` command line.

Each subcommand lives in its own module, imported only when it runs, so that
``tq-deploy validate`` does not pay for importing ONNX Runtime or Triton. A
command module defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tq_deploy.cli_checks import count, harden  # noqa: F401 - count: the commands' type for counts

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": ("tq_deploy.commands.pipeline",
                 "the main job: export, ORT session(s), TensorRT engine build and polygraphy comparison"),
    "export": ("tq_deploy.commands.export", "export the reference decode model (or one op) to ONNX"),
    "run": ("tq_deploy.commands.run", "run an exported model in ONNX Runtime with the custom-op library"),
    "generate": ("tq_deploy.commands.generate",
                 "generate text with an exported LLM in ONNX Runtime (prefill, then decode; tokens streamed)"),
    "engine": ("tq_deploy.commands.engine", "build a TensorRT engine of a model with the TurboQuant plugins"),
    "validate": ("tq_deploy.commands.validate",
                 "compare every backend that runs here (ONNX Runtime CPU/CUDA, TensorRT) with the reference"),
    "bench": ("tq_deploy.commands.bench", "benchmarks: quantizer, gpu, ort, profile, sass"),
    "bounds": ("tq_deploy.commands.bounds", "the quantizer's measured MSE against the paper's bounds"),
    "eval-ppl": ("tq_deploy.commands.eval_ppl", "perplexity of a real model with a TurboQuant KV cache"),
    "eval-needle": ("tq_deploy.commands.eval_needle",
                    "needle-in-a-haystack retrieval of a real model with a quantized KV cache, against fp32"),
    "calibrate": ("tq_deploy.commands.calibrate",
                  "per-layer key/value sensitivity on a text -> a per-layer bit plan (JSON) for a PPL or memory budget"),
    "info": ("tq_deploy.commands.info", "what this install has: native libraries, providers, GPU backends"),
    "serve": ("tq_deploy.commands.serve",
              "serve the decode step in Triton Inference Server with the KV cache kept on the server"),
    "triton-repo": ("tq_deploy.commands.tritonserver_repo",
                    "write a tritonserver model repository (onnxruntime and tensorrt backends) for the decode step"),
    "fuzz": ("tq_deploy.commands.fuzz", "seeded fuzzing of the ONNX Runtime ops and the PyTorch API against the "
                                        "reference"),
    "fuzz-server": ("tq_deploy.commands.fuzz_server", "seeded hostile and valid requests against the LLM server: "
                                                      "it keeps answering, leaks nothing, its pool empties"),
    "soak": ("tq_deploy.commands.soak", "a long decode loop in ONNX Runtime with IO binding: memory flat, "
                                        "outputs equal to the reference"),
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``tq-deploy CMD: error: ...`` and exit status 2, like every
    other user error of the CLI (argparse would print the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def torch_device(text: str) -> str:
    """An argparse type: a torch device this machine has ("cpu", "cuda", "cuda:N")."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r}, expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return text
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"{text!r} is a {device.type} device, expected cpu, cuda or cuda:N")
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices == 0:
        raise argparse.ArgumentTypeError(f"{text!r}, but this machine has no CUDA device (torch "
                                         f"{torch.__version__}): expected cpu")
    if device.index is not None and device.index >= devices:
        raise argparse.ArgumentTypeError(f"{text!r}, expected cuda:0 .. cuda:{devices - 1} ({devices} CUDA devices)")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    if type(err).__module__.startswith("onnxruntime") and "[ONNXRuntimeError]" in text:
        # "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Non-zero status code ... Status Message: <what>": keep <what>
        what = text.split("Status Message: ", 1)[1] if "Status Message: " in text else text.split(" : ")[-1]
        return f"ONNX Runtime: {what}"
    return f"{type(err).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    at = _command_position(argv)
    if at is not None and argv[at] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[at]][0])
        sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        module.add_arguments(sub_action.choices[argv[at]])
        harden(sub_action.choices[argv[at]])
    args = parser.parse_args(argv)
    from tq_deploy.runtime import session

    previous = session.LOG_SEVERITY
    if not args.debug:
        session.LOG_SEVERITY = 4  # ORT's own log line would repeat the one error line printed below
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
    finally:
        session.LOG_SEVERITY = previous


if __name__ == "__main__":
    raise SystemExit(main())
