"""What the adversarial tests share: hostile checkpoints, images and zips, built small.

Every hostile file is built here or in :mod:`tests.hostile_files`: images that declare huge sizes
in a few hundred bytes, zip bombs made with ``zipfile``, checkpoints whose config.json asks for
downloads. The fixtures (``tiny_ckpt``, ``app_server``, ``huge_png``) are in ``conftest.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]
EXAMPLE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "CNV" / "CNV-451136-1.jpeg"


def with_config(tiny_ckpt: Path, tmp_path: Path, change) -> Path:
    """A copy of the tiny checkpoint whose config.json went through ``change(dict)``."""
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "model.safetensors").symlink_to(tiny_ckpt / "model.safetensors")
    config = json.loads((tiny_ckpt / "config.json").read_text())
    text = change(config)
    (out / "config.json").write_text(text if isinstance(text, str) else json.dumps(config))
    return out


def set_field(path: str, value):
    def change(config: dict) -> None:
        *parents, key = path.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value

    return change


def png_header_only(width: int, height: int, color_type: int = 6, depth: int = 8) -> bytes:
    """A syntactically valid PNG declaring ``width x height`` with almost no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A ~300-byte JPEG whose frame header declares ``width x height`` (truncated data)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def png_bytes(size=(48, 32), value=90) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, "PNG")
    return buffer.getvalue()


def animated(fmt: str) -> bytes:
    import io

    from PIL import Image

    frames = [Image.new("L", (32, 24), v) for v in (200, 10, 10)]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def make_zip(path: Path, members: dict[str, bytes], method=None) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", method or zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def patch_entry(path: Path, name: str, **fields: int) -> None:
    """Rewrite fields of ``name``'s local header and central-directory record in place:
    ``flags``, ``method``, ``size`` (the declared uncompressed size)."""
    data = bytearray(path.read_bytes())
    encoded = name.encode()
    offsets = {"flags": (6, 8), "method": (8, 10), "size": (22, 26)}  # local header
    central = {"flags": (8, 10), "method": (10, 12), "size": (24, 28)}
    for signature, layout, name_at in ((b"PK\x03\x04", offsets, 30), (b"PK\x01\x02", central, 46)):
        start = 0
        while (at := data.find(signature, start)) >= 0:
            start = at + 4
            if data[at + name_at : at + name_at + len(encoded)] != encoded:
                continue
            for key, value in fields.items():
                low, high = layout[key]
                data[at + low : at + high] = value.to_bytes(high - low, "little")
    path.write_bytes(bytes(data))


def load_all(path: Path, label: str = "scans.zip", budget=None):
    """{name: bytes or error text} of every item of an uploaded zip."""
    from contextlib import ExitStack

    from mirage_demo.data import ImageReadError
    from mirage_demo.uploads import RequestBudget, expand_uploads

    budget = budget or RequestBudget()
    out = {}
    with ExitStack() as stack:
        for item in expand_uploads([(label, str(path))], stack):
            try:
                out[item.name] = item.load(budget)
            except ImageReadError as err:
                out[item.name] = str(err)
    return out


def labelled_zip(path: Path, names: list[str]) -> dict:
    scan = EXAMPLE.read_bytes()
    members = {name: (b"junk" if "junk" in name else scan) for name in names}
    return {"path": str(make_zip(path, members)), "orig_name": path.name}
