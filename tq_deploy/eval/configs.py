"""KV-cache configurations of the perplexity evaluation, and what each one costs.

A configuration is named ``METHOD[-BITS][-ROTATION]``:

    fp32                 no quantization (the baseline; the cache path is the same)
    mse-4                TurboQuant_mse, 4 bits for keys and values (1..8 bits)
    mse-k6v4             keys 6 bits, values 4 bits
    mse-3-hadamard       randomized Hadamard rotation instead of the dense Haar one
    prod-3               keys TurboQuant_prod at 3 bits ((3-1)-bit MSE + 1-bit QJL on the
                         residual), values TurboQuant_mse at 3 bits
    mixed-2.5            outlier-channel mixed precision: half the channels (the ones of
                         largest mean |x|) one bit above the other half (2.5 = 3 and 2)
    naive-4              per-token absmax uniform quantization, no rotation (naive.py)
    kivi-2, kivi-k4v2    KIVI-style (baselines.py): keys per channel, one scale and zero per
                         channel over each group of KIVI_GROUP tokens; values per token, one
                         scale and zero per vector; asymmetric uniform levels, no rotation
    int8                 keys and values int8, per-token symmetric absmax (baselines.py)
    int8-v4              keys int8 as above, values TurboQuant_mse at 4 bits (1..8)
    mse-k5v4-n16         TurboQuant_mse with float16 norms (the paged cache's norm_dtype float16:
                         16/D bits per coordinate less; the norm rounded as that cache stores it)
    mse-k4v32            32 for one side leaves it unquantized (fp32): which of K and V costs what
                         (not for mixed, int8)
    mse-4-ck             any of the above with centered keys: a per-(layer, KV head) mean key
                         mu, taken from the first chunk (the prompt), is subtracted before the
                         keys are quantized. Exact for attention: every score of a query moves
                         by the same q.mu, and softmax ignores a common shift, so a deployment
                         stores quantize(k - mu) and never adds mu back (one Sub node before
                         TQCacheUpdate). It shrinks ||k||, and TurboQuant's error scales with it.
    mse-4-kcs@darwin     any TurboQuant_mse configuration with a calibrated transform (key_transforms.py),
                         its per-(layer, KV head) vectors measured on the first CALIBRATION_TOKENS
                         tokens of a text (a shipped name or a path): k then v, each followed by
                         c (mean) and/or s (scale): kc = key mean, kcs = key mean and per-RoPE-pair
                         key scale, vcs = value mean and per-channel scale, kvcs = all four;
                         kpc = key mean taken before RoPE (the cache holds k_t - R_t mu, attention
                         adds R_t mu back: not exact under softmax alone), 0 after the key part =
                         the first token's key left unquantized (the attention sink), e.g. kpc0;
                         0 after the value part: its value too, e.g. kpc0vc0; 1 after the key part:
                         the first key quantized as it is, without the mean (kpc1).
                         Exact for attention; per-model constants, so no stored bit changes.

Prod quantizes only the keys because the QJL stage exists to make the score
<q, k> unbiased; values enter the attention output through softmax weights,
where TurboQuant_mse (the lower-MSE estimate) is the right tool (paper, Sec. 4).

Storage accounting (``effective_bits`` and ``bytes_per_token``) counts every
stored scale at the width its method stores it with (``scale_bits``):

* TurboQuant (mse, prod, mixed): **float32** norms, the layout of this project's
  paged cache (ops.py): one per vector (prod keys and mixed: two). So TurboQuant
  at k/v bits costs (k + v)/2 + 32/D effective bits: k4v4 is 4.5 at D = 64 and
  4.25 at D = 128 (the convention of tq_deploy/presets.py). With ``-n16`` (mse
  only) the cache stores float16 norms: (k + v)/2 + 16/D.
* naive, int8, KIVI: **fp16** scales and zero points, as those methods are deployed:
  naive/int8 one scale per vector, KIVI values a scale and a zero per vector, KIVI
  keys a scale and a zero per channel and group of KIVI_GROUP tokens
  (2 * 16 / KIVI_GROUP bits per coordinate: +1 bit at groups of 32).

The fixed outlier-channel indices of the mixed configuration (one set per layer
and head) are not per token and are not counted. The evaluation applies every
scale in float32; rounding one to fp16 changes a reconstruction by at most
2**-11 relative, far below the quantization error of any configuration here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tq_deploy.presets import NORM_BITS_OF

# The one calibrated transform an exported model carries: the key mean before RoPE, the first key
# quantized as it is (ops.py: key_mean; tq_deploy/eval/key_transforms.py).
DEPLOYED_TRANSFORM = "kpc1"

METHODS = ("fp32", "mse", "prod", "mixed", "naive", "kivi", "int8")
TURBOQUANT_METHODS = ("mse", "prod", "mixed")
ROTATIONS = ("haar", "hadamard")
HALF_NORMS_SUFFIX = "-n16"  # TurboQuant_mse with float16 norms (the cache's norm_dtype float16)
BASELINE_SCALE_BITS = 16  # naive / int8 / KIVI scales and zero points: fp16
KIVI_GROUP = 32  # tokens per KIVI key group (the KIVI paper's group size)
INT_BITS = (1, 2, 3, 4, 5, 6, 7, 8)

# The comparison table of docs/quality.md, in display order.
DEFAULT_CONFIGS = (
    "fp32",
    "mse-8", "mse-6", "mse-5", "mse-4", "mse-3", "mse-2",
    "mse-k8v4", "mse-k6v4", "mse-k5v3", "mse-k4v3",
    "mse-4-hadamard", "mse-4-ck", "prod-4", "mixed-3.5",
    "naive-8", "naive-4", "naive-3",
    "kivi-8", "kivi-4", "kivi-k4v2", "kivi-3", "kivi-2",
    "int8", "int8-v4",
)

_NAME = re.compile(
    r"^(?P<method>[a-z0-9]+)"
    r"(?:-(?:(?P<bits>\d+(?:\.5)?)|k(?P<kbits>\d+(?:\.5)?)v(?P<vbits>\d+(?:\.5)?)|v(?P<onlyv>\d+)))?"
    r"(?:-(?P<rotation>[a-z]+))?$"
)


@dataclass(frozen=True)
class CacheConfig:
    """How keys and values are quantized before they enter the cache.

    For ``int8`` the keys are int8 (k_bits 8) and ``v_bits`` 8 means int8 values,
    fewer bits TurboQuant_mse values.
    """

    method: str
    k_bits: float = 32.0
    v_bits: float = 32.0
    rotation: str = "haar"
    center_keys: bool = False
    transform: str | None = None  # key_transforms.parse_transform: kc, kcs, kvcs, ...
    calibration: str | None = None  # the text the transform's vectors are measured on
    half_norms: bool = False  # TurboQuant_mse with float16 norms (-n16)

    @property
    def name(self) -> str:
        if self.method == "fp32":
            return "fp32"
        suffix = "" if self.rotation == "haar" else f"-{self.rotation}"
        suffix += HALF_NORMS_SUFFIX if self.half_norms else ""
        suffix += "-ck" if self.center_keys else ""
        suffix += f"-{self.transform}@{self.calibration}" if self.transform else ""
        if self.method == "int8":
            return ("int8" if self.v_bits == 8 else f"int8-v{_fmt(self.v_bits)}") + suffix
        bits = _fmt(self.k_bits) if self.k_bits == self.v_bits else f"k{_fmt(self.k_bits)}v{_fmt(self.v_bits)}"
        return f"{self.method}-{bits}{suffix}"

    @property
    def norm_dtype(self) -> str:
        """The TurboQuant norms' dtype: "float16" with -n16, else the paged cache's float32."""
        return "float16" if self.half_norms else "float32"

    def side_method(self, kind: str) -> str:
        """The quantizer of keys (``kind="k"``) or values: int8 values below 8 bits are TurboQuant_mse,
        prod values are TurboQuant_mse."""
        if kind == "v" and (self.method == "prod" or (self.method == "int8" and self.v_bits != 8)):
            return "mse"
        return self.method

    def scale_bits(self, kind: str) -> float:
        """Stored scale/zero/norm bits per vector of keys or values (module docstring)."""
        bits = self.k_bits if kind == "k" else self.v_bits
        method = self.side_method(kind)
        if method == "fp32" or bits == 32:
            return 0
        if method in TURBOQUANT_METHODS:
            per_vector = 2 if method == "mixed" or (method == "prod" and kind == "k") else 1
            return per_vector * NORM_BITS_OF[self.norm_dtype]
        return 0  # set per head_dim in bits_per_vector (KIVI keys) or below

    def bits_per_vector(self, kind: str, head_dim: int) -> float:
        """Bits one cached key or value vector occupies: packed codes plus its scales."""
        bits = self.k_bits if kind == "k" else self.v_bits
        method = self.side_method(kind)
        if method == "fp32" or bits == 32:
            return 32.0 * head_dim
        if method == "mixed":
            high = head_dim // 2
            low_bits = int(math.floor(bits))
            codes = 8 * (math.ceil(high * (low_bits + 1) / 8) + math.ceil((head_dim - high) * low_bits / 8))
        else:
            # prod: (b-1)-bit MSE codes plus one QJL bit per coordinate, i.e. b bits too.
            codes = 8 * math.ceil(head_dim * int(bits) / 8)
        if method in TURBOQUANT_METHODS:
            return codes + self.scale_bits(kind)
        if method == "kivi" and kind == "k":
            # a scale and a zero per channel, shared by KIVI_GROUP tokens
            return codes + 2 * BASELINE_SCALE_BITS * head_dim / KIVI_GROUP
        if method == "kivi":
            return codes + 2 * BASELINE_SCALE_BITS
        return codes + BASELINE_SCALE_BITS  # naive, int8: one absmax scale

    def bytes_per_vector(self, kind: str, head_dim: int) -> float:
        return self.bits_per_vector(kind, head_dim) / 8

    def effective_bits(self, head_dim: int) -> float:
        """Stored bits per cached coordinate, averaged over keys and values, scales included."""
        total = self.bits_per_vector("k", head_dim) + self.bits_per_vector("v", head_dim)
        return total / (2 * head_dim)

    def bytes_per_token(self, head_dim: int, num_kv_heads: int, num_layers: int) -> int:
        """KV-cache bytes one token adds: every layer, every KV head, key and value."""
        per_head = self.bytes_per_vector("k", head_dim) + self.bytes_per_vector("v", head_dim)
        return int(round(num_layers * num_kv_heads * per_head))


def _fmt(bits: float) -> str:
    return str(int(bits)) if float(bits).is_integer() else f"{bits:g}"


def _check_bits(name: str, method: str, bits: float) -> float:
    if bits == 32 and method not in ("mixed", "int8"):  # that side stays fp32
        return 32.0
    if method == "mixed":
        if bits not in (1.5, 2.5, 3.5):
            raise ValueError(f"{name}: bits={bits:g} for method 'mixed', expected 1.5, 2.5 or 3.5")
    elif method == "prod":
        if bits not in range(2, 9):
            raise ValueError(f"{name}: bits={bits:g} for method 'prod', expected 2..8 (1 QJL bit + 1..7 MSE bits)")
    elif bits not in INT_BITS:
        raise ValueError(f"{name}: bits={bits:g} for method {method!r}, expected one of 1..8 (or 32: unquantized)")
    return float(bits)


# key_transforms.parse_transform: k and/or v, each followed by c (mean) and/or s (scale).
# kvcs is all four; kcsvcs spells the same and is refused.
_TRANSFORM_KIND = re.compile(r"^(?:kvcs|(?:k(?:p?cs?|s)[01]?)?(?:v(?:cs?|s)0?)?)$")


def parse_config(name: str) -> CacheConfig:
    """``"mse-k4v3-hadamard"`` -> CacheConfig("mse", 4, 3, "hadamard"); see the module docstring."""
    text = name.strip()
    if "@" in text:
        base, calibration = text.rsplit("@", 1)
        head, _, kind = base.rpartition("-")
        kind = kind.lower()
        if not kind or not _TRANSFORM_KIND.match(kind) or kind == "kcsvcs" or not head or not calibration:
            raise ValueError(f"config={name!r}: expected CONFIG-KIND@TEXT with KIND k and/or v, each followed by c "
                             "(mean) and/or s (scale) (kvcs: all four), and TEXT a shipped text name or a path, e.g. "
                             "'mse-4-kcs@darwin'")
        inner = parse_config(head)
        if inner.method != "mse" or inner.center_keys:
            raise ValueError(f"config={name!r}: a calibrated transform is for TurboQuant_mse without -ck, "
                             f"expected e.g. 'mse-4-{kind}@{calibration}'")
        return CacheConfig(inner.method, inner.k_bits, inner.v_bits, inner.rotation, False, kind, calibration,
                           inner.half_norms)
    text = text.lower()
    center_keys = text.endswith("-ck")
    text = text[:-3] if center_keys else text
    half_norms = text.endswith(HALF_NORMS_SUFFIX)
    text = text[:-len(HALF_NORMS_SUFFIX)] if half_norms else text
    if half_norms and not text.startswith("mse-"):
        raise ValueError(f"config={name!r}: {HALF_NORMS_SUFFIX} (float16 norms) is for TurboQuant_mse, "
                         "expected e.g. 'mse-k5v4-n16'")
    match = _NAME.match(text)
    if not match or match["method"] not in METHODS:
        raise ValueError(
            f"config={name!r}, expected METHOD[-BITS|-kKBITSvVBITS][-ROTATION][-n16][-ck] with METHOD in {METHODS}, "
            f"e.g. 'mse-4', 'mse-k6v4', 'mse-k4v3-hadamard', 'mse-k5v4-n16', 'kivi-2', 'int8-v4', 'mse-4-ck'"
        )
    method, rotation = match["method"], match["rotation"] or "haar"
    if rotation not in ROTATIONS:
        raise ValueError(f"config={name!r}: rotation={rotation!r}, expected one of {ROTATIONS}")
    if method == "fp32":
        if match["bits"] or match["kbits"] or match["onlyv"] or match["rotation"] or center_keys:
            raise ValueError(f"config={name!r}: 'fp32' takes no bits, rotation or -ck")
        return CacheConfig("fp32")
    if method in ("naive", "kivi") and match["rotation"]:
        raise ValueError(f"config={name!r}: {method!r} uses no rotation, expected no rotation suffix")
    if method == "int8":
        if match["bits"] or match["kbits"]:
            raise ValueError(f"config={name!r}: 'int8' takes no bits (int8 keys and values) or '-vV' "
                             "(int8 keys, TurboQuant values at V bits), e.g. 'int8' or 'int8-v4'")
        v_bits = float(match["onlyv"]) if match["onlyv"] else 8.0
        _check_bits(f"config={name!r} (values)", "mse", v_bits)
        if v_bits == 32:
            raise ValueError(f"config={name!r}: values 32 bits, expected 1..8")
        return CacheConfig("int8", 8.0, v_bits, rotation, center_keys)
    if match["onlyv"]:
        raise ValueError(f"config={name!r}: '-vV' is for 'int8' only, expected '{method}-kKvV'")
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
    return CacheConfig(method, k_bits, v_bits, rotation, center_keys, half_norms=half_norms)


def with_bits(config: CacheConfig, k_bits: float | None, v_bits: float | None) -> CacheConfig:
    """The same method with the key and/or value bit width replaced (``--k-bits``/``--v-bits``)."""
    if config.method == "fp32":
        return config
    if config.method == "int8":
        if k_bits not in (None, 8):
            raise ValueError(f"k_bits={k_bits:g} for method 'int8', expected 8 (int8 keys)")
        return parse_config(config.name if v_bits in (None, config.v_bits)
                            else (f"int8-v{_fmt(v_bits)}" if v_bits != 8 else "int8"))
    k = config.k_bits if k_bits is None else k_bits
    v = config.v_bits if v_bits is None else v_bits
    bits = _fmt(k) if k == v else f"k{_fmt(k)}v{_fmt(v)}"
    suffix = "" if config.rotation == "haar" else f"-{config.rotation}"
    suffix += HALF_NORMS_SUFFIX if config.half_norms else ""
    suffix += "-ck" if config.center_keys else ""
    suffix += f"-{config.transform}@{config.calibration}" if config.transform else ""
    return parse_config(f"{config.method}-{bits}{suffix}")
