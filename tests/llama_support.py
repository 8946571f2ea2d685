"""Small random Llama-family checkpoints for tests (no downloads here: they are made on the spot)."""

from __future__ import annotations

import torch


def random_checkpoint(folder, kind: str = "llama", seed: int = 0, **overrides):
    """A tiny random transformers model of ``kind`` (llama, qwen2, mistral) saved to ``folder``; returns it.

    Weights are drawn wider than transformers' init (std 0.02 makes every layer nearly the identity,
    which would hide a wrong attention or rotary), biases too."""
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    values = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)
    if kind == "mistral":
        values["sliding_window"] = None
    values.update(overrides)
    config = config_class(**values)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(folder)
    return model


def block_tables(num_seqs: int, blocks_per_seq: int, num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    """Each sequence its own blocks, handed out in a random order (never contiguous by accident)."""
    order = torch.randperm(num_blocks, generator=gen)[:num_seqs * blocks_per_seq]
    return order.reshape(num_seqs, blocks_per_seq).to(torch.int32)


def run_chunks(model, prompts, chunks, tables, num_blocks, all_logits=True):
    """Feed each prompt in the given chunk sizes (one call per round, all sequences packed) through a fresh
    cache; returns the logits of every token of each prompt, [len(prompt), V] per prompt (with
    ``all_logits=False``: of each call's last token, [calls, V])."""
    from tq_deploy.reference.llama import allocate_caches, step_inputs

    caches = allocate_caches(model.config, num_blocks)
    done = [0] * len(prompts)
    rows = [[] for _ in prompts]
    for sizes in chunks:
        new = [p[d:d + n] for p, d, n in zip(prompts, done, sizes)]
        inputs = step_inputs(new, done, tables, model.config.block_size, all_logits=all_logits)
        with torch.no_grad():
            logits, *caches = model(*inputs.values(), *caches)
        offset = 0
        for s, tokens in enumerate(new):
            count = len(tokens) if all_logits else int(len(tokens) > 0)  # else: the last row of each
            rows[s].append(logits[offset:offset + count])
            offset += count
        done = [d + len(t) for d, t in zip(done, new)]
    return [torch.cat(r) for r in rows]


def ort_and_reference_steps(session, reference, tables, steps, block_size: int, num_blocks: int):
    """Run each step's new tokens (one list per sequence) through an ONNX Runtime session of an exported LLM
    and through the reference decoder; yields (ORT outputs, reference outputs, input names) per step, the
    outputs being [logits, *caches] (numpy for ORT, torch for the reference).

    Every layer of the reference caches ORT's codes and norms for the new tokens (validate.llm.aligned_to),
    after checking that each code that differs from its own is a rounding tie and each norm agrees: a code
    taken the other way at a tie would otherwise move every later layer and token by far more than
    rounding, and the logits could not be held to float tolerances."""
    from tq_deploy.reference.llama import allocate_caches, input_names, step_inputs
    from tq_deploy.validate.llm import CodeTies, aligned_to

    ref_caches = allocate_caches(reference.config, num_blocks)
    ort_caches = [t.numpy().copy() for t in ref_caches]
    names = input_names(reference.config)
    outputs = [o.name for o in session.get_outputs()]
    done = [0] * len(steps[0])
    for k, new in enumerate(steps):
        inputs = step_inputs(new, done, tables, block_size)
        got = session.run(None, {**{n: v.numpy() for n, v in inputs.items()}, **dict(zip(names[7:], ort_caches))})
        ties = CodeTies()
        with aligned_to(reference, dict(zip(outputs, got)), ties), torch.no_grad():
            want = reference(*inputs.values(), *ref_caches)
        assert ties.passed, f"step {k}: {ties.text()}"
        ref_caches, ort_caches = list(want[1:]), got[1:]
        yield got, want, names
        done = [d + len(t) for d, t in zip(done, new)]


class CodeWatch:
    """Wraps eval-ppl's KV quantizer (a LayerPlanKVQuantizer) and keeps, per layer and side, the codes it
    chose for every token and each coordinate's distance from its decision boundary, to tell a backend's
    rounding tie from a wrong code (:meth:`first_flip`)."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.codes: dict[tuple[int, str], list] = {}
        self.margins: dict[tuple[int, str], list] = {}
        self.bits: dict[tuple[int, str], int] = {}

    def _watch(self, x, layer_idx, kind):
        from tq_deploy.reference.quantizer import normalize, quantize_coordinates, rotate

        bits = self.inner._bits(layer_idx)["kv".index(kind)]
        side = self.inner._side(layer_idx, bits)
        y = rotate(normalize(x[0].float())[0], side.rotation).transpose(0, 1)  # [T, Hkv, D]
        self.bits[(layer_idx, kind)] = bits
        self.codes.setdefault((layer_idx, kind), []).append(quantize_coordinates(y, side.codebook))
        self.margins.setdefault((layer_idx, kind), []).append((y[..., None] - side.boundaries).abs().amin(-1))

    def quantize_keys(self, keys, layer_idx):
        self._watch(keys, layer_idx, "k")
        return self.inner.quantize_keys(keys, layer_idx)

    def quantize_values(self, values, layer_idx):
        self._watch(values, layer_idx, "v")
        return self.inner.quantize_values(values, layer_idx)

    def first_flip(self, codes_of) -> int | None:
        """The first token whose codes in a backend's cache (``codes_of(layer, "k"|"v")``: packed codes
        [N, B, Hkv, P], tokens in blocks 0.. in order) differ from eval-ppl's, or None. A code that differs
        must be a rounding tie (a neighbouring code, the coordinate within TIE_MARGIN of the boundary)
        unless a lower layer flipped a code at that token or before: that flip moved this layer's input.
        From the first flip on a backend's logits may move by far more than rounding."""
        from tq_deploy.reference.packing import unpack_codes
        from tq_deploy.validate.llm import TIE_MARGIN

        first_below = None  # the first flipped token in the layers checked so far
        for layer in sorted({layer for layer, _ in self.codes}):
            first_here = None
            for kind in "kv":
                want, margin = torch.cat(self.codes[(layer, kind)]), torch.cat(self.margins[(layer, kind)])
                packed = torch.as_tensor(codes_of(layer, kind))
                got = unpack_codes(packed.reshape(-1, *packed.shape[2:])[:len(want)], self.bits[(layer, kind)],
                                   want.shape[-1])
                differ = got != want
                if not differ.any():
                    continue
                bad = differ & (((got.int() - want.int()).abs() != 1) | (margin >= TIE_MARGIN))
                if first_below is not None:
                    bad[first_below:] = False
                assert not bad.any(), f"layer {layer} {kind}: codes that are no rounding tie at {bad.nonzero()[:3]}"
                token = int(differ.nonzero()[0, 0])
                first_here = token if first_here is None else min(first_here, token)
            if first_here is not None:
                first_below = first_here if first_below is None else min(first_below, first_here)
        return first_below


def session_codes(session):
    """``codes_of`` for :meth:`CodeWatch.first_flip` from an LLMSession."""
    return lambda layer, kind: session.read_cache(layer)[f"{kind}_codes"]


def reference_codes(backend):
    """``codes_of`` for :meth:`CodeWatch.first_flip` from a ReferenceBackend (four caches per layer)."""
    return lambda layer, kind: backend.caches[4 * layer + (0 if kind == "k" else 2)]
