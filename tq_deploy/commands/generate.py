"""tq-deploy generate: generate text with an exported LLM in ONNX Runtime, streaming tokens to stdout.

    tq-deploy generate smollm2.onnx --prompt "The capital of France is"
    tq-deploy generate smollm2.onnx --prompt "Once upon a time" --prompt "def fib(n):" --max-new-tokens 64
    tq-deploy generate smollm2.onnx --prompt "Hi" --temperature 0.8 --top-p 0.95 --seed 1 --provider cuda

One prompt streams its continuation as plain text. Several run as one batch and stream as
``[i] piece`` lines (i the prompt's index) as their tokens are made, followed by each whole
continuation. Token rates (prefill and decode apart) go to stderr.
"""

from __future__ import annotations

import argparse
import sys

from tq_deploy.cli import count


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number, expected a number in (0, 1]") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value}, expected a number in (0, 1]")
    return value


def temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number, expected a number >= 0") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value}, expected a finite number >= 0 (0 is greedy)")
    return value


def add_arguments(parser) -> None:
    parser.add_argument("model", help="the LLM .onnx file (exported by tq-deploy export --model)")
    parser.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                        help="a prompt, repeatable: several prompts run as one batch")
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                        help="ONNX Runtime execution provider: cpu, or cuda (CUDA EP, onnxruntime-gpu) (default cpu)")
    parser.add_argument("--max-new-tokens", type=count(1), default=32, help="new tokens per prompt at most (default 32)")
    parser.add_argument("--temperature", type=temperature, default=0.0,
                        help="sampling temperature; 0 is greedy (default 0)")
    parser.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass (default 1: off)")
    parser.add_argument("--seed", type=count(0), default=None,
                        help="seed of the sampling (default: a fresh one; greedy ignores it)")
    parser.add_argument("--chunk-size", type=count(1), default=256,
                        help="prompt tokens per sequence per prefill step (default 256)")
    parser.add_argument("--num-blocks", type=count(1), default=None,
                        help="cache blocks (default: enough for every prompt plus --max-new-tokens)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH|NAME",
                        help="tokenizer: a model folder, a GGUF file or smollm2 (default: the one the model names)")
    parser.add_argument("--threads", type=count(1), default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--library", help="custom-op library path (default: the built one, see runtime/library.py)")


def run(args) -> int:
    from tq_deploy.runtime.generate import generate
    from tq_deploy.runtime.generation import GenerationStats

    if any(not p for p in args.prompt):
        raise ValueError("--prompt='' is empty, expected some text")
    many = len(args.prompt) > 1
    out = sys.stdout

    def stream(i: int, piece: str) -> None:
        out.write(f"[{i}] {piece}\n" if many else piece)
        out.flush()

    stats = GenerationStats()
    results = generate(args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed, provider=args.provider, stream=stream,
                       tokenizer=args.tokenizer, chunk_size=args.chunk_size, num_blocks=args.num_blocks,
                       library=args.library, threads=args.threads, stats=stats)
    if many:
        for i, r in enumerate(results):
            out.write(f"\n--- [{i}] {r.prompt}\n{r.prompt}{r.text}\n")
    else:
        out.write("\n")
    out.flush()
    rates = stats.rates()
    print(f"prefill: {stats.prefill_tokens} tokens in {stats.prefill_seconds:.3f} s "
          f"({rates['prefill_tokens_per_s']:.1f} tokens/s); decode: {stats.decode_tokens} tokens in "
          f"{stats.decode_seconds:.3f} s ({rates['decode_tokens_per_s']:.1f} tokens/s); stopped: "
          + ", ".join(r.finish_reason for r in results), file=sys.stderr)
    return 0
