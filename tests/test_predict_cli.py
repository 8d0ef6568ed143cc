import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mirage_demo import predict
from tests.synthetic_oct import CLASSES, lesion_scan, train_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "ckpt", steps=40)


@pytest.fixture
def scans(tmp_path):
    """A folder of scans in class subfolders, plus a corrupt file and a text file."""
    folder = tmp_path / "scans"
    for label, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(lesion_scan(label, 40 + i)[0]).save(folder / name / f"{name}-{i}.png")
    (folder / "NORMAL" / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "notes.txt").write_text("not an image")
    return folder


def run_cli(args, capsys):
    code = predict.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err


def test_json_lines_for_good_files_and_exit_zero(checkpoint, scans, capsys):
    files = sorted(scans.glob("*/*.png"))
    code, lines, _ = run_cli(["--checkpoint", checkpoint, "--json", *files], capsys)
    assert code == 0
    assert [line["file"] for line in lines] == [str(f) for f in files]
    for line in lines:
        assert set(line) == {
            "file",
            "label",
            "probabilities",
            "trust",
            "prediction_set",
            "level",
            "out_of_distribution",
            "ood_score",
            "sure_probability",
            "warnings",
        }
        assert line["prediction_set"] is None  # this checkpoint has no uncertainty statistics
        assert line["trust"] is None  # a B-scan, and no statistics: never "sure"
        assert line["label"] in CLASSES
        assert set(line["probabilities"]) == set(CLASSES)
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert line["warnings"] == []


def test_bad_files_give_error_lines_and_the_run_goes_on(checkpoint, scans, tmp_path, capsys):
    good = scans / "LESION" / "LESION-0.png"
    args = [
        "--checkpoint",
        checkpoint,
        "--json",
        scans / "NORMAL" / "corrupt.jpeg",
        tmp_path / "missing.png",
        scans / "notes.txt",
        good,
    ]
    code, lines, err = run_cli(args, capsys)
    assert code == 1
    assert len(lines) == 4
    assert "corrupt" in lines[0]["error"] and lines[0]["file"].endswith("corrupt.jpeg")
    assert "not found" in lines[1]["error"]
    assert "not a readable image" in lines[2]["error"]
    assert "error" not in lines[3] and lines[3]["label"] in CLASSES
    assert "3 of 4 inputs failed" in err


def test_folder_gives_a_csv_too(checkpoint, scans, tmp_path, capsys):
    out = tmp_path / "out"
    code, lines, err = run_cli(
        ["--checkpoint", checkpoint, "--json", "--out", out, "--batch-size", 3, scans], capsys
    )
    assert code == 1  # the corrupt file
    assert len(lines) == 5  # 4 scans + corrupt.jpeg; notes.txt is not an image
    with (out / "scans-predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["file"] for r in rows] == [line["file"] for line in lines]
    assert list(rows[0]) == [
        "file",
        "predicted",
        "prob_NORMAL",
        "prob_LESION",
        "trust",
        "prediction_set",
        "out_of_distribution",
        "ood_score",
        "warnings",
        "error",
    ]
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["file"].endswith("corrupt.jpeg")
    assert "scans-predictions.csv" in err


def test_explain_writes_overlays(checkpoint, scans, tmp_path, capsys):
    out = tmp_path / "overlays"
    files = sorted(scans.glob("*/*.png"))[:2]
    code, lines, _ = run_cli(
        ["--checkpoint", checkpoint, "--json", "--explain", "rollout", "--out", out, *files],
        capsys,
    )
    assert code == 0 and len(lines) == 2
    written = sorted(out.glob("*.png"))
    assert [p.name for p in written] == sorted(f"{f.stem}.rollout.png" for f in files)
    with Image.open(written[0]) as overlay:
        assert overlay.size == (144, 96) and overlay.mode == "RGB"


def test_plain_text_output(checkpoint, scans, capsys):
    code = predict.main(["--checkpoint", str(checkpoint), str(scans / "LESION" / "LESION-1.png")])
    out = capsys.readouterr().out
    assert code == 0
    file, label, probability, shown, verdict, _ = out.rstrip("\n").split("\t")
    assert file.endswith("LESION-1.png") and label in CLASSES and 0.5 <= float(probability) <= 1
    assert shown == "-"  # no prediction set: this checkpoint has no uncertainty statistics
    assert verdict == "not available"


def test_unusable_checkpoint_or_arguments_exit_two(tmp_path, checkpoint, capsys):
    code = predict.main(["--checkpoint", str(tmp_path / "nowhere"), "x.png"])
    assert code == 2 and "no checkpoint directory" in capsys.readouterr().err
    code = predict.main(["--checkpoint", str(checkpoint), "--target", "CNV", "x.png"])
    assert code == 2 and "unknown class" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint", str(checkpoint), "--explain", "gradcam", "x.png"])
    assert exit_info.value.code == 2


@pytest.mark.slow  # a fresh Python process
def test_module_entry_point(checkpoint, scans):
    """``python -m mirage_demo.predict`` end to end, in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    files = [scans / "NORMAL" / "NORMAL-0.png", scans / "NORMAL" / "corrupt.jpeg"]
    command = [sys.executable, "-m", "mirage_demo.predict", "--checkpoint", str(checkpoint)]
    done = subprocess.run(
        [*command, "--json", *map(str, files)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[0]["label"] in CLASSES and "error" in lines[1]
