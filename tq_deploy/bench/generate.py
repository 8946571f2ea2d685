"""End-to-end generation of a real model: tq-deploy in ONNX Runtime beside onnxruntime-genai and transformers.

    tq-deploy bench generate                                   # CPU: SmolLM2, batch 1/8, prompts of 256/1024 tokens
    tq-deploy bench generate --provider cuda --batch 1 8 32 --context 4096 32768 --new-tokens 64

Each engine runs the same checkpoint (``--model``, default the shipped SmolLM2-135M) on the same
prompts: ``batch`` prompts of ``context`` tokens each, cut from the shipped texts (equal lengths, so
that onnxruntime-genai needs no padding), then ``new-tokens`` greedy tokens each. Prefill and decode
are timed apart, as tokens per second over the whole batch:

    tq-deploy        the model exported by ``tq-deploy export --model`` with a TurboQuant cache
                     (``--kv-preset``/``--k-bits``/``--v-bits``), run by LLMSession + generate_ids
    genai fp32|fp16  onnxruntime-genai 0.18: its model builder's export of the same checkpoint
                     (GroupQueryAttention, an fp32 KV cache on the CPU, fp16 with --provider cuda), its
                     Generator (append_tokens = prefill, generate_next_token = decode)
    transformers     the checkpoint in PyTorch with its DynamicCache (fp32 on the CPU, fp16 on CUDA)

Beside the rates, each row gives the KV cache's bytes per token (all layers, keys and values) and what a
fixed KV budget (``--kv-budget-gib``) holds: tokens in all, and the largest batch at ``context`` +
``new-tokens``. The checkpoint is saved as a Hugging Face folder once (under ``--work-dir``) with
``max_position_embeddings`` raised to the longest context benchmarked when that is past the
model's own (plain RoPE does not depend on it; quality past the trained length is not the point here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tq_deploy.cli import count

ENGINES = ("tq-deploy", "genai", "transformers")


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2", metavar="PATH|NAME",
                   help="checkpoint: smollm2, a Hugging Face folder or a GGUF file (default smollm2)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=count(1), nargs="+", default=None,
                   help="prompts per batch (default 1 8 on cpu, 1 8 32 on cuda)")
    p.add_argument("--context", type=count(2), nargs="+", default=None,
                   help="prompt tokens per sequence (default 256 1024 on cpu, 4096 32768 on cuda)")
    p.add_argument("--new-tokens", type=count(1), default=None, help="greedy tokens per prompt (default 16 cpu, 64 cuda)")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--kv-preset", default="compact", metavar="NAME",
                   help="TurboQuant preset of the tq-deploy rows (default compact; --k-bits/--v-bits instead)")
    p.add_argument("--k-bits", type=int, default=None)
    p.add_argument("--v-bits", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "float16"), default=None,
                   help="weights of the tq-deploy export and the genai/transformers precision "
                        "(default float32 on cpu, float16 on cuda)")
    p.add_argument("--chunk-size", type=count(1), default=2048, help="prefill chunk of the tq-deploy rows (default 2048)")
    p.add_argument("--kv-budget-gib", type=float, default=None, help="KV memory budget (default 1 on cpu, 16 on cuda)")
    p.add_argument("--threads", type=count(1), default=None, help="intra-op threads of every engine on the CPU")
    p.add_argument("--work-dir", default=".bench-generate", help="exports are kept here between runs")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")


@dataclass
class Row:
    engine: str
    kv: str
    batch: int
    context: int
    new_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    kv_bytes_per_token: int
    budget_tokens: int
    budget_batch: int
    note: str = ""


def _defaults(args) -> None:
    cuda = args.provider == "cuda"
    args.batch = args.batch or ([1, 8, 32] if cuda else [1, 8])
    args.context = args.context or ([4096, 32768] if cuda else [256, 1024])
    args.new_tokens = args.new_tokens or (64 if cuda else 16)
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    args.kv_budget_gib = args.kv_budget_gib if args.kv_budget_gib is not None else (16.0 if cuda else 1.0)
    if not (args.kv_budget_gib > 0 and args.kv_budget_gib < 1e6):
        raise ValueError(f"--kv-budget-gib={args.kv_budget_gib}, expected a number in (0, 1e6)")


def _prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    """``batch`` prompts of exactly ``length`` tokens, windows of the shipped texts (repeated as needed)."""
    from tq_deploy.eval.model import SHIPPED_TEXTS, read_text, shipped_text_path

    ids = []
    for name in SHIPPED_TEXTS.values():
        ids += tokenizer(read_text(shipped_text_path(name)), add_special_tokens=False).input_ids
    need = length + batch * 97
    ids = (ids * (need // len(ids) + 1))[:need]
    return [ids[i * 97:i * 97 + length] for i in range(batch)]


def _budget(bytes_per_token: int, gib: float, tokens_per_seq: int) -> tuple[int, int]:
    total = int(gib * 2**30 // bytes_per_token)
    return total, total // tokens_per_seq


def _hf_folder(args, loaded, max_positions: int) -> Path:
    from tq_deploy.models.checkpoint import load_tokenizer, save_hf_folder

    folder = Path(args.work_dir) / f"hf-{max_positions}"
    if not (folder / "config.json").is_file():
        save_hf_folder(loaded, folder)
        load_tokenizer(args.model).save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        if config.get("max_position_embeddings", 0) < max_positions:
            config["max_position_embeddings"] = max_positions
            (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _kv_fp_bytes(hf_config, itemsize: int) -> int:
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return hf_config.num_hidden_layers * 2 * hf_config.num_key_value_heads * head_dim * itemsize


def run_tq(args, folder: Path, prompts, new_tokens: int) -> tuple[float, float, int]:
    from tq_deploy.runtime.generation import GenerationStats, blocks_needed, generate_ids
    from tq_deploy.runtime.llm_session import LLMSession

    model = _tq_export(args, folder)
    session = LLMSession(model, provider=args.provider, threads=args.threads)
    session.resize(blocks_needed([len(p) for p in prompts], new_tokens, session.block_size) + 1)
    stats = GenerationStats()
    generate_ids(session, prompts, max_new_tokens=new_tokens, chunk_size=args.chunk_size, stats=stats,
                 max_context=None)
    rates = stats.rates()
    per_token = session.cache_bytes() // (session.num_blocks * session.block_size)
    return rates["prefill_tokens_per_s"], rates["decode_tokens_per_s"], per_token


def _tq_export(args, folder: Path) -> str:
    bits = f"k{args.k_bits}v{args.v_bits}" if args.k_bits else args.kv_preset
    out = Path(args.work_dir) / f"tq-{folder.name}-{bits}-{args.dtype}.onnx"
    if not out.is_file():
        cmd = [sys.executable, "-m", "tq_deploy.cli", "export", "--model", str(folder), "--dtype", args.dtype,
               "--out", str(out)]
        cmd += ["--k-bits", str(args.k_bits), "--v-bits", str(args.v_bits)] if args.k_bits else ["--kv-preset",
                                                                                                  args.kv_preset]
        subprocess.run(cmd, check=True)
    return str(out)


def run_genai(args, folder: Path, prompts, new_tokens: int) -> tuple[float, float]:
    import numpy as np
    import onnxruntime_genai as og

    precision = "fp16" if args.dtype == "float16" else "fp32"
    out = Path(args.work_dir) / f"genai-{folder.name}-{precision}-{args.provider}"
    if not (out / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(folder), "-i", str(folder),
                        "-o", str(out), "-p", precision, "-e", args.provider], check=True,
                       stdout=subprocess.DEVNULL)
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    batch, length = len(prompts), len(prompts[0])
    params.set_search_options(max_length=length + new_tokens, batch_size=batch, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(np.asarray(prompts, dtype=np.int32))
    prefill = time.perf_counter() - start
    start, made = time.perf_counter(), 0
    while made < new_tokens - 1 and not generator.is_done():
        generator.generate_next_token()
        made += 1
    decode = time.perf_counter() - start
    return batch * length / prefill, batch * made / decode if made else float("nan")


def run_transformers(args, loaded, prompts, new_tokens: int) -> tuple[float, float]:
    import torch

    device = "cuda" if args.provider == "cuda" else "cpu"
    dtype = torch.float16 if args.dtype == "float16" else torch.float32
    model = loaded.to(device=device, dtype=dtype).eval()
    ids = torch.tensor(prompts, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        prefill = time.perf_counter() - start
        cache = out.past_key_values
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        decode = time.perf_counter() - start
    batch, length = ids.shape
    return batch * length / prefill, batch * (new_tokens - 1) / decode


def run(args) -> int:
    import torch

    from tq_deploy.models.checkpoint import load_hf_model, resolve_source

    _defaults(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    source = resolve_source(args.model)
    hf = load_hf_model(source)
    longest = max(args.context) + args.new_tokens
    folder = _hf_folder(args, hf, max(longest, hf.config.max_position_embeddings))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    fp_itemsize = 2 if args.dtype == "float16" else 4
    fp_bytes = _kv_fp_bytes(hf.config, fp_itemsize)
    rows: list[Row] = []
    for context in args.context:
        for batch in args.batch:
            prompts = _prompts(tokenizer, batch, context)
            per_seq = context + args.new_tokens
            for engine in args.engines:
                try:
                    if engine == "tq-deploy":
                        prefill, decode, kv_bytes = run_tq(args, folder, prompts, args.new_tokens)
                        kv = args.kv_preset if not args.k_bits else f"k{args.k_bits}v{args.v_bits}"
                    elif engine == "genai":
                        prefill, decode = run_genai(args, folder, prompts, args.new_tokens)
                        kv, kv_bytes = ("fp16" if fp_itemsize == 2 else "fp32"), fp_bytes
                    else:
                        prefill, decode = run_transformers(args, hf, prompts, args.new_tokens)
                        kv, kv_bytes = ("fp16" if fp_itemsize == 2 else "fp32"), fp_bytes
                    note = ""
                except Exception as err:  # noqa: BLE001 - one engine failing (memory, a missing package) is a row
                    prefill = decode = float("nan")
                    kv, kv_bytes, note = "-", fp_bytes, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                total, fit = _budget(kv_bytes, args.kv_budget_gib, per_seq)
                rows.append(Row(engine, kv, batch, context, args.new_tokens, prefill, decode, kv_bytes, total, fit,
                                note))
                print(_format(rows[-1]), flush=True)
    _table(args, rows)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


def _format(r: Row) -> str:
    return (f"{r.engine:<13} {r.kv:<8} {r.batch:>5} {r.context:>7} {r.prefill_tok_s:>12.1f} {r.decode_tok_s:>11.1f} "
            f"{r.kv_bytes_per_token:>9} {r.budget_tokens:>11} {r.budget_batch:>9}" + (f"  {r.note}" if r.note else ""))


def _table(args, rows: list[Row]) -> None:
    import platform

    print()
    print(f"generation, {args.model}, provider {args.provider}, weights {args.dtype}, {args.new_tokens} new tokens, "
          f"KV budget {args.kv_budget_gib:g} GiB, host {platform.processor() or platform.machine()} "
          f"({os.cpu_count()} cores)")
    print(f"{'engine':<13} {'kv':<8} {'batch':>5} {'context':>7} {'prefill t/s':>12} {'decode t/s':>11} "
          f"{'KV B/tok':>9} {'budget tok':>11} {'max batch':>9}")
    for r in rows:
        print(_format(r))
    by = {}
    for r in rows:
        by.setdefault((r.batch, r.context), {})[r.engine] = r
    for (batch, context), group in sorted(by.items()):
        ours, base = group.get("tq-deploy"), group.get("genai")
        if ours and base and base.decode_tok_s == base.decode_tok_s and ours.decode_tok_s == ours.decode_tok_s:
            print(f"batch {batch} context {context}: tq-deploy decode {ours.decode_tok_s / base.decode_tok_s:.2f}x "
                  f"genai, {base.kv_bytes_per_token / ours.kv_bytes_per_token:.2f}x the tokens per GiB")
