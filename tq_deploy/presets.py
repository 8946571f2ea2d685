"""KV-cache presets a user picks by name, and per-layer bit plans.

A preset is a pair of TurboQuant_mse widths, keys and values, with what it costs and what it
was measured to do to perplexity, and whether an exported LLM stores its keys without a
calibrated key mean (ops.py: key_mean; it costs no cache bits; the synthetic decode model,
which has no real keys to calibrate on, takes the widths alone). ``--kv-preset NAME`` takes it wherever the command line
takes ``--k-bits/--v-bits`` (export, pipeline, engine, eval-ppl).

Effective bits (the convention of every number here): the stored bits per cached coordinate,
keys and values averaged, including the norm that the project's paged cache keeps per vector
(ops.py), float32 or float16 (the preset's ``norm_dtype``):

    effective_bits(D) = (k_bits + v_bits) / 2 + norm_bits / D

so keys 6 / values 4 with float32 norms is 5.5 at head_dim 64 and 5.25 at head_dim 128; keys 5 /
values 4 with float16 norms is 4.75 and 4.625. The synthetic decode model takes a preset's widths
alone (float32 norms, no key mean).

Measured deltas: perplexity of SmolLM2-135M-Instruct (head_dim 64, 30 layers) over 2,048
tokens of each shipped text with every layer's cache quantized, relative to the fp32 cache,
mean and sample standard deviation over rotation seeds (docs/quality.md has the command).

A bit plan (``tq-deploy calibrate``) gives every layer its own widths, and optionally the key
mean's calibration source (as a preset does); it is a JSON file:

    {"format": "tq-deploy-bit-plan", "version": 1, "head_dim": 64, "num_layers": 30,
     "layers": [{"k_bits": 6, "v_bits": 4}, ...], "key_mean": "generated" (optional),
     "norm_dtype": "float16" (optional; default float32), ...anything else (how it was made)}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

NORM_BITS_OF = {"float32": 32, "float16": 16}  # bits of one cached vector's norm, by the cache's norm dtype (ops.py: TN)
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
PLAN_FORMAT = "tq-deploy-bit-plan"
PLAN_VERSION = 1


def effective_bits(k_bits: float, v_bits: float, head_dim: int, norm_dtype: str = "float32") -> float:
    """Stored bits per cached coordinate, keys and values averaged, norms (float32 or float16) included."""
    return (k_bits + v_bits) / 2 + NORM_BITS_OF[norm_dtype] / head_dim


@dataclass(frozen=True)
class Measured:
    """PPL delta (%) of a preset on one text: mean and sample std over ``seeds`` rotation seeds."""

    delta_pct: float
    std_pct: float
    seeds: int


@dataclass(frozen=True)
class Preset:
    name: str
    k_bits: int
    v_bits: int
    summary: str
    measured: dict = field(default_factory=dict)  # text name -> Measured
    key_mean: str | None = None  # the key mean's calibration source (tq_deploy.models.key_mean), or none
    norm_dtype: str = "float32"  # the LLM cache's norms (ops.py: TN)

    def effective_bits(self, head_dim: int) -> float:
        return effective_bits(self.k_bits, self.v_bits, head_dim, self.norm_dtype)

    @property
    def config_name(self) -> str:
        """The eval configuration of this preset (tq_deploy.eval.configs)."""
        norms = "-n16" if self.norm_dtype == "float16" else ""
        mean = f"-kpc1@{self.key_mean}" if self.key_mean else ""
        return f"mse-k{self.k_bits}v{self.v_bits}{norms}{mean}"


# Measured with (docs/quality.md, "Presets"; SmolLM2-135M-Instruct, 2,048 tokens, 4 rotation seeds):
#   tq-deploy eval-ppl --text shipped --tokens 2048 --seeds 4 --configs mse-k8v4,mse-k6v4   (GPU)
#   tq-deploy eval-ppl --text shipped --tokens 2048 --seeds 4 --rounding-draws \
#       --configs kivi-4,mse-k5v4-n16-kpc1@generated,mse-4-n16-kpc1@generated              (CPU)
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("quality", 8, 4, "within 1% of the fp32 cache on both shipped texts: keys 8 bits, values 4 bits",
           {"austen": Measured(0.49, 0.30, 4), "darwin": Measured(0.67, 0.31, 4)}),
    Preset("balanced", 6, 4, "5.25 effective bits at head_dim 128: within 1% on fiction, about 1% on "
                             "scientific text",
           {"austen": Measured(0.57, 0.35, 4), "darwin": Measured(1.06, 0.53, 4)}),
    Preset("compact", 5, 4, "4.75 effective bits at head_dim 64 (4.625 at 128): keys 5 bits stored without a "
                            "key mean calibrated on the model's own samples, values 4 bits, float16 norms",
           {"austen": Measured(0.56, 0.38, 4), "darwin": Measured(0.68, 0.49, 4)}, key_mean="generated",
           norm_dtype="float16"),
    Preset("small", 4, 4, "4.25 effective bits at head_dim 64 (4.125 at 128): keys and values 4 bits, the key "
                          "mean and float16 norms as compact",
           {"austen": Measured(1.48, 0.34, 4), "darwin": Measured(1.23, 0.20, 4)}, key_mean="generated",
           norm_dtype="float16"),
)}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, what: str = "--kv-preset") -> Preset:
    """The preset called ``name``; an unknown name is one error line that lists the known ones."""
    key = str(name).strip().lower()
    if key not in PRESETS:
        raise ValueError(f"{what}={name!r}, expected one of {', '.join(PRESETS)}")
    return PRESETS[key]


# Bounds of a plan file, checked before anything is built from it: the deepest open models have
# about 128 layers, and the reference and kernels take head_dim up to 1024.
MAX_PLAN_LAYERS = 1024
MAX_PLAN_HEAD_DIM = 1024
MAX_PLAN_BYTES = 1 << 20


@dataclass(frozen=True)
class BitPlan:
    """Per-layer TurboQuant widths: ``layers[i] = (k_bits, v_bits)`` of layer i."""

    layers: tuple
    head_dim: int
    info: dict = field(default_factory=dict, compare=False)
    key_mean: str | None = None  # the key mean's calibration source (tq_deploy.models.key_mean), or none
    norm_dtype: str = "float32"  # the LLM cache's norms (ops.py: TN)

    def __post_init__(self):
        if not self.layers:
            raise ValueError("plan layers=[], expected one (k_bits, v_bits) entry per layer")
        if len(self.layers) > MAX_PLAN_LAYERS:
            raise ValueError(f"plan has {len(self.layers)} layers, expected at most {MAX_PLAN_LAYERS}")
        for i, (k, v) in enumerate(self.layers):
            for side, bits in (("k_bits", k), ("v_bits", v)):
                if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
                    raise ValueError(f"plan layer {i} {side}={bits!r}, expected one of {SUPPORTED_BITS}")
        if (isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int)
                or not 2 <= self.head_dim <= MAX_PLAN_HEAD_DIM):
            raise ValueError(f"plan head_dim={self.head_dim!r}, expected an int in [2, {MAX_PLAN_HEAD_DIM}]")
        if self.key_mean is not None and (not isinstance(self.key_mean, str) or not self.key_mean.strip()
                                          or self.key_mean == "none"):
            raise ValueError(f"plan key_mean={self.key_mean!r}, expected the key mean's calibration source "
                             "(generated, a shipped text or a text file) or no key_mean entry")
        if self.norm_dtype not in NORM_BITS_OF:
            raise ValueError(f"plan norm_dtype={self.norm_dtype!r}, expected one of {tuple(NORM_BITS_OF)} or no "
                             "norm_dtype entry")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def effective_bits(self, head_dim: int | None = None) -> float:
        """Mean over layers of effective_bits (every layer caches the same number of vectors)."""
        d = self.head_dim if head_dim is None else head_dim
        return sum(effective_bits(k, v, d, self.norm_dtype) for k, v in self.layers) / len(self.layers)

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "head_dim": self.head_dim,
                "num_layers": self.num_layers,
                "effective_bits": round(self.effective_bits(), 4),
                "layers": [{"k_bits": k, "v_bits": v} for k, v in self.layers],
                **({"key_mean": self.key_mean} if self.key_mean else {}),
                **({"norm_dtype": self.norm_dtype} if self.norm_dtype != "float32" else {}), **self.info}

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> "BitPlan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"{source}: format={data.get('format') if isinstance(data, dict) else None!r}, "
                             f"expected {PLAN_FORMAT!r} (a file written by `tq-deploy calibrate`)")
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"{source}: version={data.get('version')!r}, expected {PLAN_VERSION}")
        layers = data.get("layers")
        if isinstance(layers, list) and len(layers) > MAX_PLAN_LAYERS:
            raise ValueError(f"{source}: {len(layers)} layers, expected at most {MAX_PLAN_LAYERS}")
        if not isinstance(layers, list) or not all(isinstance(e, dict) for e in layers):
            raise ValueError(f"{source}: layers={layers!r:.60}, expected a list of {{\"k_bits\": K, \"v_bits\": V}}")
        try:
            pairs = tuple((e["k_bits"], e["v_bits"]) for e in layers)
        except KeyError as err:
            raise ValueError(f"{source}: a layer has no {err.args[0]!r}, expected k_bits and v_bits in each") from None
        if "num_layers" in data and data["num_layers"] != len(pairs):
            raise ValueError(f"{source}: num_layers={data['num_layers']!r}, expected {len(pairs)} (the layers listed)")
        info = {k: v for k, v in data.items()
                if k not in ("format", "version", "head_dim", "num_layers", "effective_bits", "layers", "key_mean",
                             "norm_dtype")}
        try:
            return cls(pairs, data.get("head_dim"), info, data.get("key_mean"), data.get("norm_dtype", "float32"))
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


def load_plan(path: str | os.PathLike, what: str = "--plan") -> BitPlan:
    from tq_deploy import files

    path = files.check_input(path, what, "a bit-plan JSON file")
    if path.stat().st_size > MAX_PLAN_BYTES:
        raise ValueError(f"{what}={str(path)!r} has {path.stat().st_size} bytes, expected a bit-plan JSON file of at "
                         f"most {MAX_PLAN_BYTES}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{what}={str(path)!r} is not JSON ({err}), expected a bit-plan JSON file") from None
    return BitPlan.from_dict(data, f"{what}={str(path)!r}")


def write_plan(path: str | os.PathLike, plan: BitPlan) -> None:
    from tq_deploy import files

    files.write_text(path, json.dumps(plan.to_dict(), indent=2) + "\n")
