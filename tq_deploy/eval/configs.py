"""KV-cache configurations of the perplexity evaluation, and what each one costs.

A configuration is named ``METHOD[-BITS][-ROTATION]``:

    fp32                 no quantization (the baseline; the cache path is the same)
    mse-4                TurboQuant_mse, 4 bits for keys and values
    mse-k4v3             keys 4 bits, values 3 bits
    mse-3-hadamard       randomized Hadamard rotation instead of the dense Haar one
    prod-3               keys TurboQuant_prod at 3 bits ((3-1)-bit MSE + 1-bit QJL on the
                         residual), values TurboQuant_mse at 3 bits
    mixed-2.5            outlier-channel mixed precision: half the channels (the ones of
                         largest mean |x|) one bit above the other half (2.5 = 3 and 2)
    naive-4              per-token absmax uniform quantization, no rotation (naive.py)
    mse-k4v32            32 for one side leaves it unquantized (fp32): which of K and V costs what
                         (not for mixed)
    mse-4-ck             any of the above with centered keys: a per-(layer, KV head) mean key
                         mu, taken from the first chunk (the prompt), is subtracted before the
                         keys are quantized. Exact for attention: every score of a query moves
                         by the same q.mu, and softmax ignores a common shift, so a deployment
                         stores quantize(k - mu) and never adds mu back (one Sub node before
                         TQCacheUpdate). It shrinks ||k||, and TurboQuant's error scales with it.

Prod quantizes only the keys because the QJL stage exists to make the score
<q, k> unbiased; values enter the attention output through softmax weights,
where TurboQuant_mse (the lower-MSE estimate) is the right tool (paper, Sec. 4).

Storage accounting (the ``effective_bits`` and ``bytes_per_token`` below)
counts every per-vector scale as **fp16** (16 bits), which is what a
deployment stores: TurboQuant_mse one norm, naive one absmax scale,
TurboQuant_prod two (||x|| and the residual norm ||r||), mixed two (one per
channel group). With head_dim D that adds 16/D bits per coordinate per scale
(0.25 at D = 64). The project's paged cache (ops.py) keeps float32 norms: add
another 16/D per scale for that layout. The fixed outlier-channel indices of
the mixed configuration (one set per layer and head) are not per token and are
not counted. The evaluation itself applies the scales in float32; rounding
them to fp16 changes a reconstruction by at most 2**-11 relative, far below
the quantization error of any configuration here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

METHODS = ("fp32", "mse", "prod", "mixed", "naive")
ROTATIONS = ("haar", "hadamard")
SCALE_BITS = 16  # fp16 norms / scales, see the module docstring

# The full table of docs/quality.md, in display order.
DEFAULT_CONFIGS = (
    "fp32",
    "mse-4", "mse-3", "mse-2",
    "mse-4-hadamard", "mse-3-hadamard", "mse-2-hadamard",
    "prod-4", "prod-3",
    "mixed-3.5", "mixed-2.5",
    "naive-4", "naive-3", "naive-2",
    "mse-k4v3", "mse-k4v2", "naive-k4v3",
    "mse-4-ck", "mse-3-ck", "mse-k4v3-ck", "mixed-3.5-ck", "naive-4-ck",
)

_NAME = re.compile(
    r"^(?P<method>[a-z0-9]+)"
    r"(?:-(?:(?P<bits>\d+(?:\.5)?)|k(?P<kbits>\d+(?:\.5)?)v(?P<vbits>\d+(?:\.5)?)))?"
    r"(?:-(?P<rotation>[a-z]+))?$"
)


@dataclass(frozen=True)
class CacheConfig:
    """How keys and values are quantized before they enter the cache."""

    method: str
    k_bits: float = 32.0
    v_bits: float = 32.0
    rotation: str = "haar"
    center_keys: bool = False

    @property
    def name(self) -> str:
        if self.method == "fp32":
            return "fp32"
        bits = _fmt(self.k_bits) if self.k_bits == self.v_bits else f"k{_fmt(self.k_bits)}v{_fmt(self.v_bits)}"
        suffix = "" if self.rotation == "haar" else f"-{self.rotation}"
        suffix += "-ck" if self.center_keys else ""
        return f"{self.method}-{bits}{suffix}"

    def scales_per_vector(self, kind: str) -> int:
        """fp16 scales stored per key (``kind="k"``) or value vector."""
        if self.method == "fp32" or (self.k_bits if kind == "k" else self.v_bits) == 32:
            return 0
        if self.method == "mixed" or (self.method == "prod" and kind == "k"):
            return 2
        return 1

    def bytes_per_vector(self, kind: str, head_dim: int) -> int:
        """Bytes one cached key or value vector occupies: packed codes plus fp16 scales."""
        bits = self.k_bits if kind == "k" else self.v_bits
        if self.method == "fp32" or bits == 32:
            return 4 * head_dim
        if self.method == "mixed":
            high = head_dim // 2
            low_bits = int(math.floor(bits))
            codes = math.ceil(high * (low_bits + 1) / 8) + math.ceil((head_dim - high) * low_bits / 8)
        else:
            # prod: (b-1)-bit MSE codes plus one QJL bit per coordinate, i.e. b bits too.
            codes = math.ceil(head_dim * int(bits) / 8)
        return codes + self.scales_per_vector(kind) * SCALE_BITS // 8

    def effective_bits(self, head_dim: int) -> float:
        """Stored bits per cached coordinate, averaged over keys and values, scales included."""
        total = self.bytes_per_vector("k", head_dim) + self.bytes_per_vector("v", head_dim)
        return total * 8 / (2 * head_dim)

    def bytes_per_token(self, head_dim: int, num_kv_heads: int, num_layers: int) -> int:
        """KV-cache bytes one token adds: every layer, every KV head, key and value."""
        per_head = self.bytes_per_vector("k", head_dim) + self.bytes_per_vector("v", head_dim)
        return num_layers * num_kv_heads * per_head


def _fmt(bits: float) -> str:
    return str(int(bits)) if float(bits).is_integer() else f"{bits:g}"


def _check_bits(name: str, method: str, bits: float) -> float:
    if bits == 32 and method != "mixed":  # that side stays fp32
        return 32.0
    if method == "mixed":
        if bits not in (1.5, 2.5, 3.5):
            raise ValueError(f"{name}: bits={bits:g} for method 'mixed', expected 1.5, 2.5 or 3.5")
    elif method == "prod":
        if bits not in (2, 3, 4):
            raise ValueError(f"{name}: bits={bits:g} for method 'prod', expected 2, 3 or 4 (1 QJL bit + 1..3 MSE bits)")
    elif bits not in (1, 2, 3, 4):
        raise ValueError(f"{name}: bits={bits:g} for method {method!r}, expected 1, 2, 3 or 4")
    return float(bits)


def parse_config(name: str) -> CacheConfig:
    """``"mse-k4v3-hadamard"`` -> CacheConfig("mse", 4, 3, "hadamard"); see the module docstring."""
    text = name.strip().lower()
    center_keys = text.endswith("-ck")
    match = _NAME.match(text[:-3] if center_keys else text)
    if not match or match["method"] not in METHODS:
        raise ValueError(
            f"config={name!r}, expected METHOD[-BITS|-kKBITSvVBITS][-ROTATION][-ck] with METHOD in {METHODS}, "
            f"e.g. 'mse-4', 'mse-k4v3-hadamard', 'mixed-2.5', 'mse-4-ck'"
        )
    method, rotation = match["method"], match["rotation"] or "haar"
    if rotation not in ROTATIONS:
        raise ValueError(f"config={name!r}: rotation={rotation!r}, expected one of {ROTATIONS}")
    if method == "fp32":
        if match["bits"] or match["kbits"] or match["rotation"] or center_keys:
            raise ValueError(f"config={name!r}: 'fp32' takes no bits, rotation or -ck")
        return CacheConfig("fp32")
    if method == "naive" and match["rotation"]:
        raise ValueError(f"config={name!r}: 'naive' uses no rotation, expected no rotation suffix")
    if match["bits"]:
        k_bits = v_bits = float(match["bits"])
        if k_bits == 32:
            raise ValueError(f"config={name!r}: 32 bits for keys and values is the 'fp32' configuration")
    elif match["kbits"]:
        k_bits, v_bits = float(match["kbits"]), float(match["vbits"])
    else:
        raise ValueError(f"config={name!r}: method {method!r} needs bits, e.g. '{method}-4' or '{method}-k4v3'")
    # prod quantizes the values with TurboQuant_mse.
    _check_bits(f"config={name!r} (values)", "mse" if method == "prod" else method, v_bits)
    _check_bits(f"config={name!r} (keys)", method, k_bits)
    return CacheConfig(method, k_bits, v_bits, rotation, center_keys)


def with_bits(config: CacheConfig, k_bits: float | None, v_bits: float | None) -> CacheConfig:
    """The same method with the key and/or value bit width replaced (``--k-bits``/``--v-bits``)."""
    if config.method == "fp32":
        return config
    k = config.k_bits if k_bits is None else k_bits
    v = config.v_bits if v_bits is None else v_bits
    bits = _fmt(k) if k == v else f"k{_fmt(k)}v{_fmt(v)}"
    suffix = "" if config.rotation == "haar" else f"-{config.rotation}"
    suffix += "-ck" if config.center_keys else ""
    return parse_config(f"{config.method}-{bits}{suffix}")
