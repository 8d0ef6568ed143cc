"""A checkpoint's test scans for the explorer and quiz: bundled copies, originals, or why not."""

import json
import shutil

import pytest
from PIL import Image

from mirage_demo.inference import DEFAULT_CHECKPOINT
from mirage_demo.metrics import load_report
from mirage_demo.testscans import BUNDLED_SCANS, build_bundle, main, scan_set_for
from tests.synthetic_oct import write_labelled_scans

CLASSES = ["CNV", "DME", "NORMAL"]


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint directory whose predictions.csv names scans in ``tmp_path/data``."""
    data = tmp_path / "data"
    paths = write_labelled_scans(data, CLASSES, per_class=2)
    directory = tmp_path / "my-model"
    directory.mkdir()
    config = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())
    config.update(class_names=CLASSES, training={"data": str(data)})
    (directory / "config.json").write_text(json.dumps(config))
    lines = ["file,true,predicted," + ",".join(f"prob_{c}" for c in CLASSES)]
    for n, path in enumerate(paths):
        true, predicted = path.parent.name, CLASSES[n % 3]
        probs = [0.8 if c == predicted else 0.1 for c in CLASSES]
        lines.append(f"{true}/{path.name},{true},{predicted}," + ",".join(map(str, probs)))
    (directory / "predictions.csv").write_text("\n".join(lines) + "\n")
    return directory, data


def test_original_scans_are_used_when_their_folder_is_allowed(checkpoint):
    directory, data = checkpoint
    scans, _ = scan_set_for(directory, bundled=directory / "none")
    assert scans is None  # the data folder its config.json names is never used by itself
    scans, origin = scan_set_for(directory, bundled=directory / "none", roots=[data])
    assert scans is not None and "6 scans of its report" in origin and str(data) not in origin
    assert sum(map(sum, scans.matrix())) == 6
    cell = scans.cell("DME", "CNV")
    assert [e.true for e in cell] == ["DME"] and cell[0].image.is_file()


def test_bundled_copies_replace_unreachable_originals(checkpoint, tmp_path):
    directory, data = checkpoint
    out = tmp_path / "bundle"
    assert main(["--data", str(data), "--out", str(out), "--max-width", "100", str(directory)]) == 0
    manifest = json.loads((out / "my-model.json").read_text())
    assert manifest["license"] == "CC BY 4.0" and len(manifest["scans"]) == 6
    shutil.rmtree(data)
    scans, origin = scan_set_for(directory, bundled=out)
    assert scans is not None and "bundled" in origin
    for entry in scans.entries:
        with Image.open(entry.image) as image:
            assert image.mode == "L" and image.width <= 100
    # a retrained model (new predictions.csv) does not get the old copies
    with open(directory / "predictions.csv", "a") as stream:
        stream.write("CNV/extra.png,CNV,CNV,0.9,0.05,0.05\n")
    scans, reason = scan_set_for(directory, bundled=out)
    assert scans is None and "not reachable" in reason and str(data) not in reason


def test_missing_originals_stop_the_build(checkpoint, tmp_path):
    directory, data = checkpoint
    next(data.rglob("*.png")).unlink()
    with pytest.raises(FileNotFoundError, match="1 test scans"):
        build_bundle([directory], data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_predictions_says_so(tmp_path):
    scans, reason = scan_set_for(tmp_path)
    assert scans is None and "no test scans to explore" in reason


@pytest.mark.parametrize("name", ["demo-model", "demo-vit"])
def test_the_bundled_models_scans_are_bundled_and_current(name):
    """Fails after retraining until ``python -m mirage_demo.testscans`` is re-run."""
    directory = DEFAULT_CHECKPOINT.parent / name
    scans, origin = scan_set_for(directory, bundled=BUNDLED_SCANS)
    assert scans is not None and "bundled" in origin, origin
    assert scans.matrix() == load_report(directory)["confusion_matrix"]
    size = sum(p.stat().st_size for p in BUNDLED_SCANS.rglob("*") if p.is_file())
    assert size <= 10 * 2**20
