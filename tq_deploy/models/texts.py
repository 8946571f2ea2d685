"""The shipped public-domain texts (tq_deploy/eval/data, sources in its README.md) and reading a text:
what eval-ppl scores and calibrates its key/value transforms on."""

from __future__ import annotations

from pathlib import Path

DEFAULT_TEXT = "pride_and_prejudice_ch1-3.txt"
# The shipped texts by name: fiction and scientific non-fiction.
SHIPPED_TEXTS = {
    "austen": "pride_and_prejudice_ch1-3.txt",
    "darwin": "darwin_origin_of_species_ch1.txt",
}


def default_text_path() -> Path:
    return shipped_text_path(DEFAULT_TEXT)


def shipped_text_path(filename: str) -> Path:
    return Path(__file__).resolve().parent.parent / "eval" / "data" / filename


def resolve_texts(specs) -> list[tuple[str, Path]]:
    """``--text`` values -> [(name, path)]: a shipped name (austen, darwin), ``shipped`` for both,
    or a file path (named after its file stem). None or [] means both shipped texts."""
    specs = list(specs or ["shipped"])
    out: list[tuple[str, Path]] = []
    for spec in specs:
        key = str(spec).strip()
        if key.lower() == "shipped":
            pairs = [(name, shipped_text_path(f)) for name, f in SHIPPED_TEXTS.items()]
        elif key.lower() in SHIPPED_TEXTS:
            pairs = [(key.lower(), shipped_text_path(SHIPPED_TEXTS[key.lower()]))]
        else:
            path = Path(key)
            if not path.is_file():
                raise ValueError(f"--text={key!r} is neither a file nor a shipped text, expected a UTF-8 text "
                                 f"file or one of {', '.join([*SHIPPED_TEXTS, 'shipped'])}")
            pairs = [(path.stem, path)]
        out.extend(p for p in pairs if p not in out)
    return out


def read_text(path: str | Path | None = None) -> str:
    """The evaluation text: ``path``, or the shipped public-domain default (data/README.md)."""
    path = Path(path) if path is not None else default_text_path()
    from tq_deploy import files

    files.check_input(path, "text", "a UTF-8 text file")
    return path.read_text(encoding="utf-8")


def tokenize(tokenizer, text: str, num_tokens: int):
    """The first ``num_tokens`` token ids of ``text`` as a [1, num_tokens] int64 tensor."""
    if num_tokens < 2:
        raise ValueError(f"num_tokens={num_tokens}, expected >= 2 (perplexity needs a next token)")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < num_tokens:
        raise ValueError(
            f"num_tokens={num_tokens}, but the text has only {ids.shape[1]} tokens: "
            "expected a longer --text or a smaller --tokens"
        )
    return ids[:, :num_tokens]
