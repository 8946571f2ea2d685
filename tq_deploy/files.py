"""Writing output files whole or not at all.

Every file tq-deploy writes (models, engines, reports, outputs) goes to a temporary file in the
destination's folder and is renamed over the destination once complete: a full disk, a crash or
an interrupted run never leaves a truncated file where a good one was.
"""

from __future__ import annotations

import contextlib
import os
import stat
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


def kind_of(path: str | os.PathLike) -> str | None:
    """What is at ``path``: None (nothing), "file", "folder", "FIFO", "device", "socket" ..."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as err:  # a dangling link, a path through a file, no permission: say so
        return f"unreadable path ({err.strerror or err})"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def check_input(path: str | os.PathLike, what: str, expected: str = "a file") -> Path:
    """``path`` must be an existing regular file; the error says what is there instead ("does not
    exist" only when nothing is)."""
    kind = kind_of(path)
    if kind == "file":
        return Path(path)
    found = "does not exist" if kind is None else f"is a {kind}"
    raise ValueError(f"{what} {str(path)!r} {found}, expected {expected}")


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_writable(path: str | os.PathLike, what: str = "output", inputs=()) -> Path:
    """Fails early (before a long run) when ``path`` cannot be written: its folder must exist and
    take a new file (tried for real: permission bits say nothing for root, read-only mounts or
    /proc), ``path`` must be new or a regular file (a rename over /dev/null as root would replace the
    device node), and it must not be one of the command's ``inputs`` ((option, path) pairs): the
    input would be replaced by the output it is read to make."""
    target = Path(path)
    folder = _folder(target)
    kind = kind_of(target)
    if kind == "folder":
        raise ValueError(f"{what} path {str(target)!r} is a folder, expected a file path")
    if kind not in (None, "file"):
        raise ValueError(f"{what} path {str(target)!r} is a {kind}, expected a regular file or a new path")
    for option, source in inputs:
        if source is not None and _same_file(target, source):
            raise ValueError(f"{what} path {str(target)!r} is the input {option} {str(source)!r}, expected "
                             "another path (the output would replace its input)")
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


# A serialized TensorRT engine starts with a 4-byte tag "?trt": "ftrt" (TensorRT), "ptrt" (version-
# compatible), "vtrt" (TensorRT-RTX); the rest of its header is version-specific.
ENGINE_TAGS = (b"ftrt", b"ptrt", b"vtrt")


def check_engine(path: str | os.PathLike, what: str = "--engine") -> Path:
    """``path`` must be a serialized TensorRT engine: checked by its header, so that a machine where
    TensorRT cannot run (and the engine would be skipped) still refuses a file that is not one."""
    target = check_input(path, what, "a TensorRT engine file")
    with open(target, "rb") as f:
        head = f.read(32)
    if len(head) < 32 or head[:4] not in ENGINE_TAGS:
        raise ValueError(f"{what} {str(target)!r} starts with {head[:4]!r}, expected a TensorRT engine (a file "
                         f"starting with {' or '.join(t.decode() for t in ENGINE_TAGS)})")
    return target
