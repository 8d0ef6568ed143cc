"""Hostile and careless input, as a public Space gets it (issue 12).

Every hostile file is built here, small: images that declare huge sizes in a few hundred bytes,
zip bombs made with ``zipfile``, checkpoints whose config.json asks for downloads. Each test is
bounded in time; none reads data outside the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import mirage_demo  # noqa: F401  (registers the mirage_* models)
from mirage_demo.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from mirage_demo.data import Preprocessing

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]


# --------------------------------------------------------------------------------------------
# A checkpoint's config.json is untrusted data


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    kwargs = {"img_size": 64, "depth": 1}
    model = timm.create_model("mirage_tiny_patch32_512", num_classes=4, **kwargs).eval()
    config = CheckpointConfig(
        "mirage_tiny_patch32_512", CLASSES, Preprocessing.from_model(model), model_kwargs=kwargs
    )
    return save_checkpoint(directory, model, config)


def _with_config(tiny_ckpt: Path, tmp_path: Path, change) -> Path:
    """A copy of the tiny checkpoint whose config.json went through ``change(dict)``."""
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "model.safetensors").symlink_to(tiny_ckpt / "model.safetensors")
    config = json.loads((tiny_ckpt / "config.json").read_text())
    text = change(config)
    (out / "config.json").write_text(text if isinstance(text, str) else json.dumps(config))
    return out


def _set(path: str, value):
    def change(config: dict) -> None:
        *parents, key = path.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value

    return change


WEIGHT_LOCATIONS = [
    {"pretrained": True, "pretrained_cfg_overlay": {"url": "http://127.0.0.1:9/x.pth"}},
    {"pretrained": True, "pretrained_cfg_overlay": {"hf_hub_id": "someone/else"}},
    {"pretrained_cfg_overlay": {"file": "/etc/passwd"}},
    {"pretrained_cfg": {"file": "/etc/passwd"}},
    {"checkpoint_path": "/etc/passwd"},
]


@pytest.mark.parametrize("kwargs", WEIGHT_LOCATIONS, ids=lambda k: "+".join(k))
def test_config_cannot_name_weight_locations(tiny_ckpt, tmp_path, kwargs, monkeypatch):
    fetched = []
    monkeypatch.setattr(timm.models, "load_pretrained", lambda *a, **k: fetched.append(a))
    directory = _with_config(tiny_ckpt, tmp_path, _set("model_kwargs", kwargs))
    with pytest.raises(CheckpointError, match=r"config.json: model_kwargs must be architecture"):
        load_checkpoint(directory)
    assert not fetched


BAD_FIELDS = [
    ("format_version", "abc", r"format_version must be an integer from 1 to 1"),
    ("format_version", 99, r"format 99 is newer"),
    ("temperature", 0, r"temperature must be a number from 0.01 to 100"),
    ("temperature", "hot", r"temperature must be a number"),
    ("temperature", float("inf"), r"temperature must be a number"),
    ("preprocessing", "abc", r"preprocessing must be a mapping"),
    ("preprocessing.in_chans", "abc", r"preprocessing.in_chans must be an integer from 1 to 4"),
    ("preprocessing.std", [0], r"preprocessing.std\[0\] must be a number from 1e-06"),
    ("preprocessing.mean", ["x"], r"preprocessing.mean\[0\] must be a number"),
    ("preprocessing.input_size", [0, 0], r"input_size\[0\] must be an integer from 8 to 2048"),
    ("preprocessing.input_size", [10**6, 10**6], r"input_size\[0\] must be an integer"),
    ("preprocessing.input_size", [32, 32], r"input_size 32x32 does not fit"),
    ("preprocessing.interpolation", "lanczos9", r"interpolation must be one of bilinear"),
    ("class_names", ["A"], r"class_names must be a list of 2 to 1000 distinct names"),
    ("class_names", ["A", "A"], r"class_names must be a list"),
    ("model_kwargs", {"depth": 10**9}, r"model_kwargs.depth must be an integer from 1 to 64"),
    ("model_kwargs", {"depth": "2"}, r"model_kwargs.depth must be an integer"),
    ("model_kwargs", [], r"model_kwargs must be a mapping"),
    ("model_kwargs", {"global_pool": "evil"}, r"model_kwargs.global_pool must be one of"),
    ("training", "abc", r"training must be a mapping"),
    ("architecture", ["x"], r"unknown architecture"),
]


@pytest.mark.parametrize(
    "field, value, message", BAD_FIELDS, ids=[f"{f}={v!r:.20}" for f, v, _ in BAD_FIELDS]
)
def test_malformed_config_fields_give_one_line(tiny_ckpt, tmp_path, field, value, message):
    directory = _with_config(tiny_ckpt, tmp_path, _set(field, value))
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(directory)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"format": "mirage-demo-checkpoint", "temperature": ' + "9" * 5000 + "}", "not valid"),
        ("[" * 100_000 + "]" * 100_000, "not valid"),
        ('"just a string"', "must hold a JSON object"),
        (" " * 1_100_000, "larger than"),
    ],
    ids=["5000-digit number", "deep nesting", "not an object", "huge file"],
)
def test_unparseable_configs_give_one_line(tiny_ckpt, tmp_path, text, message):
    directory = _with_config(tiny_ckpt, tmp_path, lambda config: text)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(directory)


def test_valid_config_still_loads_with_allowed_kwargs(tiny_ckpt):
    model, config = load_checkpoint(tiny_ckpt)
    assert config.model_kwargs == {"img_size": 64, "depth": 1}
    with torch.no_grad():
        assert model(torch.rand(1, 1, 64, 64)).shape == (1, 4)


# --------------------------------------------------------------------------------------------
# Images that declare huge sizes decode reduced, or are refused before decoding


def _png_header_only(width: int, height: int, color_type: int = 6, depth: int = 8) -> bytes:
    """A syntactically valid PNG declaring ``width x height`` with almost no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A ~300-byte JPEG whose frame header declares ``width x height`` (truncated data)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    """An 8000x8000 grayscale PNG (64 megapixels, the limit) of a few hundred KB."""
    from PIL import Image

    path = tmp_path_factory.mktemp("huge") / "huge.png"
    image = Image.new("L", (8000, 8000), 0)
    image.paste(255, (0, 0, 4000, 8000))  # left half bright: orientation stays checkable
    image.save(path, compress_level=1)
    return path


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
        (_png_header_only(8000, 8000), r"8000x8000 RGBA pixels decode to 244 MB \(limit 192 MB\)"),
        (_png_header_only(9000, 9000, color_type=0), "too large"),
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
    path.write_bytes(_jpeg_declaring(7999, 7999))
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
    gray = read_image(path)  # training, evaluation (Preprocessing.load) and the CLI
    assert gray.shape == (40, 20)
    assert gray[:15].mean() > 200 and gray[25:].mean() < 50  # the bright half is now on top
    predictor = Predictor.from_pretrained(tiny_ckpt)  # the app
    assert predictor.predict(path).image_size == (40, 20)
    assert predictor.explain(path).heatmap.shape == (40, 20)
    from PIL import Image

    with Image.open(path) as opened:  # an opened PIL image, too, and only once
        assert read_image(opened).shape == (40, 20)
