"""Atomic file writes: a reader, or a writer killed half-way, never sees half a file."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "check_writable",
    "describe_os_error",
    "remove_stale_temps",
]


TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename it over
    ``path`` (with the usual file mode, not ``mkstemp``'s private 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (newlines as given)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            handle.write(text)

    atomic_write(path, write)


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temporary files an :func:`atomic_write` killed half-way left in
    ``directory`` (``.NAME.XXXX.tmp``); returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [
        p
        for p in directory.iterdir()
        if p.is_file() and p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def check_writable(directory: str | Path) -> None:
    """Write and delete a small file in ``directory`` (or, if it does not exist yet, in its
    nearest existing parent, creating nothing); the ``OSError`` (read-only, no permission, a
    file in the way, disk full) if that fails."""
    directory = Path(directory).absolute()
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test.", suffix=TEMP_SUFFIX)
    try:
        os.write(fd, b"\0" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(probe)


def describe_os_error(err: OSError) -> str:
    """One line for people: what failed, on which file, and why."""
    where = f" {err.filename}" if err.filename else ""
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "a file is in the way",
    }
    reason = reasons.get(err.errno or 0, err.strerror or type(err).__name__)
    return f"cannot write{where}: {reason}"
