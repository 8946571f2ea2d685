"""Real checkpoints as the reference decoder.

    resolve_source(spec)        "smollm2", a transformers folder or a .gguf file -> ModelSource
    load_decoder(spec, ...)     the reference decoder (tq_deploy.reference.llama) with the checkpoint's weights
    load_tokenizer(spec)        its tokenizer
"""

from tq_deploy.models.checkpoint import (
    SMOLLM2,
    LoadedDecoder,
    ModelSource,
    decoder_config,
    load_decoder,
    load_hf_config,
    load_hf_model,
    load_tokenizer,
    resolve_source,
    save_hf_folder,
)

__all__ = ["SMOLLM2", "LoadedDecoder", "ModelSource", "decoder_config", "load_decoder", "load_hf_config",
           "load_hf_model", "load_tokenizer", "resolve_source", "save_hf_folder"]
