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


def _folder(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


def _final_mode(target: Path) -> int:
    """The permissions the file gets: an existing file keeps its own; a new one gets what open()
    would give it (0666 less the umask). mkstemp creates 0600 files, which would make every model
    and report unreadable to the other users of a shared machine."""
    with contextlib.suppress(OSError):
        return target.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path next to ``path``; on a clean exit it replaces ``path``, on an error it
    is removed and ``path`` is left as it was. The temporary name ends with ``path``'s suffix, so
    writers that pick a format from the extension (matplotlib) or append one (numpy.savez) work."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".part{target.suffix}", dir=_folder(target))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _final_mode(target))
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
    """Fails early (before a long run) when ``path`` cannot be written: its folder must exist and
    take a new file (tried for real: permission bits say nothing for root, read-only mounts or
    /proc), and ``path`` must not be a folder."""
    target = Path(path)
    folder = _folder(target)
    if target.is_dir():
        raise ValueError(f"{what} path {str(target)!r} is a folder, expected a file path")
    if not folder.is_dir():
        raise ValueError(f"{what} path {str(target)!r}: folder {str(folder)!r} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=folder)
    except OSError as err:
        raise ValueError(f"{what} path {str(target)!r}: folder {str(folder)!r} does not take new files "
                         f"({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)
    return target
