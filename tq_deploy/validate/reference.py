"""What the PyTorch reference says an exported model should output.

The reference is rebuilt from the model's metadata (its config) and, for the
decode model, its weights are checked against the .onnx initializers first, so
a comparison never silently pits the model against a different reference.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from tq_deploy import ops
from tq_deploy.export.loaded import ExportedModel
from tq_deploy.reference.model import TQModelConfig, decode_model, model_input_names, model_output_names
from tq_deploy.reference.paged import cache_update_reference, paged_attention_reference, paged_prefill_reference
from tq_deploy.reference.quantizer import decode_reference, encode_reference
from tq_deploy.validate.inputs import CACHE_NAMES, model_initializers


def reference_model(config: TQModelConfig, model: onnx.ModelProto | None = None) -> torch.nn.Module:
    """decode_model(config) (one layer or a stack); if ``model`` is given, check its initializers equal
    the module's tensors."""
    module = decode_model(config).eval()
    if model is not None:
        inits = model_initializers(model)
        for name, tensor in module.state_dict().items():
            if name not in inits:
                continue  # the exporter may fold or rename; the names it keeps must match
            if tuple(inits[name].shape) != tuple(tensor.shape) or not torch.equal(inits[name], tensor):
                raise ValueError(f"initializer {name} of the .onnx differs from the reference rebuilt from its "
                                 f"metadata (shape {tuple(inits[name].shape)} vs {tuple(tensor.shape)}): "
                                 "expected the same seed and config")
    return module


def reference_outputs(model: ExportedModel | onnx.ModelProto, inputs: dict) -> dict[str, torch.Tensor]:
    """Expected outputs by graph-output name for ``inputs`` (torch tensors, left unchanged)."""
    model = ExportedModel.of(model)
    kind, config = model.kind, model.metadata
    if kind == "llm":
        from tq_deploy.validate.llm import llm_outputs

        return llm_outputs(model, inputs)
    inputs = {k: v.clone() for k, v in inputs.items()}  # the reference updates caches in place
    if kind == "model":
        cfg = model.config
        module = reference_model(cfg, model.proto)
        with torch.no_grad():
            values = module(*(inputs[n] for n in model_input_names(cfg)))
        return dict(zip(model_output_names(cfg), values))
    if config.get("op") not in ops.OPS_BY_NAME:
        raise ValueError(f"op={config.get('op')!r} in the model's metadata, expected a TurboQuant op")
    return ops.OPS_BY_NAME[config["op"]].entry("reference")(config, model_initializers(model.proto), inputs)


def encode_node(config: dict, inits: dict, inputs: dict) -> dict:
    codes, norms = encode_reference(inputs["x"], inits["rotation"], inits["codebook"], config["bits"])
    return {"codes": codes, "norms": norms}


def decode_node(config: dict, inits: dict, inputs: dict) -> dict:
    return {"x_hat": decode_reference(inputs["codes"], inputs["norms"], inits["rotation"], inits["codebook"],
                                      config["bits"])}


def cache_update_node(config: dict, inits: dict, inputs: dict) -> dict:
    cache = [inputs[n] for n in CACHE_NAMES]
    cache_update_reference(inputs["key"], inputs["value"], inputs["slot_mapping"], *cache, inits["rotation"],
                           inits["k_codebook"], inits["v_codebook"], config["k_bits"], config["v_bits"])
    return {f"{n}_out": t for n, t in zip(CACHE_NAMES, cache)}


def _key_mean(inits: dict, inputs: dict) -> tuple:
    """The node's optional key_mean and rope_inv_freq (initializers or inputs), None where absent."""
    return tuple(inits.get(n, inputs.get(n)) for n in ("key_mean", "rope_inv_freq"))


def paged_attention_node(config: dict, inits: dict, inputs: dict) -> dict:
    out = paged_attention_reference(inputs["query"], *(inputs[n] for n in CACHE_NAMES), inputs["block_tables"],
                                    inputs["context_lens"], inits["rotation"], inits["k_codebook"],
                                    inits["v_codebook"], config["k_bits"], config["v_bits"], config.get("scale", 0.0),
                                    *_key_mean(inits, inputs))
    return {"out": out}


def paged_prefill_node(config: dict, inits: dict, inputs: dict) -> dict:
    out = paged_prefill_reference(inputs["query"], *(inputs[n] for n in CACHE_NAMES), inputs["block_tables"],
                                  inputs["context_lens"], inputs["query_start"], inits["rotation"],
                                  inits["k_codebook"], inits["v_codebook"], config["k_bits"], config["v_bits"],
                                  config.get("scale", 0.0), *_key_mean(inits, inputs))
    return {"out": out}


def judge(model: ExportedModel | onnx.ModelProto, feeds: dict, actual: dict, expected: dict | None, title: str):
    """A backend's outputs for ``feeds`` against the reference: ``expected`` compared output by output, or,
    for an exported LLM, the reference aligned to the backend's codes (validate/llm.py says why)."""
    from tq_deploy.validate.compare import compare

    model = ExportedModel.of(model)
    if model.kind == "llm":
        from tq_deploy.validate.llm import compare_llm

        return compare_llm(model, feeds, actual, title)
    if expected is None:
        expected = as_numpy(reference_outputs(model, {k: torch.as_tensor(v) for k, v in feeds.items()}))
    return compare(actual, expected, title=title, code_bits=bits_of_outputs(model))


def bits_of_outputs(model: ExportedModel | onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Packed-code outputs -> (bits, head_dim), so comparisons can count mismatched codes."""
    model = ExportedModel.of(model)
    kind, config = model.kind, model.metadata
    if kind == "llm":
        from tq_deploy.validate.llm import llm_code_bits

        return llm_code_bits(model)
    dim = config["head_dim"]
    if kind == "op" and "bits" in config:
        return {"codes": (config["bits"], dim)}
    if kind == "model":
        cfg = model.config
        if cfg.num_layers > 1:
            out = {}
            for i in range(cfg.num_layers):
                k_bits, v_bits = cfg.bits_of_layer(i)
                out.update({f"k_codes_out.{i}": (k_bits, dim), f"v_codes_out.{i}": (v_bits, dim)})
            return out
    return {"k_codes_out": (config["k_bits"], dim), "v_codes_out": (config["v_bits"], dim)}


def as_numpy(values: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in values.items()}
