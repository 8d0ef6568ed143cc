"""OCT volumes: reading every format (eyepy's test volume; volumes built from real B-scans),
the limits, per-B-scan predictions equal to the 2-D ones, the summary and the command line."""

from __future__ import annotations

import json
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mirage_demo import predict
from mirage_demo.inference import Predictor
from mirage_demo.volume_dicom import write_opt
from mirage_demo.volume_io import load_volume, volume_kind
from mirage_demo.volume_predict import SliceResult, classify_volume, index_ranges, summarize
from mirage_demo.volumes import MAX_SLICES, VolumeError
from tests.volume_fixtures import (
    EYEPY_TEST_VOLUME,
    gray,
    localizer_image,
    real_bscans,
    write_e2e,
    write_vol,
    write_xml_export,
    zip_folder,
)

pytestmark = pytest.mark.usefixtures("one_thread")

#: The real B-scans the volumes are built from: an eye normal at the edges, DME in the middle.
PATTERN = ["NORMAL", "NORMAL", "DME", "DME", "DME", "CNV", "DRUSEN", "NORMAL"]


@pytest.fixture(scope="module")
def bscan_files() -> list[Path]:
    return real_bscans(PATTERN)


@pytest.fixture(scope="module")
def bscans(bscan_files) -> list[np.ndarray]:
    return [gray(path) for path in bscan_files]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory, bscan_files, bscans) -> dict[str, Path]:
    """The same real B-scans in every format the loader reads."""
    folder = tmp_path_factory.mktemp("volumes")
    export = write_xml_export(folder / "xml-export", bscans)
    images = folder / "bscan-images"
    images.mkdir()
    for i, bscan in enumerate(bscans):  # natural order: b2 before b10
        Image.fromarray(bscan).save(images / f"b{i + 1}.png")
    return {
        "vol": write_vol(folder / "eye.vol", bscans),
        "dicom": write_opt(folder / "eye.dcm", bscans, laterality="OD"),
        "dicom-jpeg": write_opt(
            folder / "eye-jpeg.dcm", jpeg_frames=[p.read_bytes() for p in bscan_files]
        ),
        "xml": export,
        "xml-zip": zip_folder(export, folder / "export.zip", prefix="export/"),
        "images-zip": zip_folder(images, folder / "images.zip"),
        "e2e": write_e2e(folder / "eye.e2e", bscans),
    }


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_pretrained()  # the bundled ResNet-18


@pytest.fixture(scope="module")
def expected(predictor, bscan_files):
    """The 2-D predictions of the real B-scan files: one at a time, and in one batch."""
    single = [predictor.predict(str(path)) for path in bscan_files]
    return single, predictor.predict_batch([str(p) for p in bscan_files], batch_size=8)


# --------------------------------------------------------------------------------------------
# Reading


def test_eyepy_test_volume_reads_as_eyepy_reads_it():
    """eyepy's own test .vol: header, localizer, B-scans, positions and eye as eyepy gives."""
    from eyepy.io.he import HeVolReader

    reference = HeVolReader(EYEPY_TEST_VOLUME)
    expected = reference.volume
    with load_volume(EYEPY_TEST_VOLUME) as volume:
        assert volume.source_format == "Heidelberg .vol"
        assert (len(volume), *volume.shape) == expected.data.shape == (10, 40, 50)
        assert volume.laterality == "OD"
        np.testing.assert_array_equal(volume.localizer, expected.localizer.data)
        for mine, theirs in zip(volume.bscans, expected.data, strict=True):
            np.testing.assert_array_equal(mine, theirs)
        header = reference.parsed_file
        assert volume.spacing.x_mm == pytest.approx(header.scale_x)
        assert volume.spacing.z_mm == pytest.approx(header.distance)
        for (start, end), bscan in zip(volume.positions, header.bscans, strict=True):
            assert start == pytest.approx((bscan.start_x / 0.0118, bscan.start_y / 0.0118))
            assert end == pytest.approx((bscan.end_x / 0.0118, bscan.end_y / 0.0118))


@pytest.mark.parametrize(
    "kind", ["vol", "dicom", "dicom-jpeg", "xml", "xml-zip", "images-zip", "e2e"]
)
def test_every_format_gives_back_the_real_bscans(volumes, bscans, kind):
    """Each B-scan read from the volume is exactly the array its picture decodes to (the
    .vol and .e2e intensities go through eyepy's display transforms and come back exact)."""
    with load_volume(volumes[kind]) as volume:
        assert len(volume) == len(bscans)
        assert volume.shape == bscans[0].shape
        for index, bscan in enumerate(bscans):
            got = volume.bscans[index]
            assert got.dtype == np.uint8
            np.testing.assert_array_equal(got, bscan)
        if kind in ("vol", "xml", "xml-zip", "e2e"):
            assert volume.localizer is not None
            assert volume.laterality == ("OS" if kind.startswith("xml") else "OD")
        if kind in ("vol", "xml", "xml-zip"):  # lines in mm, placed on the localizer's pixels
            rows = [start[1] for start, _ in volume.positions]
            assert rows == sorted(rows) and 0 < rows[0] < rows[-1] < volume.localizer.shape[0]


def test_kinds_are_told_from_the_content(volumes, tmp_path):
    renamed = tmp_path / "scan.bin"
    renamed.write_bytes(volumes["dicom"].read_bytes())
    assert volume_kind(renamed) == "dicom"
    assert volume_kind(volumes["vol"]) == "vol"
    assert volume_kind(volumes["e2e"]) == "e2e"
    assert volume_kind(volumes["xml"]) == "xml"
    assert volume_kind(volumes["xml-zip"]) == "zip"
    text = tmp_path / "notes.vol"
    text.write_text("not a volume")
    with pytest.raises(VolumeError, match="not a volume this app reads"):
        load_volume(text)


# --------------------------------------------------------------------------------------------
# Hostile and damaged volumes: refused before decoding, one line naming the limit


def _timed_refusal(path: Path, match: str) -> float:
    began = time.perf_counter()
    with pytest.raises(VolumeError, match=match) as caught:
        load_volume(path)
    assert "\n" not in str(caught.value)
    return time.perf_counter() - began


def test_vol_declaring_too_many_bscans_is_refused_from_its_header(tmp_path, bscans):
    path = write_vol(tmp_path / "many.vol", bscans[:2], n_bscans=100_000)
    _timed_refusal(path, f"100,000 B-scans is too many \\(limit {MAX_SLICES}\\)")


def test_truncated_vol_is_refused_before_any_pixel(tmp_path, bscans):
    path = write_vol(tmp_path / "cut.vol", bscans[:3])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    _timed_refusal(path, "truncated: 3 B-scans of 384x372 are declared")


def test_dicom_declaring_huge_frames_is_refused_from_its_header(tmp_path, bscans):
    path = write_opt(tmp_path / "big.dcm", bscans[:1])
    data = bytearray(path.read_bytes())
    rows = struct.pack("<HHHHH", 0x0028, 0x0010, 0x5355, 2, 372)  # (0028,0010) US 2 372
    at = bytes(data).index(rows[:4])
    data[at + 8 : at + 10] = struct.pack("<H", 60000)  # 60000 rows x 384
    path.write_bytes(bytes(data))
    _timed_refusal(path, "too large \\(limit 4.2 megapixels each\\)")


def test_dicom_with_fewer_pixels_than_declared_is_refused(tmp_path, bscans):
    path = write_opt(tmp_path / "short.dcm", bscans[:3])
    data = path.read_bytes()
    path.write_bytes(data[:-50_000])
    _timed_refusal(path, "truncated: 3 frames of 384x372")


def test_dicom_needing_an_extra_decoder_is_refused(tmp_path, bscans):
    from pydicom import dcmread
    from pydicom.uid import JPEGLSLossless

    path = write_opt(tmp_path / "jls.dcm", bscans[:1])
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = b"\x00" * 10
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    _timed_refusal(path, "needs an extra decoder")


def test_e2e_whose_chunks_loop_is_refused(tmp_path, bscans):
    path = write_e2e(tmp_path / "loop.e2e", bscans[:1])
    data = bytearray(path.read_bytes())
    # the chunk's last folder points back before the chunk: the chain would loop forever
    first_folder = 36 + 52 + 52
    last = first_folder + 44 * 2
    data[last + 4 : last + 12] = struct.pack("<II", 0, 0)  # start 0, size 0
    path.write_bytes(bytes(data))
    assert _timed_refusal(path, "its chunks loop") < 5


def test_xml_export_cannot_name_files_outside_itself(tmp_path, bscans):
    """An XML's file names keep only their last part: a file beside the export is not read."""
    Image.fromarray(bscans[0]).save(tmp_path / "secret.png")
    names = ["B1.png", "..\\secret.png"]
    export = write_xml_export(tmp_path / "export", bscans[:2], names=names)
    with pytest.raises(VolumeError, match="'secret.png' is missing from the export"):
        load_volume(export)
    export = write_xml_export(tmp_path / "export2", bscans[:2], names=["B1.png", "../secret.png"])
    with pytest.raises(VolumeError, match="'secret.png' is missing from the export"):
        load_volume(export)


def test_zip_bomb_member_is_capped(tmp_path, bscans):
    """A B-scan zip whose member inflates past the per-member cap: that B-scan is unreadable
    (with the reason), nothing is inflated beyond the cap."""
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(bscans[0]).save(images / "b1.png")
    path = zip_folder(images, tmp_path / "bomb.zip")
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("b2.png", b"\x00" * (70 * 2**20))
    with load_volume(path) as volume:
        assert len(volume) == 2
        with pytest.raises(Exception, match="more than 64 MB"):
            volume.bscans[1]


# --------------------------------------------------------------------------------------------
# Classification


@pytest.mark.parametrize("kind", ["vol", "dicom-jpeg", "xml-zip"])
def test_each_slice_prediction_equals_the_2d_prediction(predictor, volumes, expected, kind):
    """Every B-scan's record equals the 2-D prediction of the real B-scan file it was built
    from. The inputs are identical arrays (checked above); the probabilities may differ by
    float noise only because the 2-D predictions here run one image at a time while the
    volume runs in batches of 8 (oneDNN sums a convolution in a batch-size-dependent order):
    1e-5. With the same batches they are bit-identical (second check)."""
    single, batched = expected
    with load_volume(volumes[kind]) as volume:
        results = list(classify_volume(predictor, volume))
    assert [r.index for r in results] == list(range(len(PATTERN)))
    for result, reference in zip(results, single, strict=True):
        record = result.record("eye")
        assert record["slice"] == result.index
        assert record["label"] == reference.label
        assert record["warnings"] == reference.warnings
        assert record["prediction_set"] == reference.prediction_set
        for name in predictor.class_names:
            assert record["probabilities"][name] == pytest.approx(
                reference.probabilities[name], abs=1e-5
            )
    for result, reference in zip(results, batched, strict=True):
        assert result.prediction.probabilities == reference.probabilities


def test_memory_is_bounded_by_the_batch(predictor, volumes):
    """The generator decodes one batch of B-scans at a time, never the volume."""
    with load_volume(volumes["dicom"]) as volume:
        read = volume.bscans._read
        decoded: list[int] = []
        volume.bscans._read = lambda i: decoded.append(i) or read(i)
        results = classify_volume(predictor, volume, batch_size=3)
        next(results)
        assert decoded == [0, 1, 2]
        rest = list(results)
        assert decoded == list(range(len(volume))) and len(rest) == len(volume) - 1


def test_summary_names_the_slices_of_each_class(predictor, volumes):
    with load_volume(volumes["dicom-jpeg"]) as volume:
        results = list(classify_volume(predictor, volume))
    summary = summarize(results, predictor.class_names)
    predicted = {
        name: [r.index for r in results if r.prediction.label == name]
        for name in predictor.class_names
    }
    assert summary.per_class_slices == predicted
    assert sum(map(len, summary.per_class_slices.values())) == len(PATTERN)
    for name, (probability, index) in summary.highest.items():
        assert probability == max(r.prediction.probabilities[name] for r in results)
        assert results[index].prediction.probabilities[name] == probability
    assert summary.finding != "NORMAL" or not any(
        summary.per_class_slices[c] for c in predictor.class_names if c != "NORMAL"
    )
    key = results[summary.key_slice].prediction
    assert key.label == summary.finding
    assert f"rests on B-scan {summary.key_slice + 1}" in summary.text()
    record = summary.to_dict()
    assert record["slices"] == len(PATTERN) and record["key_slice"] == summary.key_slice


def _fake(index: int, probabilities: dict[str, float]) -> SliceResult:
    from mirage_demo.inference import Prediction
    from mirage_demo.quality import QualityReport

    label = max(probabilities, key=probabilities.get)
    quality = QualityReport(0.5, 0.0, 0.9, 0.5, 1.2)
    return SliceResult(
        index,
        Prediction(label, 0, probabilities, [], [], quality, (10, 10)),
    )


def test_finding_rests_on_the_strongest_disease_slice_not_on_normal():
    classes = ["CNV", "DME", "NORMAL"]
    results = [
        _fake(0, {"CNV": 0.01, "DME": 0.01, "NORMAL": 0.98}),
        _fake(1, {"CNV": 0.1, "DME": 0.6, "NORMAL": 0.3}),
        _fake(2, {"CNV": 0.05, "DME": 0.9, "NORMAL": 0.05}),
        _fake(3, {"CNV": 0.01, "DME": 0.01, "NORMAL": 0.98}),
    ]
    summary = summarize(results, classes)
    assert summary.per_class_slices == {"CNV": [], "DME": [1, 2], "NORMAL": [0, 3]}
    assert (summary.finding, summary.key_slice) == ("DME", 2)
    assert summary.text().startswith("DME in B-scans 2-3 of 4 (highest 0.90, B-scan 3)")
    normal = summarize([results[0], results[3]], classes)
    assert (normal.finding, normal.key_slice) == ("NORMAL", 0)


def test_index_ranges():
    assert index_ranges([17, 18, 19, 25]) == "18-20, 26"
    assert index_ranges([0], first=0) == "0"


# --------------------------------------------------------------------------------------------
# Command line


def test_cli_json_one_record_per_bscan_then_the_summary(volumes, capsys):
    code = predict.main(["--json", str(volumes["dicom-jpeg"])])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    slices, summary = lines[:-1], lines[-1]
    assert [line["slice"] for line in slices] == list(range(len(PATTERN)))
    for line in slices:
        assert line["file"] == str(volumes["dicom-jpeg"])
        assert {"label", "probabilities", "prediction_set", "warnings"} <= set(line)
    per_class = summary["volume_summary"]["per_class_slices"]
    assert summary["volume_summary"]["slices"] == len(PATTERN)
    for name, indices in per_class.items():
        assert indices == [line["slice"] for line in slices if line["label"] == name]


def test_cli_text_names_are_safe(volumes, tmp_path, capsys):
    forged = tmp_path / "eye\tCNV\t1.000\n.dcm"
    forged.write_bytes(volumes["dicom"].read_bytes())
    assert predict.main([str(forged)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(PATTERN) + 1
    assert all(line.count("\t") in (2, 5) for line in lines)  # a summary; a B-scan's answer
    assert "eye\\tCNV\\t1.000\\n.dcm [B-scan 1]" in lines[0]
    assert lines[-1].split("\t")[1] == "SUMMARY"


def test_cli_unreadable_volume_is_one_error_line(tmp_path, capsys):
    broken = tmp_path / "broken.vol"
    broken.write_bytes(b"HSF-OCT-103 " + b"\x00" * 100)
    code = predict.main(["--json", str(broken)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1
    assert lines == [{"file": str(broken), "error": lines[0]["error"]}]
    assert "not a Heidelberg .vol file" in lines[0]["error"]


def test_localizer_fixture_is_small():
    assert localizer_image().shape == (96, 96)
