"""Evaluating uploaded labelled scans: the same report as ``python -m train.evaluate``."""

import csv
import json
import zipfile

import pytest
import torch

from mirage_demo.checkpoint import load_checkpoint
from mirage_demo.data import DataError
from mirage_demo.evaluation import evaluate_upload, labelled_upload
from mirage_demo.uploads import RequestBudget
from tests.synthetic_oct import tiny_cnn_checkpoint, write_labelled_scans
from train import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["CNV", "DME", "NORMAL"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for offset, (split, count) in enumerate((("train", 2), ("val", 2), ("test", 4))):
        write_labelled_scans(root / split, CLASSES, count, start=1000 * offset)
    checkpoint = tiny_cnn_checkpoint(root.parent / "ckpt", CLASSES, data=root)
    return root, checkpoint


def _zip(path, folder, prefix=""):
    with zipfile.ZipFile(path, "w") as archive:
        for image in sorted(folder.rglob("*.png")):
            archive.write(image, prefix + image.relative_to(folder).as_posix())
    return path


def _probabilities(path):
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    return {row["file"].rsplit("/", 1)[-1]: row for row in rows}


def test_fitting_with_mirrored_pairs_is_refused(dataset, tmp_path, capsys):
    """The statistics are fitted on single forward passes, as the app predicts: fitting them
    during a --tta evaluation would store single-pass statistics beside mirrored answers."""
    root, checkpoint = dataset
    before = (checkpoint / "config.json").read_bytes()
    args = ["--checkpoint", str(checkpoint), "--data", str(root), "--out", str(tmp_path)]
    assert evaluate.main([*args, "--tta", "--fit-uncertainty"]) == 2
    assert "fit without --tta" in capsys.readouterr().err
    assert (checkpoint / "config.json").read_bytes() == before


def test_upload_reproduces_train_evaluate_exactly(dataset, tmp_path):
    root, checkpoint = dataset
    cli_out = tmp_path / "cli"
    args = ["--checkpoint", str(checkpoint), "--data", str(root), "--split", "test"]
    assert evaluate.main([*args, "--out", str(cli_out), "--bootstrap", "50"]) == 0
    model, config = load_checkpoint(checkpoint)
    archive = _zip(tmp_path / "scans.zip", root / "test", prefix="my scans/")
    seen = []
    metrics, upload = evaluate_upload(
        model,
        config,
        [("scans.zip", archive)],
        tmp_path / "app",
        device=torch.device("cpu"),
        n_bootstrap=50,
        on_batch=lambda done, total: seen.append((done, total)),
    )
    expected = json.loads((cli_out / "metrics.json").read_text())
    for key in ("overall", "per_class", "confusion_matrix", "images_per_class", "num_images"):
        assert metrics[key] == expected[key], key
    assert metrics["split"] == "uploaded" and len(upload.samples) == 12
    app_rows, cli_rows = (
        _probabilities(tmp_path / "app" / "predictions.csv"),
        _probabilities(cli_out / "predictions.csv"),
    )
    assert app_rows.keys() == cli_rows.keys()
    for name, row in app_rows.items():
        assert {k: v for k, v in row.items() if k != "file"} == {
            k: v for k, v in cli_rows[name].items() if k != "file"
        }
    assert seen[-1][0] == seen[-1][1] >= 1  # progress reached the end
    for figure in ("confusion_matrix.png", "roc_curves.png", "reliability.png"):
        assert (tmp_path / "app" / figure).is_file()


def test_loose_files_take_their_class_from_the_folder_or_a_kermany_name(dataset, tmp_path):
    root, _ = dataset
    files = sorted((root / "test").rglob("*.png"))[::4]
    uploads = [(f"{p.parent.name}/{p.name}", p) for p in files]
    uploads += [(p.name, p) for p in files]  # CNV-2000-1.png: the class is in the name
    upload = labelled_upload(uploads, CLASSES, tmp_path / "u")
    assert [CLASSES[s.label] for s in upload.samples] == [p.parent.name for p in files] * 2


def test_unknown_classes_are_an_error_that_names_them(dataset, tmp_path):
    root, _ = dataset
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        image = next((root / "test" / "CNV").glob("*.png"))
        for folder in ("CNV", "GLAUCOMA", "drusen"):
            zf.write(image, f"{folder}/{image.name}")
        zf.writestr("README.txt", "notes")
    with pytest.raises(DataError, match="GLAUCOMA, drusen"):
        labelled_upload([("bad.zip", archive)], CLASSES, tmp_path / "u")


@pytest.mark.parametrize(
    ("content", "limits", "message"),
    [
        ({"scan.png": b"x"}, {}, "without a class folder"),
        (
            {"CNV/a.png": b"x" * 5000},
            {"budget": RequestBudget(bytes_left=1000)},
            "no labelled images found .left out: up.zip/CNV/a.png: skipped: this batch reached",
        ),
        ({f"CNV/{i}.png": b"x" for i in range(5)}, {"max_files": 3}, "more than 3 images"),
        ({"notes.txt": b"x"}, {}, "no labelled images"),
        ({"CNV/inner.zip": b"PK"}, {}, "inner.zip: skipped: a zip inside a zip"),
    ],
)
def test_bad_uploads_get_one_line_errors(tmp_path, content, limits, message):
    archive = tmp_path / "up.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in content.items():
            zf.writestr(name, data)
    with pytest.raises(DataError, match=message):
        labelled_upload([("up.zip", archive)], CLASSES, tmp_path / "u", **limits)


def test_a_corrupt_zip_is_named(tmp_path):
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="broken.zip: not a readable zip"):
        labelled_upload([("broken.zip", broken)], CLASSES, tmp_path / "u")
