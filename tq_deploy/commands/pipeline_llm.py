"""tq-deploy pipeline on a real LLM (the default job): export -> check -> ORT session -> generate -> compare
-> engine -> polygraphy, each step handed the one ExportedModel the export made.

    1. export      the checkpoint (default the shipped SmolLM2-135M) with a TurboQuant cache, OUT/model.onnx
    2. check       onnx.checker (full, inside the export) and shape inference with the TurboQuant schemas
    3. session     ONNX Runtime (CPU EP) with the custom-op library, every layer's cache resident and in place
    4. generate    greedy tokens for fixed prompts (chunked prefill, then decode) in ONNX Runtime and in the
                   PyTorch reference decoder rebuilt from the file's initializers: the tokens must be identical,
                   or, where the two part at a code one took the other way at a rounding tie, ORT's tokens
                   must be the reference's greedy choices on ORT's codes (validate.llm.greedy_on_same_codes)
    5. compare     one step (a second prefill chunk beside a decode token, over a cache the reference filled)
                   against the reference aligned to ORT's codes: differing codes must be rounding ties, every
                   float output within float32 tolerance (tq_deploy/validate/llm.py)
    5b. ORT CUDA   steps 4 and 5 on the CUDA EP where onnxruntime-gpu and a CUDA device are present
    6. engine      TensorRT engine build with the TurboQuant plugins (TensorRT-RTX builds on a CPU-only machine)
    7. polygraphy  the reference and ONNX Runtime (CPU, CUDA where it runs; TensorRT where it runs) through
                   polygraphy's Comparator on the step of 5

The verdict (exit status and report.json's "passed") is every step's: ORT CPU and CUDA comparisons,
tokens (identical, or the reference's on the same codes), polygraphy.
"""

from __future__ import annotations

import json
import os
import time

DEFAULT_PROMPTS = ("The capital of France is", "Once upon a time, in a small village by the sea,")
DEFAULT_PRESET = "balanced"


def run(args) -> int:
    from tq_deploy import files
    from tq_deploy.commands.pipeline import polygraphy_stage
    from tq_deploy.runtime.session import cuda_unavailable_reason
    from tq_deploy.runtime.tensorrt import tensorrt_stage
    from tq_deploy.validate.llm import llm_inputs, llm_outputs

    options = _check_options(args)
    steps: dict = {}
    model = _export(args, options, steps)
    typed = _check_shapes(model)
    tokenizer = _tokenizer(model)
    prompts = list(args.prompt or DEFAULT_PROMPTS)
    reference_tokens = _generate(model, "reference", prompts, tokenizer, args.new_tokens, steps)
    cpu = _generate(model, "cpu", prompts, tokenizer, args.new_tokens, steps)
    feeds = llm_inputs(model, seed=args.input_seed)
    cpu_report = _compare(model, feeds, "cpu", steps)
    why_not_cuda = cuda_unavailable_reason(model.library)
    cuda = cuda_report = None
    if not why_not_cuda:
        cuda = _generate(model, "cuda", prompts, tokenizer, args.new_tokens, steps)
        cuda_report = _compare(model, feeds, "cuda", steps)
    engine = tensorrt_stage(model, args.out_dir, name="model")
    polygraphy = polygraphy_stage(model, feeds, llm_outputs(model, feeds), engine)
    same_cpu = tokens_agree(model, "cpu", prompts, tokenizer, args.new_tokens, cpu, reference_tokens)
    same_cuda = cuda is None or tokens_agree(model, "cuda", prompts, tokenizer, args.new_tokens, cuda, reference_tokens)
    passed = bool(cpu_report.passed and same_cpu and (cuda_report is None or cuda_report.passed) and same_cuda
                  and polygraphy.get("passed", True))
    report = {
        "passed": passed,
        "model_path": model.path,
        "config": model.metadata,
        "steps": steps,
        "prompts": prompts,
        "generation": {"reference": reference_tokens, "ort_cpu": cpu, "ort_cuda": cuda or {"status": "skipped",
                                                                                           "reason": why_not_cuda}},
        "ort_cpu": cpu_report.to_dict(),
        "ort_cuda": cuda_report.to_dict() if cuda_report else {"status": "skipped", "reason": why_not_cuda},
        "tensorrt": engine,
        "polygraphy": {k: v for k, v in polygraphy.items() if k != "text"},
    }
    text = json.dumps(report, indent=2, default=str)
    files.write_text(os.path.join(args.out_dir, "report.json"), text)
    if args.json:
        print(text)
    else:
        _print(model, typed, cpu, cpu_report, cuda, cuda_report, why_not_cuda, engine, polygraphy,
               steps, args.out_dir, passed)
    return 0 if passed else 1


def _check_options(args) -> dict:
    from tq_deploy.commands.export import llm_options_from_args
    from tq_deploy.commands.pipeline import make_out_dir

    if args.new_tokens < 1:
        raise ValueError(f"--new-tokens={args.new_tokens}, expected >= 1")
    if args.kv_preset is None and args.plan is None and all(getattr(args, n) is None for n in ("bits", "k_bits",
                                                                                                 "v_bits")):
        args.kv_preset = DEFAULT_PRESET
    args.op = None
    options = llm_options_from_args(args)
    make_out_dir(args.out_dir)
    return options


def _export(args, options: dict, steps: dict):
    """1. The checkpoint exported whole (onnx.checker full_check inside), written to OUT/model.onnx."""
    from tq_deploy.export.llm import export_llm
    from tq_deploy.export.loaded import ExportedModel

    path = os.path.join(args.out_dir, "model.onnx")
    start = time.perf_counter()
    proto = export_llm(args.model, path, dtype=args.dtype, **options)
    steps["export_s"] = time.perf_counter() - start
    return ExportedModel(proto, path, args.library)


def _check_shapes(model) -> int:
    """2. Shape inference with the TurboQuant schemas types every node output (weights left out: only their shapes
    matter); returns their count."""
    from tq_deploy.export.llm import _without_weights
    from tq_deploy.export.schemas import infer_shapes

    inferred = infer_shapes(_without_weights(model.proto))
    typed = {v.name for v in (*inferred.graph.value_info, *inferred.graph.output)
             if v.type.tensor_type.HasField("shape")}
    outputs = [o for n in inferred.graph.node for o in n.output if o]
    untyped = [o for o in outputs if o not in typed]
    if untyped:
        raise RuntimeError(f"shape inference left {len(untyped)} values without a shape: {untyped[:5]}")
    return len(outputs)


def _tokenizer(model):
    from tq_deploy.runtime.generate import load_tokenizer, tokenizer_source

    return load_tokenizer(tokenizer_source(model.metadata))


def _prompt_ids(model, prompts, tokenizer, new_tokens: int) -> tuple[list, int]:
    """4. The prompts' token ids and the cache blocks their generation needs."""
    from tq_deploy.runtime.generation import blocks_needed

    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    return ids, blocks_needed([len(i) for i in ids], new_tokens, model.metadata["block_size"]) + 1


def _generate(model, where: str, prompts, tokenizer, new_tokens: int, steps: dict) -> dict:
    """4. Greedy tokens of every prompt, batched, on ``where`` (reference, cpu or cuda)."""
    from tq_deploy.runtime.generation import GenerationStats, generate_ids
    from tq_deploy.runtime.generate import eos_token_ids

    ids, num_blocks = _prompt_ids(model, prompts, tokenizer, new_tokens)
    if where == "reference":
        from tq_deploy.runtime.reference_backend import ReferenceBackend
        from tq_deploy.validate.llm import reference_decoder

        backend = ReferenceBackend(reference_decoder(model), num_blocks=num_blocks)
    else:
        from tq_deploy.runtime.llm_session import LLMSession

        backend = LLMSession(model.path, provider=where, num_blocks=num_blocks, library=model.library)
    stats = GenerationStats()
    start = time.perf_counter()
    done = generate_ids(backend, ids, max_new_tokens=new_tokens, eos_token_ids=eos_token_ids(model.metadata, tokenizer),
                        stats=stats)
    steps[f"generate_{where}_s"] = time.perf_counter() - start
    tokens = [c.tokens for c in done]
    return {"tokens": tokens, "text": [tokenizer.decode(t) for t in tokens], **stats.rates()}


def tokens_agree(model, where: str, prompts, tokenizer, new_tokens: int, ort: dict, reference: dict) -> bool:
    """4. Whether ORT's tokens (``ort``, from _generate) are the reference's: identical, or, where the two
    parted, the reference's greedy choices on ORT's codes (the generation run again with the reference
    aligned to ORT). Sets ``ort["agreement"]`` ("identical", "same codes" or "different") and, after a
    parting, ``ort["same_codes"]`` (the aligned check's text)."""
    from tq_deploy.runtime.generate import eos_token_ids
    from tq_deploy.runtime.llm_session import LLMSession
    from tq_deploy.validate.llm import greedy_on_same_codes, reference_decoder

    if ort["tokens"] == reference["tokens"]:
        ort["agreement"] = "identical"
        return True
    ids, num_blocks = _prompt_ids(model, prompts, tokenizer, new_tokens)
    session = LLMSession(model.path, provider=where, num_blocks=num_blocks, library=model.library)
    check = greedy_on_same_codes(session, reference_decoder(model), ids, new_tokens,
                                 eos_token_ids(model.metadata, tokenizer))
    agree = check.passed and check.tokens == ort["tokens"]
    ort["agreement"] = "same codes" if agree else "different"
    ort["same_codes"] = check.text() + ("" if check.tokens == ort["tokens"] else "; a second run gave other tokens")
    return agree


def _agreement_line(result: dict) -> str:
    if result["agreement"] == "identical":
        return "tokens identical to the PyTorch reference decoder's"
    if result["agreement"] == "same codes":
        return ("tokens part from the free-running reference's at a rounding tie; on ORT's codes the reference "
                "chooses ORT's tokens (" + result["same_codes"] + ")")
    return "tokens DIFFERENT from the reference's, also on ORT's codes (" + result["same_codes"] + ")"


def _compare(model, feeds, provider: str, steps: dict):
    """5 / 5b. One step in ONNX Runtime against the reference aligned to its codes."""
    from tq_deploy.validate.ort import validate_with_ort

    start = time.perf_counter()
    report = validate_with_ort(model, feeds, None, provider=provider)
    steps[f"compare_{provider}_s"] = time.perf_counter() - start
    report.title = f"{model.path} in ONNX Runtime ({provider.upper()} EP) vs the PyTorch reference decoder"
    return report


def _print(model, typed, cpu, cpu_report, cuda, cuda_report, why_not_cuda, engine, polygraphy, steps,
           out_dir, passed) -> None:
    from tq_deploy.commands.pipeline import engine_line

    c = model.metadata
    widths = f"k{c['k_bits']}v{c['v_bits']}" if not c.get("layer_bits") else "per-layer plan"
    print(f"1. export   {model.path}: {c['architecture']} ({c['num_layers']} layers, Hq={c['num_q_heads']} "
          f"Hkv={c['num_kv_heads']} D={c['head_dim']}, {c['dtype']}), cache {widths} block {c['block_size']}; "
          f"{len(model.proto.graph.node)} nodes, custom {', '.join(model.custom_ops)} ({steps['export_s']:.0f} s)")
    print(f"2. check    onnx.checker full_check ok; shape inference typed all {typed} node outputs")
    print("3. session  ONNX Runtime CPU EP with the TurboQuant custom-op library, caches resident and bound in place")
    for i, text in enumerate(cpu["text"]):
        print(f"4. generate [{i}] {text!r}")
    print(f"   ORT CPU: prefill {cpu['prefill_tokens_per_s']:.0f} tokens/s, decode {cpu['decode_tokens_per_s']:.1f} "
          f"tokens/s; {_agreement_line(cpu)}")
    print("5. compare")
    print("   " + cpu_report.to_text().replace("\n", "\n   ") if _short(cpu_report) else "   " + _summary(cpu_report))
    if cuda_report is not None:
        print(f"5b. ORT CUDA: decode {cuda['decode_tokens_per_s']:.1f} tokens/s; {_agreement_line(cuda)}")
        print("   " + _summary(cuda_report))
    else:
        print(f"5b. ORT CUDA skipped: {why_not_cuda}")
    print(engine_line(engine))
    if polygraphy["status"] == "ran":
        print(f"7. polygraphy  runners {', '.join(polygraphy['runners'])}; TensorRT runner: {polygraphy['tensorrt']}; "
              + ("every runner within tolerance" if polygraphy["passed"] else "OUTSIDE TOLERANCE"))
    else:
        print(f"7. polygraphy  skipped: {polygraphy['reason']}")
    print(f"result: {'PASSED' if passed else 'FAILED'}; report: {os.path.join(out_dir, 'report.json')}")


def _short(report) -> bool:
    return len(report.outputs) <= 12


def _summary(report) -> str:
    """A many-output report in three lines: the logits row, the codes row, the worst other row and the verdict."""
    rows = {o.name: o for o in report.outputs}
    logits, codes = rows.get("logits"), rows.get("codes vs the reference")
    others = [o for o in report.outputs if o.name not in ("logits", "codes vs the reference")]
    failed = [o.name for o in report.outputs if not o.passed]
    worst = max(others, key=lambda o: o.max_abs, default=None)
    lines = []
    if logits is not None:
        lines.append(f"logits {'x'.join(map(str, logits.shape))}: max abs {logits.max_abs:.3g}, max rel "
                     f"{logits.max_rel:.3g}")
    if codes is not None:
        lines.append(codes.note)
    if worst is not None:
        lines.append(f"{len(others)} cache outputs: worst {worst.name} max abs {worst.max_abs:.3g}")
    lines.append("result: " + ("within tolerance" if report.passed else f"OUTSIDE TOLERANCE ({', '.join(failed[:6])})"))
    return "\n   ".join(lines)
