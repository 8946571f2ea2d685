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
    if row["method"] == "plan":
        return f"{row['k_bits']:.2g}/{row['v_bits']:.2g} (mean)"
    return f"{row['k_bits']:g}/{row['v_bits']:g}"


def _cell(row: dict, key, fmt: str) -> str:
    if key is None:
        return _bits(row)
    if key == "delta_pct_std" and len(row.get("ppl_by_seed", [])) <= 1:
        return ""  # one run: nothing random (fp32, naive, KIVI, int8) or one seed
    return fmt.format(row.get(key, 0.0))


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
        cells.append([_cell(row, key, fmt) for _, key, fmt in columns])
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
        lines.append("| " + " | ".join(_cell(row, key, fmt) for _, key, fmt in columns) + " |")
    return "\n".join(lines)


def write_json(path: str | Path, rows: list[dict], meta: dict) -> None:
    from tq_deploy import files

    files.write_text(path, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


def _family(row: dict) -> str:
    if row["method"] in ("mse", "prod", "mixed") and row["rotation"] == "hadamard":
        family = f"{row['method']} (hadamard)"
    else:
        family = row["method"]
    if row.get("center_keys"):
        family += " centered K"
    if row.get("transform"):
        family += f" {row['transform']}"
    if row.get("half_norms"):
        family += " fp16 norms"
    if row["k_bits"] != row["v_bits"]:
        family += " k!=v"
    return family


def plot(path: str | Path, rows: list[dict], title: str = "") -> None:
    """PPL delta against effective bits, one panel per text, one line per method family, +1%/+3% lines."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from tq_deploy import files

    texts = list(dict.fromkeys(r.get("text", "") for r in rows))
    fig, axes = plt.subplots(1, len(texts), figsize=(7.0 * len(texts), 5.0), squeeze=False)
    families_all = list(dict.fromkeys(_family(r) for r in rows if r["method"] != "fp32"))
    palette = plt.get_cmap("tab20").colors
    color = {f: palette[(2 * i) % 20 + (i // 10) % 2] for i, f in enumerate(families_all)}
    for ax, text in zip(axes[0], texts):
        members_of_text = [r for r in rows if r.get("text", "") == text]
        baseline = next((r for r in members_of_text if r["method"] == "fp32"), None)
        top = 60.0  # percent; collapsed configurations sit on the top edge with their value written
        families: dict[str, list[dict]] = {}
        for row in members_of_text:
            if row["method"] != "fp32":
                families.setdefault(_family(row), []).append(row)
        for family, members in families.items():
            members = sorted(members, key=lambda r: r["effective_bits"])
            xs = [r["effective_bits"] for r in members]
            ys = [min(max(r["delta_pct"], 0.01), top) for r in members]
            style = ("s" if "centered" in family else "o") + (":" if "k!=v" in family else "-")
            ax.plot(xs, ys, style, label=family, color=color[family])
            for r in members:
                if r["delta_pct"] > top:
                    ax.annotate(f"+{r['delta_pct']:.0f}%", (r["effective_bits"], top), textcoords="offset points",
                                xytext=(4, -10), fontsize=7, color=color[family])
                elif "k!=v" in family or r["method"] == "plan":
                    label = f"k{r['k_bits']:g}v{r['v_bits']:g}" if r["method"] in ("mse", "kivi") else r["config"]
                    ax.annotate(label,
                                (r["effective_bits"], max(r["delta_pct"], 0.01)),
                                textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=0.8, label="+1%")
        ax.axhline(3.0, color="grey", linestyle="-.", linewidth=0.8, label="+3%")
        ax.set_yscale("log")
        ax.set_ylim(0.05, top * 1.5)
        ax.set_xlabel("effective bits per coordinate (codes + scales, K/V mean)")
        ax.set_ylabel("PPL increase over the fp32 cache, % (log scale)")
        fp32 = f"fp32 cache PPL {baseline['ppl']:.3f}" if baseline else ""
        ax.set_title(f"{text}: {fp32}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title or "Perplexity with a quantized KV cache")
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
