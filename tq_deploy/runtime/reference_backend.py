"""The generation loop's backend over the PyTorch reference decoder (tq_deploy.reference.llama).

    backend = ReferenceBackend(decoder, num_blocks=64)          # a LlamaDecoder with its weights
    completions = generate_ids(backend, prompts, max_new_tokens=16)

The same steps as :class:`~tq_deploy.runtime.llm_session.LLMSession` runs in ONNX Runtime, computed
by the reference: every layer's TurboQuant paged cache (or the float32 one of a ``cache="float32"``
decoder) is a torch tensor kept between steps, and one step is one forward call on the packed
inputs. Tests run both backends on the same prompts and compare tokens and logits.
"""

from __future__ import annotations

import numpy as np
import torch

from tq_deploy.runtime.generation import StepInputs


class ReferenceBackend:
    """A LlamaDecoder with resident caches, stepped like the exported model (module docstring)."""

    def __init__(self, decoder, num_blocks: int = 64, device=None, tokenizer: str | None = None):
        from tq_deploy.reference.llama import allocate_caches

        self.decoder = decoder.eval()
        self.device = torch.device(device) if device is not None else next(decoder.parameters()).device
        c = decoder.config
        self.block_size = c.block_size
        self.vocab_size = c.vocab_size
        self.config = {**c.to_dict(), **({"tokenizer": tokenizer} if tokenizer else {})}
        self._allocate = lambda n: allocate_caches(c, n, self.device)
        self.resize(num_blocks)

    def resize(self, num_blocks: int) -> None:
        """New, empty caches of ``num_blocks`` blocks."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks!r}, expected an int >= 1")
        self.num_blocks = int(num_blocks)
        self.caches = self._allocate(self.num_blocks)

    @torch.no_grad()
    def step(self, inputs: StepInputs) -> np.ndarray:
        arrays = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in inputs.arrays().values()]
        logits, *caches = self.decoder(*arrays, *self.caches)
        self.caches = list(caches)
        return logits.float().cpu().numpy()
