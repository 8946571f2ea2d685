"""tq-deploy: TurboQuant KV-cache compression for ONNX Runtime and TensorRT.

TurboQuant (Zandieh et al., arXiv:2504.19874) compresses each KV vector by
normalizing it, applying a fixed random rotation, quantizing every rotated
coordinate with a Lloyd-Max codebook for the coordinate distribution of a random
unit vector, and packing the codes. The PyTorch reference in
:mod:`tq_deploy.reference` is the numerical source of truth for every backend.
"""

__version__ = "0.1.0"


def generate(model, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, provider: str = "cpu", stream=None, **options):
    """Continue text prompts with an exported LLM in ONNX Runtime (greedy, or temperature/top-p with a
    seed); ``stream(i, text)`` receives prompt i's new text as it is made. Returns one
    :class:`tq_deploy.runtime.generate.Generation` per prompt. See that module for ``options``."""
    from tq_deploy.runtime.generate import generate as _generate

    return _generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     seed=seed, provider=provider, stream=stream, **options)
