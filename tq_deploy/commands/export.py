"""tq-deploy export: write the reference decode model (or one op) as ONNX with "turboquant" nodes.

    tq-deploy export --out model.onnx                      # the default decode model
    tq-deploy export --out model.onnx --k-bits 4 --v-bits 2 --head-dim 128 --num-q-heads 32 --num-kv-heads 8
    tq-deploy export --out enc.onnx --op TQEncode --bits 3 --head-dim 128
"""

from __future__ import annotations

from tq_deploy.ops import OPS_BY_NAME, SUPPORTED_BITS

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
}


def add_model_arguments(parser) -> None:
    """Options that pick a TQModelConfig (shared by export and pipeline)."""
    parser.add_argument("--bits", type=int, choices=SUPPORTED_BITS, help="bits of keys and values (both)")
    parser.add_argument("--k-bits", type=int, choices=SUPPORTED_BITS, help="bits of keys (overrides --bits)")
    parser.add_argument("--v-bits", type=int, choices=SUPPORTED_BITS, help="bits of values (overrides --bits)")
    for name, text in MODEL_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, dest=name, help=f"{text} (default: TQModelConfig's)")
    parser.add_argument("--max-blocks", type=int, dest="max_blocks_per_seq", help="alias of --max-blocks-per-seq")
    parser.add_argument("--rotation", choices=("haar", "hadamard"), help="rotation family (default haar)")


def config_from_args(args):
    """The TQModelConfig the options describe (unset options keep the dataclass defaults)."""
    from tq_deploy.reference.model import TQModelConfig

    values = {name: getattr(args, name) for name in MODEL_OPTIONS if getattr(args, name, None) is not None}
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
    parser.add_argument("--op", choices=sorted(OPS_BY_NAME), help="export one op instead of the decode model")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="float type of x/key/value/query in a single-op model (default float32)")
    add_model_arguments(parser)


def model_from_args(args):
    """The ONNX model the options describe: one op (``--op``) or the decode model, in memory.

    The op's bit attributes come from its spec: ``bits`` for the codec ops, ``k_bits``/``v_bits``
    for the cache ops."""
    from tq_deploy import ops

    config = config_from_args(args)
    if not args.op:
        from tq_deploy.export.model import export_model

        return export_model(config)
    from tq_deploy.export.single_op import make_op_model

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


def run(args) -> int:
    from tq_deploy import files
    from tq_deploy.export.common import read_metadata, save_model

    files.check_writable(args.out, "--out")
    model = model_from_args(args)
    save_model(model, args.out)
    kind, _ = read_metadata(model)
    custom = sorted({n.op_type for n in model.graph.node if n.domain == "turboquant"})
    opsets = ", ".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import)
    print(f"wrote {args.out}: {kind} {args.op or 'TQDecodeModel'}, IR {model.ir_version}, opsets {opsets}, "
          f"{len(model.graph.node)} nodes (custom: {', '.join(custom)})")
    print(describe(model))
    return 0
