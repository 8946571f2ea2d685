"""What the PyTorch reference says an exported model should output.

The reference is rebuilt from the model's metadata (its config) and, for the
decode model, its weights are checked against the .onnx initializers first, so
a comparison never silently pits the model against a different reference.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from tq_deploy.export.common import read_metadata
from tq_deploy.reference.model import MODEL_INPUT_NAMES, MODEL_OUTPUT_NAMES, TQDecodeModel, TQModelConfig
from tq_deploy.reference.paged import cache_update_reference, paged_attention_reference
from tq_deploy.reference.quantizer import decode_reference, encode_reference
from tq_deploy.validate.inputs import model_initializers

CACHE_NAMES = ("k_codes", "k_norms", "v_codes", "v_norms")


def reference_model(config: TQModelConfig, model: onnx.ModelProto | None = None) -> TQDecodeModel:
    """TQDecodeModel(config); if ``model`` is given, check its initializers equal the module's tensors."""
    module = TQDecodeModel(config).eval()
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


def reference_outputs(model: onnx.ModelProto, inputs: dict) -> dict[str, torch.Tensor]:
    """Expected outputs by graph-output name for ``inputs`` (torch tensors, left unchanged)."""
    kind, config = read_metadata(model)
    inputs = {k: v.clone() for k, v in inputs.items()}  # the reference updates caches in place
    if kind == "model":
        module = reference_model(TQModelConfig.from_dict(config), model)
        with torch.no_grad():
            values = module(*(inputs[n] for n in MODEL_INPUT_NAMES))
        return dict(zip(MODEL_OUTPUT_NAMES, values))
    inits = model_initializers(model)
    rotation = inits["rotation"]
    op = config["op"]
    if op == "TQEncode":
        codes, norms = encode_reference(inputs["x"], rotation, inits["codebook"], config["bits"])
        return {"codes": codes, "norms": norms}
    if op == "TQDecode":
        return {"x_hat": decode_reference(inputs["codes"], inputs["norms"], rotation, inits["codebook"], config["bits"])}
    cache = [inputs[n] for n in CACHE_NAMES]
    books = (inits["k_codebook"], inits["v_codebook"], config["k_bits"], config["v_bits"])
    if op == "TQCacheUpdate":
        cache_update_reference(inputs["key"], inputs["value"], inputs["slot_mapping"], *cache, rotation, *books)
        return {f"{n}_out": t for n, t in zip(CACHE_NAMES, cache)}
    if op == "TQPagedAttention":
        out = paged_attention_reference(inputs["query"], *cache, inputs["block_tables"], inputs["context_lens"],
                                        rotation, *books, config.get("scale", 0.0))
        return {"out": out}
    raise ValueError(f"op={op!r} in the model's metadata, expected a TurboQuant op")


def bits_of_outputs(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Packed-code outputs -> (bits, head_dim), so comparisons can count mismatched codes."""
    kind, config = read_metadata(model)
    dim = config["head_dim"]
    if kind == "op" and "bits" in config:
        return {"codes": (config["bits"], dim)}
    return {"k_codes_out": (config["k_bits"], dim), "v_codes_out": (config["v_bits"], dim)}


def as_numpy(values: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in values.items()}
