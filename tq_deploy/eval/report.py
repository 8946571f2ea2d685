"""Text table, JSON and PNG plot of the perplexity rows of perplexity.evaluate."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = (
    # header, row key, format
    ("config", "config", "{}"),
    ("k/v bits", None, "{}"),
    ("eff. bits", "effective_bits", "{:.2f}"),
    ("KV B/token", "kv_bytes_per_token", "{:,}"),
    ("PPL", "ppl", "{:.4f}"),
    ("delta %", "delta_pct", "{:+.2f}"),
    ("K rel.MSE", "key_relative_mse", "{:.4f}"),
    ("V rel.MSE", "value_relative_mse", "{:.4f}"),
    ("s", "seconds", "{:.1f}"),
)


def _bits(row: dict) -> str:
    if row["method"] == "fp32":
        return "32/32"
    return f"{row['k_bits']:g}/{row['v_bits']:g}"


def _columns(show_spread: bool):
    if not show_spread:
        return COLUMNS
    at = [key for _, key, _ in COLUMNS].index("delta_pct") + 1
    return COLUMNS[:at] + (("+- (seeds)", "delta_pct_std", "{:.2f}"),) + COLUMNS[at:]


def format_table(rows: list[dict], show_spread: bool = False) -> str:
    """A fixed-width text table, one line per row (``show_spread``: the std of delta over seeds)."""
    columns = _columns(show_spread)
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        cells.append([_bits(row) if key is None else fmt.format(row.get(key, 0.0)) for _, key, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: list[dict], show_spread: bool = False) -> str:
    """The same table as GitHub markdown (docs/quality.md)."""
    columns = _columns(show_spread)
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_bits(row) if key is None else fmt.format(row.get(key, 0.0))
                                       for _, key, fmt in columns) + " |")
    return "\n".join(lines)


def write_json(path: str | Path, rows: list[dict], meta: dict) -> None:
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", encoding="utf-8")


def _family(row: dict) -> str:
    if row["method"] in ("mse", "prod", "mixed") and row["rotation"] == "hadamard":
        family = f"{row['method']} (hadamard)"
    else:
        family = row["method"]
    if row.get("center_keys"):
        family += " centered K"
    if row["k_bits"] != row["v_bits"]:
        family += " k!=v"
    return family


def plot(path: str | Path, rows: list[dict], title: str = "") -> None:
    """PPL against effective bits, one line per method family, the fp32 baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    baseline = next((r for r in rows if r["method"] == "fp32"), None)
    # Clip the axis at 4x the baseline so that one collapsed configuration does not
    # flatten the rest; clipped points sit on the top edge with their value written.
    top = 4 * baseline["ppl"] if baseline is not None else max(r["ppl"] for r in rows)
    families: dict[str, list[dict]] = {}
    for row in rows:
        if row["method"] != "fp32":
            families.setdefault(_family(row), []).append(row)
    palette = plt.get_cmap("tab20").colors
    for index, (family, members) in enumerate(families.items()):
        members = sorted(members, key=lambda r: r["effective_bits"])
        xs = [r["effective_bits"] for r in members]
        ys = [min(r["ppl"], top) for r in members]
        style = ("s" if "centered" in family else "o") + (":" if "k!=v" in family else "-")
        (line,) = ax.plot(xs, ys, style, label=family, color=palette[(2 * index) % 20 + index // 10])
        for r in members:
            if r["ppl"] > top:
                ax.annotate(f"{r['ppl']:.0f}", (r["effective_bits"], top), textcoords="offset points",
                            xytext=(4, -10), fontsize=7, color=line.get_color())
            elif "k!=v" in family:
                ax.annotate(f"k{r['k_bits']:g}v{r['v_bits']:g}", (r["effective_bits"], r["ppl"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    if baseline is not None:
        ax.axhline(baseline["ppl"], color="k", linestyle="--", linewidth=1, label=f"fp32 cache ({baseline['ppl']:.3f})")
        ax.axhline(baseline["ppl"] * 1.01, color="grey", linestyle=":", linewidth=0.8, label="+1%")
        ax.axhline(baseline["ppl"] * 1.03, color="grey", linestyle="-.", linewidth=0.8, label="+3%")
        ax.set_ylim(baseline["ppl"] * 0.97, top * 1.05)
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per coordinate (codes + fp16 scales, K/V mean)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title or "Perplexity with a quantized KV cache")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
