"""Hostile uploads of issue 20, built small and in memory (tests and
``benchmarks/hostile_requests.py`` send the same files)."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"


def scan_bomb(size: tuple[int, int] = (7999, 7999), scans: int = 3000) -> bytes:
    """A valid progressive JPEG followed by ``scans`` empty scans (10 bytes each), each of
    which libjpeg decodes as a pass over every pixel."""
    buffer = io.BytesIO()
    Image.new("L", size, 128).save(buffer, "JPEG", progressive=True, quality=50)
    data = buffer.getvalue()
    last = data.rfind(b"\xff\xda")  # the last scan's header: repeated with no data
    header = data[last : last + 2 + int.from_bytes(data[last + 2 : last + 4], "big")]
    return data[:-2] + header * scans + b"\xff\xd9"


def ico_bomb(side: int = 13000) -> bytes:
    """An .ico holding one ``side x side`` PNG (of zeros: a few hundred KB), which PIL's ICO
    plugin decodes inside ``Image.open``."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 0).save(buffer, "PNG", compress_level=9)
    png = buffer.getvalue()
    directory = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return directory + entry + png


def real_scans(count: int = 4) -> dict[str, bytes]:
    """``{"<CLASS>/<file>": bytes}`` of ``count`` bundled example scans."""
    paths = sorted(EXAMPLES.glob("*/*.jp*g"))[:count]
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in paths}


def zeros_zip(path: Path, members: int = 3, member_mb: int = 64) -> Path:
    """A zip of the four real scans and ``members`` zero-filled ``member_mb`` MB ``.jpeg``
    entries (about 64 KB each, deflated): unpacked blindly, each fills the disk."""
    zeros = bytes(member_mb * 2**20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in real_scans().items():
            archive.writestr(name, data)
        for i in range(members):
            archive.writestr(f"CNV/zeros-{i}.jpeg", zeros)
    return path


def many_entries_zip(path: Path, entries: int = 2000) -> Path:
    """A zip of ``entries`` tiny stored PNGs: listed many times in one request."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 90).save(buffer, "PNG")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for i in range(entries):
            archive.writestr(f"NORMAL/{i:05d}.png", buffer.getvalue())
    return path
