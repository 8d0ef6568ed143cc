"""Hostile uploads (issues 12, 20): images that declare huge sizes, scan bombs, zip bombs; every
cost bounded before decoding, every bad entry listed, never fatal for the good ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import mirage_demo  # noqa: F401  (registers the mirage_* models)
from tests.adversarial import (
    CLASSES,
    animated,
    jpeg_declaring,
    load_all,
    make_zip,
    patch_entry,
    png_bytes,
    png_header_only,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# Images that declare huge sizes decode reduced, or are refused before decoding


def test_huge_png_is_decoded_reduced(huge_png):
    from mirage_demo.data import MAX_WORK_PIXELS, read_image

    assert huge_png.stat().st_size < 1_000_000
    gray = read_image(huge_png)
    assert gray.size <= MAX_WORK_PIXELS and gray.shape == (2000, 2000)
    assert gray[:, :900].min() == 255 and gray[:, 1100:].max() == 0


def test_huge_jpeg_is_decoded_at_a_fraction_of_its_size(tmp_path):
    from PIL import Image

    from mirage_demo.data import MAX_WORK_PIXELS, open_image

    path = tmp_path / "big.jpeg"
    Image.new("L", (7999, 7999), 100).save(path, quality=10)
    image = open_image(path)
    assert image.width * image.height <= MAX_WORK_PIXELS and image.size == (2000, 2000)


@pytest.mark.parametrize(
    "data, message",
    [
        (png_header_only(8000, 8000), r"8000x8000 RGBA pixels decode to 244 MB \(limit 192 MB\)"),
        (png_header_only(9000, 9000, color_type=0), "too large"),
    ],
    ids=["RGBA PNG over the decode budget", "81 MP"],
)
def test_images_declaring_huge_sizes_fail_in_one_line(tmp_path, data, message):
    from mirage_demo.data import ImageReadError, read_image

    path = tmp_path / "hostile.img"
    path.write_bytes(data)
    assert len(data) < 1000
    with pytest.raises(ImageReadError, match=message) as info:
        read_image(path)
    assert "\n" not in str(info.value) and str(info.value).startswith("hostile.img: ")


def test_tiny_jpeg_declaring_huge_size_decodes_reduced(tmp_path):
    from mirage_demo.data import MAX_WORK_PIXELS, read_image

    path = tmp_path / "bomb.jpeg"
    path.write_bytes(jpeg_declaring(7999, 7999))
    assert path.stat().st_size < 400
    assert read_image(path).size <= MAX_WORK_PIXELS  # libjpeg pads the missing data


def _exif_rotated_jpeg(path: Path, orientation: int) -> None:
    """A 40x20 (width x height) JPEG, bright on its left half, with an EXIF orientation."""
    from PIL import Image

    image = Image.new("L", (40, 20), 0)
    image.paste(255, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied_everywhere(tmp_path, tiny_ckpt):
    from mirage_demo.data import read_image
    from mirage_demo.inference import Predictor

    path = tmp_path / "phone.jpeg"
    _exif_rotated_jpeg(path, 6)  # "rotate 90 degrees clockwise to view"
    gray = read_image(path)  # training, evaluation (Preprocessing.read_resized) and the CLI
    assert gray.shape == (40, 20)
    assert gray[:15].mean() > 200 and gray[25:].mean() < 50  # the bright half is now on top
    predictor = Predictor.from_pretrained(tiny_ckpt)  # the app
    assert predictor.predict(path).image_size == (40, 20)
    assert predictor.explain(path).heatmap.shape == (40, 20)
    from PIL import Image

    with Image.open(path) as opened:  # an opened PIL image, too, and only once
        assert read_image(opened).shape == (40, 20)


# --------------------------------------------------------------------------------------------
# Zip archives: streamed, capped, every entry listed, never fatal for the good ones


def test_zip_declaring_small_sizes_is_read_with_a_real_cap(tmp_path):
    import tracemalloc

    bomb = b"\x00" * (48 * 2**20)  # 48 MB of zeros: ~50 KB deflated
    path = make_zip(tmp_path / "bomb.zip", {"good.png": png_bytes(), "bomb.png": bomb})
    del bomb
    patch_entry(path, "bomb.png", size=1024)  # the headers claim 1 KB
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    try:
        result = load_all(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result["scans.zip/good.png"] == png_bytes()
    assert result["scans.zip/bomb.png"].startswith("scans.zip/bomb.png: corrupt in the zip (")
    assert peak < 8 * 2**20  # inflated in 1 MB steps, and only up to the declared size


def test_zip_entries_are_counted_before_any_is_read(tmp_path):
    from mirage_demo.uploads import MAX_ZIP_ENTRIES

    many = {f"f{i}.png": b"" for i in range(MAX_ZIP_ENTRIES + 1)}
    path = make_zip(tmp_path / "many.zip", many, method=0)
    result = load_all(path, "many.zip")
    assert result == {"many.zip": "many.zip: the archive holds 2,001 entries (limit 2,000)"}


def test_bad_entries_are_listed_and_the_good_ones_classified(tmp_path):
    import zipfile

    members = {
        "a/good.png": png_bytes(),
        "corrupt.png": png_bytes((64, 64), 7) * 3,
        "secret.png": png_bytes(),
        "odd.png": png_bytes(),
        "inner.zip": b"PK\x05\x06" + b"\x00" * 18,
        "notes.txt": b"hello",
        "anim.gif": animated("GIF"),
        "anim.webp": animated("WEBP"),
        "__MACOSX/._good.png": b"junk",
        "empty-folder/": b"",
    }
    path = make_zip(tmp_path / "mixed.zip", members)
    patch_entry(path, "secret.png", flags=1)  # encrypted
    patch_entry(path, "odd.png", method=99)  # an unknown compression method
    data = bytearray(path.read_bytes())  # corrupt corrupt.png's deflate stream
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("corrupt.png")
    start = info.header_offset + 30 + len(b"corrupt.png") + 10
    data[start : start + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))

    result = load_all(path, "mixed.zip")
    listed = {f"mixed.zip/{n}" for n in members if not n.startswith(("__", "empty", "notes"))}
    assert set(result) == listed  # notes.txt is not an image: not a row
    assert result["mixed.zip/a/good.png"] == png_bytes()
    assert "corrupt in the zip" in result["mixed.zip/corrupt.png"]
    assert result["mixed.zip/secret.png"].endswith("skipped: encrypted (password-protected) entry")
    assert "compression method 99 is not supported" in result["mixed.zip/odd.png"]
    assert result["mixed.zip/inner.zip"].endswith("skipped: a zip inside a zip is not opened")

    from mirage_demo.data import read_image

    for name in ("anim.gif", "anim.webp"):  # animated images: the first frame
        gray = read_image(result[f"mixed.zip/{name}"])
        assert gray.shape == (24, 32) and gray.mean() > 150


def test_a_bad_zip_beside_good_files_is_one_listed_item(tmp_path):
    from contextlib import ExitStack

    from mirage_demo.data import ImageReadError
    from mirage_demo.uploads import RequestBudget, expand_uploads

    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"this is not a zip at all")
    with ExitStack() as stack:
        items = expand_uploads([("fake.zip", str(fake)), ("good.png", str(good))], stack)
        assert [item.name for item in items] == ["fake.zip", "good.png"]
        with pytest.raises(ImageReadError, match=r"^fake.zip: not a readable zip archive"):
            items[0].load(RequestBudget())
        assert items[1].load(RequestBudget()) == str(good)


def test_one_request_has_a_byte_and_a_pixel_budget(tmp_path):
    from mirage_demo.uploads import MAX_REQUEST_PIXELS, RequestBudget

    header = png_header_only(8000, 8000, color_type=0)  # 64 megapixels declared, tiny file
    path = make_zip(tmp_path / "big.zip", {f"{i:02d}.png": header for i in range(16)})
    result = load_all(path, "big.zip")
    fits = MAX_REQUEST_PIXELS // 64_000_000
    refused = [n for n, v in result.items() if isinstance(v, str) and "megapixels in all" in v]
    assert len(refused) == 16 - fits and sorted(refused) == sorted(result)[fits:]

    small = make_zip(tmp_path / "small.zip", {"a.png": png_bytes(), "b.png": png_bytes()})
    result = load_all(small, "small.zip", RequestBudget(bytes_left=len(png_bytes()) + 10))
    assert result["small.zip/a.png"] == png_bytes()
    assert "limit" in result["small.zip/b.png"] and "MB unpacked" in result["small.zip/b.png"]


# --------------------------------------------------------------------------------------------
# Issue 20: every request bounded in CPU time, memory and disk, whatever the upload


def _decodes(monkeypatch) -> list:
    """Every image PIL decodes from now on (``ImageFile.load`` calls)."""
    from PIL import ImageFile

    decoded, real = [], ImageFile.ImageFile.load

    def load(self):
        decoded.append(self.format)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return decoded


def test_jpeg_scan_bomb_is_refused_before_decoding(monkeypatch):
    from mirage_demo.data import ImageReadError, open_image
    from tests.hostile_files import scan_bomb

    decoded = _decodes(monkeypatch)
    bomb = scan_bomb((256, 256), scans=5000)  # 50 KB; at 7999x7999, minutes of decoding
    with pytest.raises(ImageReadError, match=r"^bomb.jpeg: a JPEG of 5,00\d scans \(limit 64\)"):
        open_image(bomb, "bomb.jpeg")
    assert decoded == []
    from mirage_demo.data import MAX_JPEG_SCANS

    long_but_legal = scan_bomb((256, 256), scans=MAX_JPEG_SCANS - 10)
    assert open_image(long_but_legal).size == (256, 256) and decoded == ["JPEG"]


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n"


@pytest.mark.parametrize("kind", ["ico", "eps"])
def test_formats_the_app_does_not_read_are_never_opened(monkeypatch, kind):
    from mirage_demo.data import ImageReadError, open_image
    from mirage_demo.uploads import RequestBudget
    from tests.hostile_files import ico_bomb

    data = ico_bomb(3000) if kind == "ico" else EPS  # the ICO plugin decodes its PNG on open
    decoded = _decodes(monkeypatch)
    budget = RequestBudget()
    assert budget.take_pixels(data) is None and budget.pixels_left == RequestBudget().pixels_left
    with pytest.raises(ImageReadError, match=r"^scan.png: not a readable image \(unknown format"):
        open_image(data, "scan.png")  # uploaded as .png
    assert decoded == []


def test_evaluate_writes_only_what_it_can_evaluate(tmp_path):
    """Issue 20's disk amplification: zero-filled members (and a real scan followed by
    megabytes of zeros) are refused before anything is written."""
    from mirage_demo.evaluation import labelled_upload
    from tests.hostile_files import real_scans, zeros_zip

    archive = zeros_zip(tmp_path / "zeros.zip", members=3, member_mb=8)
    padded = tmp_path / "CNV-1-1.jpeg"  # a real scan, then 8 MB of zeros
    padded.write_bytes(next(iter(real_scans(1).values())) + bytes(8 * 2**20))
    uploads = [("zeros.zip", str(archive)), ("CNV-1-1.jpeg", str(padded))]
    upload = labelled_upload(uploads, CLASSES, tmp_path / "scans")
    written = sum(p.stat().st_size for p in (tmp_path / "scans").rglob("*") if p.is_file())
    assert len(upload.samples) == 4
    assert written == sum(map(len, real_scans().values()))
    reasons = sorted(entry.split(": ", 1)[1] for entry in upload.skipped)
    assert reasons[:3] == ["not a readable image (unknown format)"] * 3, reasons
    assert reasons[3].startswith("skipped: 8,") and "more than its 512x496 pixels" in reasons[3]
