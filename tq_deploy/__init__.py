"""tq-deploy: TurboQuant KV-cache compression for ONNX Runtime and TensorRT.

TurboQuant (Zandieh et al., arXiv:2504.19874) compresses each KV vector by
normalizing it, applying a fixed random rotation, quantizing every rotated
coordinate with a Lloyd-Max codebook for the coordinate distribution of a random
unit vector, and packing the codes. The PyTorch reference in
:mod:`tq_deploy.reference` is the numerical source of truth for every backend.
"""

__version__ = "0.1.0"
