"""The folders of the long jobs that keep files (``/evaluate``'s scans and report, ``/adapt``'s
and its downloadable model): bounded on disk, in this app's own temporary folder.

Every job folder lives in :func:`jobs_dir` (inside this process's own temporary folder, never
beside other programs' files), is deleted :data:`JOBS_KEPT_S` after it was made, and all of them
together hold at most :data:`JOBS_MAX_BYTES`: :func:`account` measures the folders as they are
on disk (not a size recorded once) and deletes the oldest others; it runs when a job starts,
when it ends and after every later write into a folder (a checkpoint to download). A job that
fails leaves nothing, and its error never names a server path.
"""

from __future__ import annotations

import contextlib
import html
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from mirage_demo.data import DataError
from mirage_demo.ui.context import app_temp

__all__ = ["JOBS_KEPT_S", "JOBS_MAX_BYTES", "account", "folder_bytes", "job_folder", "jobs_dir"]

JOBS_KEPT_S = 3600  # unpacked uploads, reports and adapted models older than this are deleted
JOBS_MAX_BYTES = 2**30  # on disk for all kept jobs together; the oldest go first


def jobs_dir() -> Path:
    """The folder of every job folder (created on first use)."""
    folder = app_temp() / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def folder_bytes(folder: Path) -> int:
    """What ``folder`` holds on disk now (files only; a file deleted meanwhile counts 0)."""
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def account(keep: Path | None = None, parent: Path | None = None) -> int:
    """Delete the job folders older than :data:`JOBS_KEPT_S`, then the oldest until all of
    them hold at most :data:`JOBS_MAX_BYTES`, never ``keep`` (the job writing now). Sizes are
    measured, so every write counts. Returns the bytes kept."""
    parent = parent or jobs_dir()
    now, kept = time.time(), []
    for folder in parent.iterdir():
        try:
            age = now - folder.stat().st_mtime
        except OSError:
            continue
        if folder == keep:
            kept.append((-1.0, folder_bytes(folder), folder))  # sorted last: never deleted
        elif age > JOBS_KEPT_S:
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.is_dir():
            kept.append((age, folder_bytes(folder), folder))
    total = sum(size for _, size, _ in kept)
    for age, size, folder in sorted(kept, key=lambda entry: -entry[0]):  # the oldest first
        if total <= JOBS_MAX_BYTES or age < 0:
            break
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
    return total


def scrubbed(text: str, folder: Path) -> str:
    """``text`` with the job folder's server path replaced by words."""
    return text.replace(str(folder / "scans"), "your upload").replace(str(folder), "your upload")


@contextlib.contextmanager
def job_folder(prefix: str, title: str) -> Iterator[Path]:
    """A new folder for one upload's job (room made first); counted again when the job is done,
    and a job that fails leaves nothing (a :class:`~mirage_demo.data.DataError` becomes a
    message titled ``title``, without the folder's path)."""
    account()
    out = Path(tempfile.mkdtemp(prefix=prefix, dir=jobs_dir()))
    try:
        yield out
    except DataError as err:
        shutil.rmtree(out, ignore_errors=True)
        raise gr.Error(html.escape(scrubbed(str(err), out)), title=title) from err
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    account(keep=out)
