"""Lessons: an ordered set of scans a teacher gives every student, as a link or as a file.

- **A link** for the bundled test scans: the page's address with ``?lesson=`` and one short
  code per scan (:func:`scan_code`, 8 hex digits of the SHA-256 of the scan's name in its
  model's ``predictions.csv``), in order. The codes name no class: a student sees nothing of
  the answers in the address. :func:`parse_lesson_code` reads a code or a whole address,
  :func:`pick_scans` finds the scans.
- **A file** for any scans (an upload of the teacher's, or bundled ones): a small zip of
  ``lesson.json`` (format, version, title and the reference class of each scan, in order) and
  ``scans/01.png``, ``scans/02.jpeg``, ... A student's copy is untrusted:
  :func:`read_lesson_file` reads it through :mod:`mirage_demo.uploads` (entries counted before
  anything is read, members streamed with byte caps), bounds its size and its number of scans,
  takes no path from it (each scan is written under a new name) and checks every class
  against the model's. The reference classes are in ``lesson.json``: a student who unzips the
  file can read them (a lesson is an exercise, not an exam).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from mirage_demo.images import IMAGE_SUFFIXES, ImageReadError, image_header
from mirage_demo.uploads import RequestBudget, ZipUpload

__all__ = [
    "LESSON_FORMAT",
    "MAX_LESSON_FILE_BYTES",
    "MAX_LESSON_SCANS",
    "Lesson",
    "LessonError",
    "LessonScan",
    "lesson_code",
    "parse_lesson_code",
    "pick_scans",
    "read_lesson_file",
    "scan_code",
    "write_lesson_file",
]

LESSON_FORMAT = "mirage-demo-lesson"
LESSON_VERSION = 1
MANIFEST = "lesson.json"
SCANS_FOLDER = "scans"
MAX_LESSON_SCANS = 30  # scans in one lesson (a link, a file)
MAX_LESSON_FILE_BYTES = 40 * 2**20  # a lesson file, as uploaded
MAX_MANIFEST_BYTES = 64 * 2**10  # its lesson.json
MAX_TITLE = 120  # characters of a lesson's title
CODE_DIGITS = 8
_CODE = re.compile(rf"[0-9a-f]{{{CODE_DIGITS}}}")
_CODES = re.compile(rf"[0-9a-f]{{{CODE_DIGITS}}}(-[0-9a-f]{{{CODE_DIGITS}}})*")
T = TypeVar("T")


class LessonError(ValueError):
    """A lesson that cannot be used; the message says why, in a sentence for the student."""


@dataclass(frozen=True)
class LessonScan:
    """One scan of a lesson: the image and its reference class."""

    image: Path
    reference: str


@dataclass
class Lesson:
    """A lesson read from a file: its title and scans, in order."""

    title: str
    scans: list[LessonScan]


# --------------------------------------------------------------------------------------------
# Links: codes of bundled test scans


def scan_code(file: str) -> str:
    """A bundled test scan's code: the first 8 hex digits of the SHA-256 of its name."""
    return hashlib.sha256(file.encode()).hexdigest()[:CODE_DIGITS]


def lesson_code(files: Sequence[str]) -> str:
    """The ``?lesson=`` value of these scans, in order (codes joined by ``-``)."""
    if not files:
        raise LessonError("Pick at least one scan for the lesson.")
    if len(files) > MAX_LESSON_SCANS:
        raise LessonError(f"A lesson holds at most {MAX_LESSON_SCANS} scans.")
    return "-".join(scan_code(file) for file in files)


def parse_lesson_code(text: str | None) -> list[str]:
    """The scan codes of a lesson code, or of a whole address carrying ``?lesson=``; a
    :class:`LessonError` for anything else (nothing of it is echoed)."""
    text = (text or "").strip()
    if "lesson=" in text:
        values = parse_qs(urlsplit(text).query).get("lesson") or parse_qs(
            text.split("?", 1)[-1]
        ).get("lesson")
        text = (values or [""])[0].strip()
    if not text:
        raise LessonError("Paste the lesson link or code your teacher gave you.")
    if len(text) > (CODE_DIGITS + 1) * MAX_LESSON_SCANS or not _CODES.fullmatch(text.lower()):
        raise LessonError(
            "This is not a lesson code: copy the whole link or code your teacher gave you."
        )
    codes = text.lower().split("-")
    if len(codes) > MAX_LESSON_SCANS:
        raise LessonError(f"A lesson holds at most {MAX_LESSON_SCANS} scans.")
    return codes


def pick_scans(codes: Sequence[str], entries: Sequence[T], name: Any = None) -> list[T]:
    """The entries (each with a ``file`` attribute, or named by ``name(entry)``) that the
    codes name, in the codes' order; a :class:`LessonError` when some are missing."""
    key = name or (lambda entry: entry.file)
    by_code: dict[str, T] = {}
    for entry in entries:
        by_code.setdefault(scan_code(key(entry)), entry)
    missing = [code for code in codes if code not in by_code]
    if missing:
        raise LessonError(
            f"{len(missing)} of the {len(codes)} scans of this lesson are not among the test "
            "scans of the model chosen above: choose the model your teacher used, or ask for "
            "a new link."
        )
    if len(set(codes)) != len(codes):
        raise LessonError("This lesson lists a scan twice: ask your teacher for a new link.")
    return [by_code[code] for code in codes]


# --------------------------------------------------------------------------------------------
# Files


def write_lesson_file(
    path: str | Path, title: str, scans: Sequence[tuple[str | Path, str]]
) -> Path:
    """A lesson file at ``path``: ``lesson.json`` and the images of ``(image, reference
    class)`` as ``scans/01.<ext>``, ``scans/02.<ext>``, ... in order."""
    if not scans:
        raise LessonError("Pick at least one scan for the lesson.")
    if len(scans) > MAX_LESSON_SCANS:
        raise LessonError(f"A lesson holds at most {MAX_LESSON_SCANS} scans.")
    manifest = {
        "format": LESSON_FORMAT,
        "version": LESSON_VERSION,
        "title": title.strip()[:MAX_TITLE],
        "answers": [reference for _, reference in scans],
    }
    path = Path(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest, indent=1) + "\n")
        for number, (image, _) in enumerate(scans, start=1):
            suffix = Path(image).suffix.lower()
            archive.write(image, f"{SCANS_FOLDER}/{number:02d}{suffix}")
    return path


def read_lesson_file(path: str | Path, class_names: Sequence[str], out: str | Path) -> Lesson:
    """An uploaded lesson file, checked; its scans are written into ``out`` as ``01.<ext>``,
    ... (names of ours, never the file's). A :class:`LessonError` says what is wrong."""
    path, out = Path(path), Path(out)
    if os.path.getsize(path) > MAX_LESSON_FILE_BYTES:
        raise LessonError(
            f"This lesson file is larger than {MAX_LESSON_FILE_BYTES // 2**20} MB: a lesson "
            "file made by this app is much smaller."
        )
    budget = RequestBudget()
    with ExitStack() as stack:
        try:
            upload = ZipUpload.open(path, "lesson file")
        except ImageReadError as err:
            raise LessonError(f"This is not a lesson file ({err.reason}).") from err
        stack.callback(upload.close)
        try:
            raw = upload.read_member(MANIFEST, MAX_MANIFEST_BYTES, budget)
        except ImageReadError as err:
            raise LessonError(f"This lesson file is damaged ({err.reason}).") from err
        if raw is None:
            raise LessonError("This is not a lesson file: it has no lesson.json.")
        title, answers = _manifest(raw, class_names)
        items = sorted(
            (
                item
                for item in upload.items
                if item.member and PurePosixPath(item.member).parent.as_posix() == SCANS_FOLDER
            ),
            key=lambda item: item.member or "",
        )
        if len(items) != len(answers):
            raise LessonError(
                f"This lesson file is damaged: it holds {len(items)} scans for "
                f"{len(answers)} answers."
            )
        out.mkdir(parents=True, exist_ok=True)
        scans = [
            LessonScan(_unpacked(item, budget, out / f"{n:02d}"), reference)
            for n, (item, reference) in enumerate(zip(items, answers, strict=True), start=1)
        ]
    return Lesson(title, scans)


def _manifest(raw: bytes, class_names: Sequence[str]) -> tuple[str, list[str]]:
    """``(title, answers)`` of a lesson file's ``lesson.json``, checked."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise LessonError("This lesson file is damaged: its lesson.json cannot be read.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != LESSON_FORMAT:
        raise LessonError("This is not a lesson file made by this app.")
    if manifest.get("version") != LESSON_VERSION:
        raise LessonError("This lesson file was made by another version of the app.")
    answers = manifest.get("answers")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise LessonError("This lesson file is damaged: its answers cannot be read.")
    if not answers or len(answers) > MAX_LESSON_SCANS:
        raise LessonError(f"A lesson holds 1 to {MAX_LESSON_SCANS} scans.")
    unknown = sorted({a for a in answers if a not in class_names})
    if unknown:
        shown = ", ".join(a[:40] for a in unknown[:5])
        raise LessonError(
            f"This lesson is about classes the model chosen above does not know ({shown}; it "
            f"knows {', '.join(class_names)}): choose the model your teacher used."
        )
    title = manifest.get("title")
    return (title.strip()[:MAX_TITLE] if isinstance(title, str) else ""), answers


def _unpacked(item: Any, budget: RequestBudget, stem: Path) -> Path:
    """One scan of a lesson file, written as ``stem`` + its image suffix once its header is
    one the app reads."""
    suffix = PurePosixPath(item.member or "").suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise LessonError("This lesson file is damaged: it holds a file that is not a scan.")
    try:
        source = item.load(budget)
        with image_header(source, item.name):
            pass
    except ImageReadError as err:
        raise LessonError(f"This lesson file is damaged ({err.reason}).") from err
    target = stem.with_suffix(suffix)
    target.write_bytes(source if isinstance(source, bytes) else Path(source).read_bytes())
    return target
