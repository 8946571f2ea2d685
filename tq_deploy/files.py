"""Writing output files whole or not at all.

Every file tq-deploy writes (models, engines, reports, outputs) goes to a temporary file in the
destination's folder and is renamed over the destination once complete: a full disk, a crash or
an interrupted run never leaves a truncated file where a good one was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path next to ``path``; on a clean exit it replaces ``path``, on an error it
    is removed and ``path`` is left as it was."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fails early (before a long run) when ``path`` cannot be written: its folder must exist and be
    writable, and ``path`` must not be a folder."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ValueError(f"{what} path {str(target)!r} is a folder, expected a file path")
    if not folder.is_dir():
        raise ValueError(f"{what} path {str(target)!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{what} path {str(target)!r}: folder {str(folder)!r} is not writable")
    return target
