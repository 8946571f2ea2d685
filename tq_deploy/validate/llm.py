"""The exported LLM against the PyTorch reference decoder: the decoder rebuilt from the .onnx, and one step's inputs.

    decoder = reference_decoder(model)        # LlamaDecoder of the metadata's config, weights from the initializers
    feeds = llm_inputs(model, seed=1)         # a chunked-prefill + decode step over a cache the reference filled
    expected = llm_outputs(model, feeds)      # logits and every layer's updated cache

The reference is rebuilt from the model file alone: its config from the metadata (kind "llm") and
every weight, rotation and codebook from the initializers of the same name (``<name>.T`` holds a
projection's weight transposed), so a comparison never pits the model against another checkpoint.

The step the inputs describe covers the cases a serving engine mixes in one call: sequence 0 has a
first prompt chunk in the cache and sends its second chunk (chunked prefill: the chunk attends to
the earlier chunk and causally to itself), sequence 1 has its prompt in the cache and sends one
decode token. Lengths cross block boundaries, blocks are handed out in a shuffled order, a spare
block holds random codes and huge norms that no sequence uses, and the unused block-table columns
hold a junk block number: a backend that reads outside a sequence's blocks shows in the output.

A backend is judged against the reference aligned to its codes (:func:`compare_llm`): each layer's
new codes must equal the reference's except rounding ties, and from the same codes every float
output must agree to float32 tolerance.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from tq_deploy.export.loaded import ExportedModel

# (tokens already in the cache, tokens this step) of each sequence
STEP_SHAPE = ((37, 21), (18, 1))
JUNK_BLOCK = 10**6


def reference_decoder(model: ExportedModel):
    """The reference LlamaDecoder of an exported LLM: its config and weights' dtype from the metadata,
    its weights from the initializers."""
    from onnx import numpy_helper

    from tq_deploy.export.llm import decoder_config_of
    from tq_deploy.reference.llama import LlamaDecoder

    model = ExportedModel.of(model)
    cached = getattr(model, "_reference_decoder", None)
    if cached is not None:
        return cached
    decoder = LlamaDecoder(decoder_config_of(model.metadata)).eval()
    if model.metadata.get("dtype") == "float16":
        decoder.cast_weights(torch.float16)
    inits = {t.name: t for t in model.proto.graph.initializer}
    state = {"inv_freq": decoder.inv_freq}  # the RoPE rates: from the config (the graph folds them into constants)
    for name, tensor in decoder.state_dict().items():
        if name in state:
            continue
        # the custom nodes' rotation and codebooks are named per layer ("layers.3.rotation")
        spec_name = name.replace(".self_attn.", ".")
        if name in inits:
            value = torch.from_numpy(numpy_helper.to_array(inits[name]).copy())
        elif name + ".T" in inits:
            value = torch.from_numpy(numpy_helper.to_array(inits[name + ".T"]).T.copy())
        elif spec_name in inits and name.rsplit(".", 1)[-1] in ("rotation", "k_codebook", "v_codebook", "key_mean"):
            value = torch.from_numpy(numpy_helper.to_array(inits[spec_name]).copy())
        else:
            raise ValueError(f"{model.path or 'model'} has no initializer {name!r} (nor {name}.T), expected every "
                             "weight of the decoder its metadata describes")
        if tuple(value.shape) != tuple(tensor.shape) or value.dtype != tensor.dtype:
            raise ValueError(f"initializer {name} is {value.dtype} {tuple(value.shape)}, expected {tensor.dtype} "
                             f"{tuple(tensor.shape)} (the decoder config and dtype in the metadata)")
        state[name] = value
    decoder.load_state_dict(state)
    model._reference_decoder = decoder  # built once per loaded model: loading the weights is the slow part
    return decoder


def llm_inputs(model: ExportedModel, seed: int = 0, step_shape=STEP_SHAPE, decoder=None) -> dict[str, torch.Tensor]:
    """Feeds (graph-input name -> tensor) of one step over caches that the reference decoder filled
    in an earlier step (module docstring). ``decoder``: the reference, if already built."""
    from tq_deploy.reference.llama import STEP_INPUT_NAMES, allocate_caches, input_names, step_inputs

    model = ExportedModel.of(model)
    decoder = decoder if decoder is not None else reference_decoder(model)
    config = decoder.config
    gen = torch.Generator().manual_seed(seed)
    b = config.block_size
    per_seq = [-(-(cached + new) // b) for cached, new in step_shape]
    spare = 1
    num_blocks = sum(per_seq) + spare
    order = torch.randperm(num_blocks, generator=gen).int()
    width = max(per_seq) + 1
    tables = torch.full((len(step_shape), width), JUNK_BLOCK, dtype=torch.int32)
    start = 0
    for s, n in enumerate(per_seq):
        tables[s, :n] = order[start:start + n]
        start += n
    tokens = [torch.randint(0, config.vocab_size, (cached + new,), generator=gen).tolist()
              for cached, new in step_shape]
    caches = allocate_caches(config, num_blocks)
    _poison_spare(caches, int(order[-1]), gen)
    first = step_inputs([t[:cached] for t, (cached, _) in zip(tokens, step_shape)], [0] * len(step_shape), tables, b)
    with torch.no_grad():
        caches = list(decoder(*(first[n] for n in STEP_INPUT_NAMES), *caches)[1:])
    step = step_inputs([t[cached:] for t, (cached, _) in zip(tokens, step_shape)], [c for c, _ in step_shape],
                       tables, b)
    return dict(zip(input_names(config), (*(step[n] for n in STEP_INPUT_NAMES), *caches)))


def _poison_spare(caches, block: int, gen) -> None:
    """Random codes and huge norms in a block no sequence owns (finite, so that an untouched block compares equal)."""
    for tensor in caches:
        if tensor.dtype == torch.uint8:
            tensor[block] = torch.randint(0, 256, tensor[block].shape, generator=gen, dtype=torch.uint8)
        else:  # the largest finite value of the cache's norm type (float16 norms: 65504)
            tensor[block] = torch.finfo(tensor.dtype).max if tensor.dtype == torch.float16 else 1e30


def llm_outputs(model: ExportedModel, feeds: dict, decoder=None) -> dict[str, torch.Tensor]:
    """The reference decoder's outputs (logits, updated caches) for ``feeds``, by graph-output name;
    the feeds are left unchanged."""
    from tq_deploy.reference.llama import input_names, output_names

    model = ExportedModel.of(model)
    decoder = decoder if decoder is not None else reference_decoder(model)
    config = decoder.config
    values = [feeds[n].clone() for n in input_names(config)]
    with torch.no_grad():
        out = decoder(*values)
    return dict(zip(output_names(config), out))


@dataclass
class CodeTies:
    """Codes a backend chose differently from the reference, each of them a rounding tie."""

    differing: int = 0  # codes that differ
    compared: int = 0  # codes compared
    worst_margin: float = 0.0  # the largest distance of a differing coordinate from its decision boundary
    not_ties: list = field(default_factory=list)  # (layer, kind, slot, head, coordinate, margin) past TIE_MARGIN
    norm_rel: float = 0.0  # the largest relative difference of a new token's norm, before alignment
    norm_limit: float = 0.0  # its limit: NORM_RTOL, or HALF_NORM_RTOL where a cache keeps float16 norms

    @property
    def passed(self) -> bool:
        return not self.not_ties and self.norm_rel <= max(self.norm_limit, NORM_RTOL)

    def text(self) -> str:
        verdict = "all rounding ties" if not self.not_ties else \
            f"{len(self.not_ties)} NOT ties, e.g. {self.not_ties[:3]}"
        return (f"codes: {self.differing} of {self.compared} differ from the reference, {verdict} (largest margin "
                f"{self.worst_margin:.2g}, limit {TIE_MARGIN:g} of the unit vector); new norms within "
                f"{self.norm_rel:.2g} relative (limit {max(self.norm_limit, NORM_RTOL):.2g})")


def aligned_outputs(model: ExportedModel, feeds: dict, actual: dict, decoder=None) -> tuple[dict, CodeTies]:
    """The reference's outputs for ``feeds`` when every layer caches the codes the backend wrote.

    A quantized cache makes the network discontinuous: a rotated coordinate within rounding of a
    decision boundary takes one code in the reference and the neighbouring one in a backend whose
    float arithmetic differs in the last bits, and that flip changes every later layer by far more
    than rounding. So each layer's cache update is checked and then aligned: the reference encodes
    the new tokens itself, every code of ``actual`` (the backend's ``k_codes_out.l`` ...) that
    differs must be a tie (the reference's coordinate within TIE_MARGIN of the boundary between the
    two codes, which must be neighbours), and the reference then continues from the backend's codes
    and norms. Every float output can then be held to float tolerances."""
    from tq_deploy.reference.llama import input_names, output_names

    model = ExportedModel.of(model)
    decoder = decoder if decoder is not None else reference_decoder(model)
    ties = CodeTies()
    values = [feeds[n].clone() for n in input_names(decoder.config)]
    with aligned_to(decoder, actual, ties), torch.no_grad():
        out = decoder(*values)
    return dict(zip(output_names(decoder.config), out)), ties


@contextmanager
def aligned_to(decoder, actual: dict, ties: CodeTies):
    """Within the block, every layer of ``decoder`` caches ``actual``'s codes and norms for its new tokens after
    checking them against its own (:func:`aligned_outputs`)."""
    attention = [layer.self_attn for layer in decoder.layers]
    saved = [a.ops for a in attention]
    for layer, a in enumerate(attention):
        a.ops = _AlignedOps(layer, actual, ties)
    try:
        yield decoder
    finally:
        for a, ops in zip(attention, saved):
            a.ops = ops


class AlignedBackend:
    """A generation backend that steps an LLMSession and the reference decoder together, the reference
    taking the session's codes after each step (ties checked): ``step`` returns the session's logits,
    ``reference_logits`` collects the reference's. Their perplexities differ by float32 rounding alone."""

    def __init__(self, session, decoder):
        from tq_deploy.runtime.reference_backend import ReferenceBackend

        self.session, self.block_size, self.num_blocks = session, session.block_size, session.num_blocks
        self.reference = ReferenceBackend(decoder, num_blocks=session.num_blocks)
        self.vocab_size = session.vocab_size
        self.ties = CodeTies()
        self.reference_logits: list[np.ndarray] = []

    def step(self, inputs) -> np.ndarray:
        logits = self.session.step(inputs)
        actual = {f"{name}_out.{layer}": array for layer in range(self.session.num_layers)
                  for name, array in self.session.read_cache(layer).items()}
        with aligned_to(self.reference.decoder, actual, self.ties):
            self.reference_logits.append(self.reference.step(inputs))
        return logits


@dataclass
class GreedyOnSameCodes:
    """A backend's greedy generation against the reference stepped on its codes (:func:`greedy_on_same_codes`)."""

    tokens: list  # the backend's tokens per prompt
    ties: CodeTies
    steps: int = 0
    worst_excess: float = 0.0  # the largest |backend - reference| logit beyond atol + rtol * |reference| (<= 0: within)
    parted: list = field(default_factory=list)  # (step, row, backend token, reference token): not a near-tie

    @property
    def passed(self) -> bool:
        return self.ties.passed and self.worst_excess <= 0 and not self.parted

    def text(self) -> str:
        logits = "within tolerance" if self.worst_excess <= 0 else f"{self.worst_excess:.2g} past the tolerance"
        tokens = "every token the reference's greedy choice (or a near-tie of two logits)" if not self.parted else \
            f"{len(self.parted)} tokens NOT the reference's choice, e.g. (step, row, backend, reference) {self.parted[:3]}"
        return f"{self.steps} steps on the same codes: logits {logits}, {tokens}; {self.ties.text()}"


def greedy_on_same_codes(session, decoder, prompts, max_new_tokens: int, eos_token_ids=(), chunk_size: int | None = None,
                         atol: float = 1e-4, rtol: float = 1e-3) -> GreedyOnSameCodes:
    """Greedy generation on ``session`` (an LLMSession) with the reference ``decoder`` stepped beside it on
    the session's codes (AlignedBackend, every differing code checked to be a rounding tie): each step's
    logits must agree to ``atol + rtol * |reference|`` and every token the session picks must be the
    reference's argmax, or within the two logits' tolerance of it.

    Free-running, a backend and the reference may part where one takes a code the other way at a rounding
    tie: later logits then move by far more than rounding and a greedy token may follow. This check does
    not part: it tells a backend that computes the reference's function from one that does not."""
    from tq_deploy.runtime.generation import generate_ids

    aligned = AlignedBackend(session, decoder)
    kept: list[np.ndarray] = []

    class _Keeping:  # the session's logits of every step, as generate_ids sees them
        block_size, num_blocks, vocab_size = aligned.block_size, aligned.num_blocks, aligned.vocab_size

        @staticmethod
        def step(inputs):
            out = aligned.step(inputs)
            kept.append(np.array(out, dtype=np.float32, copy=True))
            return out

    done = generate_ids(_Keeping(), prompts, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                        **({"chunk_size": chunk_size} if chunk_size else {}))
    result = GreedyOnSameCodes([c.tokens for c in done], aligned.ties, len(kept))
    for k, (got, want) in enumerate(zip(kept, aligned.reference_logits)):
        got = got.reshape(-1, got.shape[-1]).astype(np.float64)
        want = np.asarray(want, dtype=np.float64).reshape(got.shape)
        allowed = atol + rtol * np.abs(want)
        result.worst_excess = max(result.worst_excess if k else -np.inf, float((np.abs(got - want) - allowed).max()))
        mine, theirs = got.argmax(-1), want.argmax(-1)
        for row in np.flatnonzero(mine != theirs):
            a, b = mine[row], theirs[row]
            if want[row, b] - want[row, a] > allowed[row, a] + allowed[row, b]:
                result.parted.append((k, int(row), int(a), int(b)))
    return result


TIE_MARGIN = 1e-4  # of a unit vector's rotated coordinate: far above float32 rounding, far below a bin
NORM_RTOL = 1e-4  # a new token's norm, computed from inputs that agree to float32 rounding
HALF_NORM_RTOL = 2.0 ** -10  # ... stored as float16: two such norms may round to neighbouring halves


class _AlignedOps:
    """The reference's cache steps for one layer, its cache update taking the backend's codes after checking them."""

    def __init__(self, layer: int, actual: dict, ties: CodeTies):
        self.layer, self.actual, self.ties = layer, actual, ties

    def paged_prefill(self, *args):
        from tq_deploy.reference.paged import paged_prefill_reference

        return paged_prefill_reference(*args)

    def cache_update(self, key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms, rotation, k_codebook,
                     v_codebook, k_bits, v_bits):
        from tq_deploy.reference.paged import cache_update_reference

        caches = cache_update_reference(key, value, slot_mapping, k_codes, k_norms, v_codes, v_norms, rotation,
                                        k_codebook, v_codebook, k_bits, v_bits)
        slots = slot_mapping[slot_mapping >= 0].long()
        for kind, x, codes, norms, codebook, bits in (("k", key, caches[0], caches[1], k_codebook, k_bits),
                                                     ("v", value, caches[2], caches[3], v_codebook, v_bits)):
            theirs_codes = _as_tensor(self.actual[f"{kind}_codes_out.{self.layer}"])
            theirs_norms = _as_tensor(self.actual[f"{kind}_norms_out.{self.layer}"])
            rows, hkv = codes.shape[0] * codes.shape[1], codes.shape[2]
            mine = codes.view(rows, hkv, -1)[slots]
            theirs = theirs_codes.reshape(rows, hkv, -1)[slots]
            self._check(kind, x[slot_mapping >= 0], slots, mine, theirs, rotation, codebook, bits)
            mine_norms, new_norms = norms.view(rows, hkv)[slots], theirs_norms.reshape(rows, hkv)[slots]
            mine32, new32 = mine_norms.float(), new_norms.float()
            rel = ((mine32 - new32).abs() / mine32.abs().clamp_min(1e-30)).max() if len(slots) else 0.0
            self.ties.norm_rel = max(self.ties.norm_rel, float(rel))
            if norms.dtype == torch.float16:
                self.ties.norm_limit = max(self.ties.norm_limit, HALF_NORM_RTOL)
            codes.view(rows, hkv, -1)[slots] = theirs
            norms.view(rows, hkv)[slots] = new_norms
        return caches

    def _check(self, kind, x, slots, mine, theirs, rotation, codebook, bits) -> None:
        from tq_deploy.reference.packing import unpack_codes

        dim = x.shape[-1]
        a, b = unpack_codes(mine, bits, dim).long(), unpack_codes(theirs, bits, dim).long()
        self.ties.compared += a.numel()
        differ = (a != b).nonzero()
        if not len(differ):
            return
        self.ties.differing += len(differ)
        u = x.double() / torch.linalg.vector_norm(x.double(), dim=-1, keepdim=True).clamp_min(1e-300)
        y = u @ rotation.double().T  # [T, Hkv, D]
        for t, h, d in differ.tolist():
            lo, hi = sorted((int(a[t, h, d]), int(b[t, h, d])))
            boundary = float(codebook[lo] + codebook[hi]) / 2
            margin = abs(float(y[t, h, d]) - boundary) if hi == lo + 1 else float("inf")
            self.ties.worst_margin = max(self.ties.worst_margin, margin)
            if margin > TIE_MARGIN:
                self.ties.not_ties.append((self.layer, kind, int(slots[t]), h, d, margin))


def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))


def compare_llm(model: ExportedModel, feeds: dict, actual: dict, title: str, decoder=None):
    """A backend's outputs for ``feeds`` against the reference aligned to its codes (:func:`aligned_outputs`):
    one report row per output plus one for the code ties, which fails on a differing code that is no tie."""
    from tq_deploy.validate.compare import OutputComparison, compare

    model = ExportedModel.of(model)
    torch_feeds = {k: _as_tensor(v) for k, v in feeds.items()}
    expected, ties = aligned_outputs(model, torch_feeds, actual, decoder)
    report = compare(actual, {k: v.numpy() for k, v in expected.items()}, title=title,
                     code_bits=llm_code_bits(model))
    report.outputs.append(OutputComparison("codes vs the reference", (ties.compared,), "uint8", ties.worst_margin,
                                           ties.worst_margin, ties.differing / max(ties.compared, 1), ties.passed,
                                           ties.text()))
    report.extra["code_ties"] = {"differing": ties.differing, "compared": ties.compared,
                                 "worst_margin": ties.worst_margin, "not_ties": ties.not_ties[:20]}
    return report


def llm_code_bits(model: ExportedModel) -> dict[str, tuple[int, int]]:
    """Packed-code outputs of an exported LLM -> (bits, head_dim)."""
    from tq_deploy.export.llm import decoder_config_of

    config = decoder_config_of(ExportedModel.of(model).metadata)
    out = {}
    for layer in range(config.num_layers):
        k_bits, v_bits = config.bits_of_layer(layer)
        out[f"k_codes_out.{layer}"] = (k_bits, config.head_dim)
        out[f"v_codes_out.{layer}"] = (v_bits, config.head_dim)
    return out


def as_numpy(values: dict) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in values.items()}
