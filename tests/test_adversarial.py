"""Hostile and careless input, as a public Space gets it (issue 12).

Every hostile file is built here, small: images that declare huge sizes in a few hundred bytes,
zip bombs made with ``zipfile``, checkpoints whose config.json asks for downloads. Each test is
bounded in time; none reads data outside the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


def _png_bytes(size=(48, 32), value=90) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, "PNG")
    return buffer.getvalue()


def _animated(fmt: str) -> bytes:
    import io

    from PIL import Image

    frames = [Image.new("L", (32, 24), v) for v in (200, 10, 10)]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def _zip(path: Path, members: dict[str, bytes], method=None) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", method or zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _patch_entry(path: Path, name: str, **fields: int) -> None:
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


def _load_all(path: Path, label: str = "scans.zip", budget=None):
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


def test_zip_declaring_small_sizes_is_read_with_a_real_cap(tmp_path):
    import tracemalloc

    bomb = b"\x00" * (48 * 2**20)  # 48 MB of zeros: ~50 KB deflated
    path = _zip(tmp_path / "bomb.zip", {"good.png": _png_bytes(), "bomb.png": bomb})
    del bomb
    _patch_entry(path, "bomb.png", size=1024)  # the headers claim 1 KB
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    try:
        result = _load_all(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result["scans.zip/good.png"] == _png_bytes()
    assert result["scans.zip/bomb.png"].startswith("scans.zip/bomb.png: corrupt in the zip (")
    assert peak < 8 * 2**20  # inflated in 1 MB steps, and only up to the declared size


def test_zip_entries_are_counted_before_any_is_read(tmp_path):
    from mirage_demo.uploads import MAX_ZIP_ENTRIES

    many = {f"f{i}.png": b"" for i in range(MAX_ZIP_ENTRIES + 1)}
    path = _zip(tmp_path / "many.zip", many, method=0)
    result = _load_all(path, "many.zip")
    assert result == {"many.zip": "many.zip: the archive holds 2,001 entries (limit 2,000)"}


def test_bad_entries_are_listed_and_the_good_ones_classified(tmp_path):
    import zipfile

    members = {
        "a/good.png": _png_bytes(),
        "corrupt.png": _png_bytes((64, 64), 7) * 3,
        "secret.png": _png_bytes(),
        "odd.png": _png_bytes(),
        "inner.zip": b"PK\x05\x06" + b"\x00" * 18,
        "notes.txt": b"hello",
        "anim.gif": _animated("GIF"),
        "anim.webp": _animated("WEBP"),
        "__MACOSX/._good.png": b"junk",
        "empty-folder/": b"",
    }
    path = _zip(tmp_path / "mixed.zip", members)
    _patch_entry(path, "secret.png", flags=1)  # encrypted
    _patch_entry(path, "odd.png", method=99)  # an unknown compression method
    data = bytearray(path.read_bytes())  # corrupt corrupt.png's deflate stream
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("corrupt.png")
    start = info.header_offset + 30 + len(b"corrupt.png") + 10
    data[start : start + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))

    result = _load_all(path, "mixed.zip")
    listed = {f"mixed.zip/{n}" for n in members if not n.startswith(("__", "empty", "notes"))}
    assert set(result) == listed  # notes.txt is not an image: not a row
    assert result["mixed.zip/a/good.png"] == _png_bytes()
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
    good.write_bytes(_png_bytes())
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

    header = _png_header_only(8000, 8000, color_type=0)  # 64 megapixels declared, tiny file
    path = _zip(tmp_path / "big.zip", {f"{i:02d}.png": header for i in range(16)})
    result = _load_all(path, "big.zip")
    fits = MAX_REQUEST_PIXELS // 64_000_000
    refused = [n for n, v in result.items() if isinstance(v, str) and "megapixels in all" in v]
    assert len(refused) == 16 - fits and sorted(refused) == sorted(result)[fits:]

    small = _zip(tmp_path / "small.zip", {"a.png": _png_bytes(), "b.png": _png_bytes()})
    result = _load_all(small, "small.zip", RequestBudget(bytes_left=len(_png_bytes()) + 10))
    assert result["small.zip/a.png"] == _png_bytes()
    assert "limit" in result["small.zip/b.png"] and "MB unpacked" in result["small.zip/b.png"]


# --------------------------------------------------------------------------------------------
# Training runs never get stuck: every interruption is resumable or restartable


def _train_args(tmp_path: Path, out: Path, *extra) -> list[str]:
    from tests.test_train import FAST, TINY, make_bands

    data = tmp_path / "data"
    if not data.exists():
        make_bands(data, counts=(4, 2, 2), size=(40, 32))
    return [
        "--data", data, "--out", out, "--cache-dir", tmp_path / "cache", "--epochs", 1,
        "--batch-size", 8, "--warmup-epochs", 0, "--no-tensorboard", *TINY, *FAST, *extra,
    ]  # fmt: skip


def _main(capsys, args) -> tuple[int, str]:
    from train.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_run_killed_during_its_first_save_restarts(tmp_path, capsys, monkeypatch):
    import train.loop

    out = tmp_path / "out"

    def killed(directory, state):  # SIGKILL between the model and the state: what it leaves
        (Path(directory) / ".train_state.pt.k1ll3d.tmp").write_bytes(b"")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train.loop, "save_state", killed)
        code, err = _main(capsys, _train_args(tmp_path, out))
    assert code == 130 and (out / "model.safetensors").exists()
    assert not (out / "train_state.pt").exists()

    code, err = _main(capsys, ["--out", out, "--resume"])
    assert code == 2
    assert "start it again with the same command without --resume" in err
    code, err = _main(capsys, _train_args(tmp_path, out))  # that command works
    assert code == 0, err
    assert (out / "train_state.pt").exists() and (out / "metrics.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    code, err = _main(capsys, _train_args(tmp_path, out))  # a finished run is never overwritten
    assert code == 2 and "already holds a training run" in err


@pytest.mark.parametrize("option", ["--out", "--cache-dir"])
def test_unwritable_folders_stop_before_any_work(tmp_path, capsys, monkeypatch, option):
    import train.setup

    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    monkeypatch.setattr(train.setup, "_load_data", lambda config: pytest.fail("data loaded"))
    args = _train_args(tmp_path, tmp_path / "out")
    args[args.index(option) + 1] = blocker / "sub"
    code, err = _main(capsys, args)
    assert code == 2
    assert err.startswith(f"error: {option} {blocker / 'sub'} is not writable (")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_full_disk_is_one_line_that_says_what_to_do(tmp_path, capsys, monkeypatch):
    import errno
    import shutil

    import train.loop

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    code, err = _main(capsys, _train_args(tmp_path, tmp_path / "early"))
    assert code == 2 and "not enough disk space in" in err and "MB free" in err
    monkeypatch.undo()

    def full(directory, state):  # the disk fills up while the state is written
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(train.loop, "save_state", full)
    code, err = _main(capsys, _train_args(tmp_path, tmp_path / "late"))
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: cannot write ") and "the disk is full" in err
    assert "run the same command again" in err


# --------------------------------------------------------------------------------------------
# The app: bounded per request, fair between clients, nothing runs as HTML or as a formula


@pytest.fixture(scope="module")
def app_server(tiny_ckpt):
    """The app on the tiny checkpoint, queued as ``python app.py`` queues it (one model
    call at a time, at most 2 waiting per session); yields (url, registry, demo)."""
    from mirage_demo.ui import ModelChoice, ModelRegistry, build_app, setup_queue
    from tests.test_app import serve

    registry = ModelRegistry([ModelChoice("tiny", str(tiny_ckpt))])
    demo = build_app(registry, max_batch=4)
    setup_queue(demo, concurrency=1, per_session=2)
    url = serve(demo)
    try:
        yield url, registry, demo
    finally:
        demo.close()


def test_model_events_share_two_lanes_and_uploads_expire(app_server):
    from mirage_demo.ui import LAUNCH_OPTIONS

    _, _, demo = app_server
    fns = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name}
    assert {"predict", "explain", "compare", "batch", "evaluate"} <= set(fns)
    assert {fns[name].concurrency_id for name in ("predict", "explain", "compare")} == {"model"}
    long_jobs = {
        (fns[name].concurrency_id, fns[name].concurrency_limit) for name in ("batch", "evaluate")
    }
    assert long_jobs == {("long-jobs", 1)}
    assert demo.delete_cache is not None and demo.delete_cache[1] <= 3600
    assert LAUNCH_OPTIONS["max_file_size"] == "50mb"
    states = [b for b in demo.blocks.values() if type(b).__name__ == "State"]
    assert states and all(s.time_to_live <= 600 for s in states)


def test_explain_state_is_small_whatever_the_upload(app_server, huge_png):
    from mirage_demo.ui import explain_scan

    _, registry, _ = app_server
    overlay, _, _, state = explain_scan(registry, str(huge_png), "tiny", "gradcam")
    assert max(overlay.size) <= 1024
    for key in ("scan", "heatmap"):
        assert state[key].dtype == np.uint8 and max(state[key].shape) <= 1024
    assert sum(state[k].nbytes for k in ("scan", "heatmap")) <= 2 * 2**20


def test_one_session_cannot_fill_the_queue(app_server, monkeypatch):
    import time

    from gradio_client import Client, handle_file

    url, registry, _ = app_server
    predictor = registry.get("tiny")
    real = predictor.predict_batch

    def slow(*args, **kwargs):
        time.sleep(0.4)
        return real(*args, **kwargs)

    monkeypatch.setattr(predictor, "predict_batch", slow)
    scan = handle_file(str(EXAMPLE))
    flooder = Client(url, verbose=False)
    jobs = [flooder.submit(scan, api_name="/predict") for _ in range(8)]
    other = Client(url, verbose=False).submit(scan, api_name="/predict")
    outcomes = []
    for job in jobs:
        try:
            job.result(timeout=60)
            outcomes.append("ok")
        except Exception as err:
            outcomes.append(str(err))
    refused = [o for o in outcomes if o != "ok"]
    assert 1 <= outcomes.count("ok") <= 5 and refused
    # refused at once with HTTP 503 (gradio_client words it "Queue is full"), though the
    # queue (64) is far from full: the per-session limit
    assert all("Queue is full" in o for o in refused), refused
    label, _ = other.result(timeout=60)  # the other client is served meanwhile
    assert len(label["confidences"]) == 4


def test_the_session_limit_counts_model_work_only():
    """A page fires a dozen load events of its own (reading a checkpoint's metadata): they are
    never refused by the per-session limit, which holds back model work only."""
    import threading
    import time

    import gradio as gr
    from gradio_client import Client

    from mirage_demo.ui import setup_queue
    from mirage_demo.ui.context import MODEL_CONCURRENCY_ID
    from tests.test_app import serve

    gate = threading.Event()

    def slow(x: str) -> str:
        gate.wait(10)
        return x

    with gr.Blocks() as demo:
        box = gr.Textbox()
        gr.Button().click(slow, box, box, api_name="metadata", concurrency_limit=1)
        gr.Button().click(slow, box, box, api_name="model", concurrency_id=MODEL_CONCURRENCY_ID)
    setup_queue(demo, concurrency=1, per_session=2)
    url = serve(demo)
    try:
        client = Client(url, verbose=False)
        reads = [client.submit("a", api_name="/metadata") for _ in range(6)]
        work = [client.submit("b", api_name="/model") for _ in range(6)]
        time.sleep(1.0)
        gate.set()
        assert [job.result(timeout=30) for job in reads] == ["a"] * 6
        outcomes = []
        for job in work:
            try:
                outcomes.append(job.result(timeout=30))
            except Exception as err:
                outcomes.append(str(err))
        assert "b" in outcomes and any("Queue is full" in o for o in outcomes), outcomes
    finally:
        gate.set()
        demo.close()


EXAMPLE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "CNV" / "CNV-451136-1.jpeg"


def test_names_are_escaped_and_csv_cells_neutralised(app_server, tmp_path):
    import csv

    from gradio_client import Client, handle_file

    url, _, _ = app_server
    client = Client(url, verbose=False)
    import gradio as gr

    from mirage_demo.ui import explain_scan
    from mirage_demo.ui.classify import predict_scans

    # the payload a raw API call sends (gradio_client would strip the brackets itself)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    payload = {"path": str(bad), "orig_name": "<img src=x onerror=alert(1)>.png"}
    with pytest.raises(gr.Error) as info:  # the error toast
        explain_scan(app_server[1], payload, "tiny")
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in info.value.message
    assert "<img" not in info.value.message
    _, texts = predict_scans(app_server[1], [payload], ["tiny"])  # batched /predict: a text
    assert "&lt;img src=x" in texts[0] and "<img" not in texts[0]

    formula = tmp_path / "=1+2.png"
    formula.write_bytes(EXAMPLE.read_bytes())
    table, csv_file, _ = client.predict([handle_file(str(formula))], api_name="/batch")
    with open(csv_file, newline="") as stream:
        rows = list(csv.reader(stream))
    assert rows[1][0] == "'=1+2.png" and rows[1][1] in CLASSES
    assert table["headers"] == [
        "file",
        "prediction",
        *(f"p({c})" for c in CLASSES),
        "90% set",
        "unlike training scans",
        "warnings / errors",
    ]


def test_batch_lists_bad_entries_and_takes_animated_images(app_server, tmp_path):

    from gradio_client import Client, handle_file

    url, _, _ = app_server
    gif, webp = tmp_path / "anim.gif", tmp_path / "anim.webp"
    gif.write_bytes(_animated("GIF"))
    webp.write_bytes(_animated("WEBP"))
    archive = _zip(
        tmp_path / "scans.zip",
        {"a.gif": _animated("GIF"), "b.webp": _animated("WEBP"), "inner.zip": b"PK"},
    )
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(archive.read_bytes()[:-30])  # no end record
    secret = _zip(tmp_path / "secret.zip", {"s.png": _png_bytes()})
    _patch_entry(secret, "s.png", flags=1)
    client = Client(url, verbose=False)
    table, _, summary = client.predict(
        [handle_file(str(p)) for p in (gif, webp, archive, corrupt, secret)], api_name="/batch"
    )
    rows = {row[0]: row for row in table["data"]}
    for name in ("anim.gif", "anim.webp", "scans.zip/a.gif", "scans.zip/b.webp"):
        assert rows[name][1] in CLASSES, rows[name]
    assert "zip inside a zip" in rows["scans.zip/inner.zip"][-1]
    assert "not a readable zip archive" in rows["corrupt.zip"][-1]
    assert "encrypted" in rows["secret.zip/s.png"][-1]
    assert not [r for r in table["data"] if "object at 0x" in str(r) or "<_io" in str(r)]
    assert "4 classified" in summary and "3 unreadable" in summary


def test_a_model_that_cannot_load_is_not_retried(tiny_ckpt, tmp_path, monkeypatch):
    import gradio as gr

    from mirage_demo.inference import Predictor
    from mirage_demo.ui import ModelChoice, ModelRegistry

    broken = _with_config(tiny_ckpt, tmp_path, _set("preprocessing.input_size", [0, 0]))
    registry = ModelRegistry([ModelChoice("good", str(tiny_ckpt)), ModelChoice("bad", str(broken))])
    calls = []
    real = Predictor.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Predictor, "from_pretrained", classmethod(counting))
    for _ in range(3):
        with pytest.raises(gr.Error, match=r"input_size\[0\] must be an integer from 8"):
            registry.get("bad")
    assert len(calls) <= 1
    assert registry.get("good").class_names == CLASSES


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


def test_one_zip_listed_many_times_is_opened_once(app_server, tmp_path, monkeypatch):
    import gradio as gr

    from mirage_demo.ui import classify_batch
    from mirage_demo.uploads import ZipUpload
    from tests.hostile_files import many_entries_zip

    opened, real = [], ZipUpload.open.__func__

    def counting(cls, *args, **kwargs):
        opened.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(ZipUpload, "open", classmethod(counting))
    many = {"path": str(many_entries_zip(tmp_path / "many.zip")), "orig_name": "many.zip"}
    with pytest.raises(gr.Error, match=r"files is too many for one batch \(limit 500\)"):
        classify_batch(app_server[1], [many] * 200, "tiny")
    assert len(opened) == 1  # 2,000 entries: the request's budget of entries

    from mirage_demo.uploads import MAX_REQUEST_ZIPS

    opened.clear()
    small = _zip(tmp_path / "small.zip", {"a.png": _png_bytes(), "b.png": _png_bytes()})
    payload = {"path": str(small), "orig_name": "small.zip"}
    table, _, summary = classify_batch(app_server[1], [payload] * 40, "tiny")
    assert len(opened) == MAX_REQUEST_ZIPS
    assert f"{2 * MAX_REQUEST_ZIPS} classified" in summary
    refused = [row for row in table if "limit of 32 zips" in row[-1]]
    assert len(refused) == 40 - MAX_REQUEST_ZIPS


def test_a_long_job_does_not_hold_up_one_scan(app_server, monkeypatch):
    """/batch and /evaluate have their own lane: a /predict sent while one runs is answered
    before it ends (the app serves one model call at a time here)."""
    import threading

    from gradio_client import Client, handle_file

    import mirage_demo.ui.batch as batch

    started, gate = threading.Event(), threading.Event()
    real = batch.expand_uploads

    def held(*args, **kwargs):  # a long job: it runs until the test lets it go
        started.set()
        gate.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "expand_uploads", held)
    url = app_server[0]
    scan = handle_file(str(EXAMPLE))
    try:
        job = Client(url, verbose=False).submit([scan], api_name="/batch")
        assert started.wait(30)
        label, _ = Client(url, verbose=False).submit(scan, api_name="/predict").result(timeout=60)
        assert len(label["confidences"]) == 4 and not job.done()
    finally:
        gate.set()
    _, _, summary = job.result(timeout=60)
    assert "1 classified" in summary


def _labelled_zip(path: Path, names: list[str]) -> dict:
    scan = EXAMPLE.read_bytes()
    members = {name: (b"junk" if "junk" in name else scan) for name in names}
    return {"path": str(_zip(path, members)), "orig_name": path.name}


def test_names_are_escaped_in_evaluate_explorer_and_compare(app_server, tmp_path):
    import shutil

    import gradio as gr

    from mirage_demo.ui.compare import compare_scan
    from mirage_demo.ui.evaluate import evaluate_scans
    from mirage_demo.ui.explore import explorer_cell, explorer_open

    predictor = app_server[1].get("tiny")
    bad = "<img src=x onerror=alert(1)>"
    upload = _labelled_zip(
        tmp_path / "scans.zip", [f"CNV/{bad}.jpeg", "DME/b.jpeg", f"DME/{bad}junk.png"]
    )
    result = evaluate_scans(predictor, [upload])
    try:
        assert "&lt;img src=x" in result["note"] and "<img" not in result["note"]
        state = result["state"]
        entry = next(e for e in state.scans.entries if bad in e.file)
        row, column = CLASSES.index(entry.true), CLASSES.index(entry.predicted) + 1
        explorer_cell(state, row, column)
        _, caption = explorer_open(predictor, state, state.shown.index(entry))
        assert "&lt;img src=x" in caption and "<img" not in caption
    finally:
        shutil.rmtree(result["folder"], ignore_errors=True)

    unknown = _labelled_zip(tmp_path / "unknown.zip", [f"{bad}/a.jpeg"])
    with pytest.raises(gr.Error) as info:
        evaluate_scans(predictor, [unknown])
    assert "&lt;img src=x" in info.value.message and "<img" not in info.value.message

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(gr.Error) as info:
        compare_scan(predictor, str(junk), f"{bad}.png")
    assert "&lt;img src=x" in info.value.message and "<img" not in info.value.message


def test_evaluate_takes_long_names_and_leaves_nothing_when_it_fails(
    app_server, tmp_path, monkeypatch
):
    import shutil

    import mirage_demo.ui.evaluate as evaluate

    predictor = app_server[1].get("tiny")
    long_name = "CNV/" + "a" * 300 + ".jpeg"  # 305 bytes: over the file system's 255
    result = evaluate.evaluate_scans(
        predictor, [_labelled_zip(tmp_path / "long.zip", [long_name, "DME/b.jpeg"])]
    )
    try:
        assert result["metrics"]["num_images"] == 2
        files = [p for p in (result["folder"] / "scans").rglob("*") if p.is_file()]
        assert len(files) == 2 and max(len(p.name.encode()) for p in files) <= 125
    finally:
        shutil.rmtree(result["folder"], ignore_errors=True)

    folders = []

    def failing(model, config, uploads, out, **kwargs):
        folders.append(Path(out))
        (Path(out) / "scans").mkdir()
        raise RuntimeError("disk trouble")

    monkeypatch.setattr(evaluate, "evaluate_upload", failing)
    with pytest.raises(RuntimeError):
        evaluate.evaluate_scans(predictor, [_labelled_zip(tmp_path / "b.zip", ["DME/b.jpeg"])])
    assert folders and not folders[0].exists()


def test_kept_evaluations_are_bounded_on_disk(tmp_path, monkeypatch):
    import os
    import time

    import mirage_demo.ui.evaluate as evaluate

    monkeypatch.setattr(evaluate, "EVALUATIONS_MAX_BYTES", 250)
    now = time.time()
    for age, size in ((4000, 10), (300, 100), (200, 100), (100, 100)):
        folder = tmp_path / f"oct-eval-{age}"
        folder.mkdir()
        (folder / evaluate.SIZE_FILE).write_text(str(size))
        os.utime(folder, (now - age, now - age))
    evaluate._make_room(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oct-eval-100", "oct-eval-200"]


def test_quiz_scans_do_not_give_their_class_away():
    from mirage_demo.ui.quiz import quiz_next, quiz_start
    from mirage_demo.ui.registry import ASSETS

    quiz, image, _ = quiz_start(ASSETS / "demo-model", CLASSES, 4, seed=0)
    shown = [image]
    while True:
        quiz.answer(CLASSES[0])
        image, _ = quiz_next(quiz)
        if image is None:
            break
        shown.append(image)
    originals = {Path(item.image).name for item in quiz.round}
    assert len(shown) == 4 and not originals & {Path(p).name for p in shown}
    assert not [p for p in shown if any(c.lower() in Path(p).name.lower() for c in CLASSES)]
