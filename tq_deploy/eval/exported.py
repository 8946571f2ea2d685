"""eval-ppl through the exported LLM in ONNX Runtime (``tq-deploy eval-ppl --backend ort``).

    rows = ort_perplexity(model_spec, configs, texts, tokens=2048, chunk_size=256, seed=0, provider="cpu")

Each deployable configuration (TurboQuant_mse widths: a preset, ``mse-kKvV[-hadamard]``, with
``-kpc1@SOURCE`` a key mean calibrated on SOURCE, a per-layer plan) is exported with ``tq-deploy export --model`` into a temporary folder with the same seed as
the PyTorch evaluation, or taken as it is from an .onnx file (``onnx_path``). The text goes
through the model's paged cache in chunks (:func:`tq_deploy.eval.stepped.stepped_perplexity`,
``logits_index`` = every row of the chunk). With ``check_torch`` the same configuration also runs
through the PyTorch evaluation (transformers with LayerPlanKVQuantizer), and each row carries both
perplexities and their relative difference: the exported rotations (seed + layer, one per layer
for keys and values) and codebooks are the PyTorch path's, so the two differ by float32 rounding
and what a quantized cache makes of it (a code on a boundary flips and later layers carry the
change on; docs/quality.md, "eval-ppl through ONNX Runtime").
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from tq_deploy.eval.configs import DEPLOYED_TRANSFORM, CacheConfig
from tq_deploy.presets import BitPlan


def export_options(config) -> dict:
    """The exporter's TurboQuant options of a configuration; a configuration the exported cache cannot
    hold is a ValueError naming it."""
    if isinstance(config, BitPlan):
        return {"layer_bits": tuple(config.layers), "rotation": "haar", "norm_dtype": config.norm_dtype,
                **({"key_mean": config.key_mean} if config.key_mean else {})}
    ok = (isinstance(config, CacheConfig) and config.method == "mse" and not config.center_keys
          and all(float(b).is_integer() and 1 <= b <= 8 for b in (config.k_bits, config.v_bits))
          and config.transform in (None, DEPLOYED_TRANSFORM))
    if not ok:
        name = getattr(config, "name", config)
        raise ValueError(f"configuration {name!r} with --backend ort, expected TurboQuant_mse widths of 1..8 bits "
                         f"(mse-K, mse-kKvV, -hadamard, -{DEPLOYED_TRANSFORM}@SOURCE; a --kv-preset or a --plan): the "
                         f"exported cache holds TurboQuant_mse codes, with the key mean ({DEPLOYED_TRANSFORM}) the only "
                         "transform")
    options = {"k_bits": int(config.k_bits), "v_bits": int(config.v_bits), "rotation": config.rotation,
               "norm_dtype": config.norm_dtype}
    if config.transform:
        options["key_mean"] = config.calibration
    return options


def export_llm(model_spec: str, path: str, seed: int, options: dict, block_size: int) -> None:
    """``tq-deploy export --model model_spec`` with the configuration's options, to ``path``."""
    from tq_deploy.export.llm import export_llm as export

    export(model_spec, path, seed=seed, block_size=block_size, **options)


def torch_perplexity(loaded, config, ids, chunk_size: int, seed: int, draw: int = 0) -> float:
    """The PyTorch eval-ppl of ``config`` (what `tq-deploy eval-ppl --seed seed --rounding-draw draw` prints
    for it); ``loaded`` an eval.model.LoadedModel."""
    from tq_deploy.eval.kv_quantizers import build_kv_quantizer
    from tq_deploy.eval.perplexity import calibration_statistics, perplexity, plan_quantizer, rounding_draw

    if isinstance(config, BitPlan):
        quantizer = plan_quantizer(config, loaded, seed, chunk_size)
    else:
        statistics = calibration_statistics(loaded, config.calibration, chunk_size) if config.transform else None
        quantizer = build_kv_quantizer(config, loaded.head_dim, seed, statistics)
    with rounding_draw(loaded.model, draw):
        return perplexity(loaded.model, ids, quantizer, chunk_size).ppl


def ort_perplexity(model_spec: str | None, configs, texts, tokens: int, chunk_size: int, seed: int = 0,
                   provider: str = "cpu", onnx_path: str | None = None, check_torch: bool = False,
                   threads: int | None = None, labels: dict | None = None, block_size: int = 16,
                   progress=None, seeds: int = 1, torch_draws: int = 1) -> list[dict]:
    """One row per (text, configuration, seed): see the module docstring. ``texts``: [(name, path)].

    ``seeds`` > 1 exports each configuration once per rotation seed (eval.perplexity.rotation_seeds, the
    seeds of the PyTorch `eval-ppl --seeds`). ``torch_draws`` > 1 (with ``check_torch``) runs the PyTorch
    evaluation of each row that many times, draw d under eval.perplexity.rounding_draw(d), draw 0 the model
    as it is: ``torch_ppl`` is then their mean and ``torch_ppl_by_draw`` the runs."""
    if seeds < 1:
        raise ValueError(f"--seeds={seeds}, expected >= 1")
    if onnx_path is not None and seeds != 1:
        raise ValueError(f"--seeds={seeds} with --onnx, expected 1 (the .onnx file fixes its rotation seed)")
    if torch_draws < 1 or (torch_draws != 1 and not check_torch):
        raise ValueError(f"--torch-draws={torch_draws}, expected >= 1, and 1 without --check-torch (the draws "
                         "are of the PyTorch evaluation beside ONNX Runtime)")
    from tq_deploy.eval.model import read_text, tokenize
    from tq_deploy.eval.stepped import stepped_perplexity
    from tq_deploy.runtime.generate import load_tokenizer, tokenizer_source
    from tq_deploy.runtime.llm_session import LLMSession, load_llm_metadata

    labels = labels or {}
    if onnx_path is not None:
        if configs:
            raise ValueError("--onnx with --kv-preset/--plan/--configs/--k-bits, expected one or the other "
                             "(the .onnx file fixes its widths)")
        runs = [(None, onnx_path, 0)]
    else:
        runs = [(config, None, i) for config in configs for i in range(seeds)]
        for config in configs:
            export_options(config)  # every configuration checked before the first export
    rows, hf, run_seeds = [], None, [seed]
    with tempfile.TemporaryDirectory(prefix="tq-eval-ppl-") as folder:
        for i, (config, path, seed_index) in enumerate(runs):
            start = time.perf_counter()
            exported = path is None
            if exported:  # one folder per export, removed after its run: an LLM export is hundreds of MB
                path = os.path.join(folder, f"run{i}", "model.onnx")
                os.makedirs(os.path.dirname(path))
                export_llm(model_spec, path, run_seeds[seed_index], export_options(config), block_size)
            export_seconds = time.perf_counter() - start
            _, metadata = load_llm_metadata(path)
            if len(run_seeds) < seeds:  # the step is the layer count, known from the first export
                from tq_deploy.eval.perplexity import rotation_seeds

                run_seeds = rotation_seeds(seed, seeds, int(metadata["num_layers"]))
            name = labels.get(getattr(config, "name", None), None) if config is not None else None
            if name is None:
                name = (config.info.get("name", "plan") if isinstance(config, BitPlan) else config.name) \
                    if config is not None else os.path.basename(path)
            session = LLMSession(path, provider=provider, num_blocks=1, threads=threads)
            session.resize(-(-tokens // session.block_size))
            tokenizer = load_tokenizer(tokenizer_source(session.config))
            aligned = None
            if check_torch:
                from tq_deploy.export.loaded import ExportedModel
                from tq_deploy.validate.llm import reference_decoder

                decoder = reference_decoder(ExportedModel.load(path))
            for text_name, text_path in texts:
                ids = tokenize(tokenizer, read_text(text_path), tokens)
                if check_torch:  # ORT and the reference decoder in lockstep, the reference on ORT's codes
                    from tq_deploy.validate.llm import AlignedBackend

                    aligned = AlignedBackend(session, decoder)
                result = stepped_perplexity(aligned or session, ids, chunk_size)
                row = {"text": text_name, "config": name, "backend": f"ort-{provider}", "ppl": result.ppl,
                       "tokens": tokens, "chunk_size": chunk_size, "seconds": result.seconds,
                       "export_seconds": export_seconds, "seed": metadata.get("seed")}
                if check_torch:
                    if hf is None:
                        from tq_deploy.eval.model import LoadedModel
                        from tq_deploy.models import load_hf_model, resolve_source

                        model = load_hf_model(resolve_source(tokenizer_source(metadata)))
                        hf = LoadedModel(model, tokenizer, os.path.basename(path), int(metadata["num_layers"]),
                                         int(metadata["num_q_heads"]), int(metadata["num_kv_heads"]),
                                         int(metadata["head_dim"]))
                    reference = config if config is not None else _config_of(metadata)
                    by_draw = [torch_perplexity(hf, reference, ids, chunk_size, int(metadata.get("seed", seed)), draw)
                               for draw in range(torch_draws)]
                    row["torch_ppl"] = sum(by_draw) / len(by_draw)
                    if torch_draws > 1:
                        row["torch_ppl_by_draw"] = by_draw
                    row["rel_diff"] = row["ppl"] / row["torch_ppl"] - 1
                    row["aligned_ppl"] = _ppl(aligned.reference_logits, ids)
                    row["aligned_rel_diff"] = row["ppl"] / row["aligned_ppl"] - 1
                    row["code_ties"] = aligned.ties.text()
                    row["aligned_passed"] = aligned.ties.passed and abs(row["aligned_rel_diff"]) <= ALIGNED_RTOL
                rows.append(row)
                if progress is not None:
                    progress(row)
            del session
            if exported:
                shutil.rmtree(os.path.dirname(path))
    return rows


def seed_means(rows: list[dict]) -> list[dict]:
    """Per (text, configuration) of :func:`ort_perplexity`'s rows: the mean ONNX Runtime perplexity over its
    seeds and, with ``torch_ppl``, the PyTorch mean, the relative difference of the two means and the mean
    and standard error of the per-seed relative differences (None for one seed)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["text"], row["config"]), []).append(row)
    means = []
    for (text, config), group in groups.items():
        n = len(group)
        mean = {"text": text, "config": config, "seeds": [r["seed"] for r in group],
                "ppl": sum(r["ppl"] for r in group) / n}
        if all("torch_ppl" in r for r in group):
            diffs = [r["rel_diff"] for r in group]
            mean["torch_ppl"] = sum(r["torch_ppl"] for r in group) / n
            mean["torch_draws"] = len(group[0].get("torch_ppl_by_draw", [0]))
            mean["rel_diff"] = mean["ppl"] / mean["torch_ppl"] - 1
            mean["rel_diff_mean"] = sum(diffs) / n
            mean["rel_diff_stderr"] = (sum((d - mean["rel_diff_mean"]) ** 2 for d in diffs) / (n - 1) / n) ** 0.5 \
                if n > 1 else None
        means.append(mean)
    return means


ALIGNED_RTOL = 1e-4  # the same function on the same codes: float32 rounding over a few thousand log-probabilities


def _ppl(chunk_logits, ids) -> float:
    """Perplexity of ``ids`` from the per-chunk logits of every row."""
    import math

    import numpy as np

    from tq_deploy.eval.stepped import log_softmax_nll

    flat = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids).reshape(-1)
    logits = np.concatenate(chunk_logits)[:len(flat) - 1]
    return math.exp(log_softmax_nll(logits, flat[1:]) / (len(flat) - 1))


def _config_of(metadata: dict):
    """The PyTorch configuration of an exported model's widths (per layer when they differ)."""
    layers = metadata.get("layer_bits")
    rotation = metadata.get("rotation", "haar")
    norm_dtype = metadata.get("norm_dtype", "float32")
    if layers:
        if rotation != "haar":
            raise ValueError(f"model rotation={rotation!r} with per-layer widths, expected 'haar'")
        return BitPlan(tuple((int(k), int(v)) for k, v in layers), int(metadata["head_dim"]),
                       key_mean=metadata.get("key_mean_calibration", "generated") if metadata.get("key_mean") else None,
                       norm_dtype=norm_dtype)
    half = norm_dtype == "float16"
    if metadata.get("key_mean"):
        return CacheConfig("mse", int(metadata["k_bits"]), int(metadata["v_bits"]), rotation,
                           transform=DEPLOYED_TRANSFORM, calibration=metadata.get("key_mean_calibration", "generated"),
                           half_norms=half)
    return CacheConfig("mse", int(metadata["k_bits"]), int(metadata["v_bits"]), rotation, half_norms=half)
