"""Atomic file writes: a reader, or a writer killed half-way, never sees half a file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename it over
    ``path`` (with the usual file mode, not ``mkstemp``'s private 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
