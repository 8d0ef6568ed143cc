"""One loader for OCT volumes: the format told from the content (:func:`load_volume`).

========================================  ==========================================  =========
what                                      told by                                     read by
========================================  ==========================================  =========
Heidelberg ``.vol``                       ``HSF-OCT-`` (or eyepy's ``ep-v``) at byte 0  eyepy
Heidelberg ``.e2e``                       ``CMDb`` at byte 0                          eyepy
Heidelberg XML export (folder or zip)     an ``.xml`` file starting ``<HEDX>``         eyepy
B-scan images (folder or zip)             images, no XML                              the app
DICOM (Ophthalmic Tomography)             ``DICM`` at byte 128                        pydicom
========================================  ==========================================  =========

Every reader checks what the file declares (B-scan count, size, bytes) against
:mod:`mirage_demo.volumes`' limits before decoding any pixel; a volume that cannot be read
raises :class:`~mirage_demo.volumes.VolumeError` with one line saying why.
"""

from __future__ import annotations

import importlib
import zipfile
from pathlib import Path

from mirage_demo.images import IMAGE_SUFFIXES
from mirage_demo.volume_dicom import is_dicom, read_dicom
from mirage_demo.volume_heyex import VOL_MAGICS, FileSet, read_bscan_folder, read_vol, read_xml
from mirage_demo.volumes import Volume, VolumeError

__all__ = ["VOLUME_SUFFIXES", "is_volume", "load_volume", "volume_kind"]

#: File name endings the app offers for volumes (the content decides what a file is).
VOLUME_SUFFIXES = frozenset({".vol", ".e2e", ".dcm", ".dicom", ".zip"})
_E2E_MAGIC = b"CMDb"
_DICOM_SUFFIXES = (".dcm", ".dicom")
_HEAD = 132  # bytes that tell the formats apart


def volume_kind(path: str | Path) -> str | None:
    """What ``path`` holds, from its content: ``"vol"``, ``"e2e"``, ``"dicom"``, ``"zip"``
    (an XML export or B-scan images, told when opened), ``"xml"`` (a folder holding a
    Heidelberg XML export), ``"images"`` (a folder of images) or None."""
    path = Path(path)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        if any(_is_heyex_xml(p) for p in files if p.suffix.lower() == ".xml"):
            return "xml"
        return "images" if any(p.suffix.lower() in IMAGE_SUFFIXES for p in files) else None
    try:
        with open(path, "rb") as stream:
            head = stream.read(_HEAD)
    except OSError:
        return None
    if head.startswith(VOL_MAGICS):
        return "vol"
    if head.startswith(_E2E_MAGIC):
        return "e2e"
    if is_dicom(head) or path.suffix.lower() in _DICOM_SUFFIXES:
        return "dicom"  # with the DICM mark, or a bare dataset named .dcm
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")) and zipfile.is_zipfile(path):
        return "zip"
    return None


def is_volume(path: str | Path, *, image_folders: bool = False) -> bool:
    """Whether :func:`load_volume` reads ``path`` as a volume: a volume file, a zip, a folder
    holding an XML export, and (with ``image_folders``) a folder of B-scan images."""
    kind = volume_kind(path)
    return kind is not None and (kind != "images" or image_folders)


def load_volume(path: str | Path, name: str | None = None) -> Volume:
    """Open a volume (a file, a zip or a folder), its format told from its content.

    ``name`` is how messages and results name it (default: the file's name). Raises
    :class:`~mirage_demo.volumes.VolumeError` when it is not a volume this app reads or it
    passes a limit. Close the volume after use (``with load_volume(p) as volume: ...``)."""
    path = Path(path)
    name = name or path.name
    if not path.exists():
        raise VolumeError(name, "file not found")
    kind = volume_kind(path)
    if kind == "vol":
        return read_vol(path, name)
    if kind == "e2e":
        return _read_e2e(path, name)
    if kind == "dicom":
        return read_dicom(path, name)
    if kind in ("zip", "xml", "images"):
        files = FileSet.zip(path, name) if kind == "zip" else FileSet.folder(path, name)
        return _read_export(files, name)
    raise VolumeError(
        name,
        "not a volume this app reads (Heidelberg .vol, .e2e or XML export, DICOM "
        "Ophthalmic Tomography, or a folder or .zip of B-scan images)",
    )


def _read_export(files: FileSet, name: str) -> Volume:
    """A folder or zip: a Heidelberg XML export when it holds an XML file, else images."""
    xmls = [n for n in files.names if n.lower().endswith(".xml")]
    if len(xmls) > 1:
        files.close()
        raise VolumeError(name, f"{len(xmls)} XML files: one export at a time, please")
    if xmls:
        return read_xml(files, xmls[0], name)
    return read_bscan_folder(files, name)


def _read_e2e(path: Path, name: str) -> Volume:
    """:func:`mirage_demo.volume_e2e.read_e2e`, imported on first use: eyepy's E2E module
    builds a 65,536-entry table in Python when imported (about a second of every start)."""
    return importlib.import_module("mirage_demo.volume_e2e").read_e2e(path, name)


def _is_heyex_xml(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            return b"<HEDX" in stream.read(4096)
    except OSError:
        return False
