"""End to end: ``python -m train`` and ``python -m train.evaluate`` with a tiny MIRAGE on CPU: a
finished run and its report (resume, bad input and the loop's parts: test_train_loop.py)."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import train.setup
from mirage_demo.checkpoint import UNCERTAINTY_NAME, load_checkpoint, save_checkpoint
from mirage_demo.inference import Predictor
from mirage_demo.metrics import REPORT_FILES
from train import evaluate
from train.cli import main
from train.config import parse_config

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["BOTTOM", "MIDDLE", "TOP"]
THREADS = "1"  # one thread: fast on a busy machine, and what the killed subprocess uses too
TINY = ["--model", "mirage_tiny_patch32_512", "--model-kwargs", "{depth: 2}", "--img-size", "64"]
FAST = ["--workers", "0", "--bootstrap", "100", "--threads", THREADS, "--no-progress"]


def make_bands(root, counts=(12, 5, 5), size=(64, 48), seed=0):
    """A separable task: a bright horizontal band at the bottom, middle or top of the scan
    (unchanged by a horizontal flip and robust to the small affine of the augmentation)."""
    rng = np.random.default_rng(seed)
    width, height = size
    third = height // 3
    for split, count in zip(("train", "val", "test"), counts, strict=True):
        for c, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                scan = rng.normal(60, 25, (height, width))
                top = (2 - c) * third
                scan[top : top + third] += 110
                name = f"{cls}-{split}{c}{i:03d}-1.png"
                Image.fromarray(np.clip(scan, 0, 255).astype(np.uint8)).save(folder / name)
    return root


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """``--threads`` sets torch's global thread count; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_main(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_args(data, out, cache, *extra, epochs=5):
    return [
        "--data", data, "--out", out, "--cache-dir", cache, "--epochs", epochs,
        "--batch-size", 8, "--lr", 1e-3, "--warmup-epochs", 1, *TINY, *FAST, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished run shared by the tests that inspect its output."""
    root = tmp_path_factory.mktemp("run")
    data = make_bands(root / "data")
    out = root / "out"
    code = main([str(a) for a in train_args(data, out, root / "cache", epochs=6)])
    assert code == 0
    return data, out


def test_trains_learns_and_writes_a_complete_checkpoint(trained):
    data, out = trained
    for name in (
        *REPORT_FILES,
        "config.json",
        "model.safetensors",
        "history.csv",
        "train_config.yaml",
        "train_state.pt",
    ):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    with open(out / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in history] == [1, 2, 3, 4, 5, 6]
    assert all(int(row["val_images"]) == 15 for row in history)
    assert float(history[-1]["train_loss"]) < float(history[0]["train_loss"])
    assert max(float(row["val_accuracy"]) for row in history) > 0.9  # it learns

    model, config = load_checkpoint(out)
    assert config.class_names == CLASSES and config.architecture == "mirage_tiny_patch32_512"
    assert config.model_kwargs == {"in_chans": 1, "depth": 2, "img_size": 64}
    assert config.preprocessing.input_size == (64, 64)
    assert config.temperature > 0 and "calibration" in config.training
    best = config.training["best_epoch"]
    assert history[best - 1]["best"] == "1" and config.training["val"]["images"] == 15

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_images"] == 15
    assert metrics["images_per_class"] == dict.fromkeys(CLASSES, 5)
    assert metrics["temperature"] == pytest.approx(config.temperature)
    assert metrics["overall"]["accuracy"]["value"] > 0.9
    assert metrics["bootstrap"] == {"n": 100, "seed": 0}
    # prediction sets and the out-of-distribution flag: fitted, stored, measured on test
    assert (out / UNCERTAINTY_NAME).is_file()
    assert config.uncertainty["sets"]["calibration_per_class"] == [5, 5, 5]  # the val split
    assert config.uncertainty["fitted_on"] == {"train": 36, "val": 15}
    found = metrics["uncertainty"]
    assert found["level"] == 0.9 and set(found["per_class"]) == set(CLASSES)
    assert found["images"] == 15 and 1 <= found["mean_set_size"] <= 3
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 15 and rows[0]["file"].startswith("test/BOTTOM/")
    # the report's probabilities are the loaded model's, calibrated with the temperature
    x = config.preprocessing(data / rows[0]["file"])[None]
    with torch.no_grad():
        probs = torch.softmax(model(x) / config.temperature, dim=1)[0]
    assert float(rows[0]["prob_BOTTOM"]) == pytest.approx(float(probs[0]), abs=1e-5)

    saved, explicit = parse_config(["--config", str(out / "train_config.yaml")])
    assert saved.model_kwargs == {"depth": 2} and saved.epochs == 6 and "lr" in explicit
    assert yaml.safe_load((out / "train_config.yaml").read_text())["resume"] is False


def test_evaluate_reproduces_the_test_metrics(trained, tmp_path, capsys):
    data, out = trained
    code = evaluate.main(
        [
            "--checkpoint",
            str(out),
            "--data",
            str(data),
            "--out",
            str(tmp_path),
            "--bootstrap",
            "100",
        ]
    )
    assert code == 0
    assert "accuracy" in capsys.readouterr().out
    ours = json.loads((tmp_path / "metrics.json").read_text())
    theirs = json.loads((out / "metrics.json").read_text())
    ours.pop("created"), theirs.pop("created")
    assert ours == theirs
    assert (tmp_path / "predictions.csv").read_text() == (out / "predictions.csv").read_text()
    for name in REPORT_FILES:
        assert (tmp_path / name).is_file()


def test_evaluate_fits_uncertainty_for_an_older_checkpoint(trained, tmp_path, capsys):
    data, out = trained
    older = tmp_path / "older"
    older.mkdir()
    shutil.copy(out / "model.safetensors", older)
    config = json.loads((out / "config.json").read_text())
    config.pop("uncertainty")
    (older / "config.json").write_text(json.dumps(config))
    args = ["--checkpoint", older, "--data", data, "--out", tmp_path / "report"]
    code, _, _ = run_evaluate(capsys, *args)
    assert code == 0 and "uncertainty" not in json.loads(
        (tmp_path / "report/metrics.json").read_text()
    )
    assert Predictor.from_pretrained(older).uncertainty is None  # serves without them

    code, printed, _ = run_evaluate(capsys, *args, "--fit-uncertainty")
    assert code == 0 and "out-of-distribution flag stored" in printed
    assert (older / UNCERTAINTY_NAME).is_file()
    fitted = json.loads((older / "config.json").read_text())["uncertainty"]
    assert fitted == json.loads((out / "config.json").read_text())["uncertainty"]  # as train's
    report = json.loads((tmp_path / "report/metrics.json").read_text())["uncertainty"]
    assert report == json.loads((out / "metrics.json").read_text())["uncertainty"]
    assert Predictor.from_pretrained(older).uncertainty is not None

    code, _, err = run_evaluate(
        capsys, "--checkpoint", "someone/model", "--data", data, "--fit-uncertainty"
    )
    assert code == 2 and err.count("\n") == 1


def run_evaluate(capsys, *args):
    code = evaluate.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_with_tta_gives_the_predictors_mirrored_probabilities(trained, tmp_path):
    from mirage_demo.inference import Predictor

    data, out = trained
    args = ["--checkpoint", out, "--data", data, "--out", tmp_path, "--bootstrap", "0", "--tta"]
    assert evaluate.main([str(a) for a in args]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["tta"] == "horizontal flip"
    with open(tmp_path / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(out / "predictions.csv", newline="") as handle:
        plain = list(csv.DictReader(handle))
    mirrored = Predictor.from_pretrained(out, tta=True)
    for row in rows[:3]:
        probabilities = mirrored.predict(data / row["file"]).probabilities
        for name in CLASSES:
            assert float(row[f"prob_{name}"]) == pytest.approx(probabilities[name], abs=1e-5)
    assert any(a["prob_TOP"] != b["prob_TOP"] for a, b in zip(rows, plain, strict=True))


def test_evaluate_rebuilds_the_split_recorded_in_the_checkpoint(trained, tmp_path, capsys):
    """A flat copy of the data is carved as the checkpoint's typed split record says; the
    free-form ``training`` settings (a decoy seed here) are never read back."""
    import shutil

    from mirage_demo.data import SplitSpec, load_dataset

    data, out = trained
    flat = tmp_path / "flat"
    for image in sorted(data.glob("*/*/*.png")):
        (flat / image.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, flat / image.parent.name / image.name)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    shutil.copy(out / "model.safetensors", checkpoint)
    config = json.loads((out / "config.json").read_text())
    config["split"] = {"val_fraction": 0.2, "test_fraction": 0.3, "seed": 5, "exclude": []}
    config["training"]["split_seed"] = 0
    (checkpoint / "config.json").write_text(json.dumps(config))
    args = ["--checkpoint", checkpoint, "--data", flat, "--out", tmp_path / "report"]
    assert evaluate.main([str(a) for a in [*args, "--bootstrap", "10"]]) == 0
    with open(tmp_path / "report" / "predictions.csv", newline="") as handle:
        files = [row["file"] for row in csv.DictReader(handle)]
    recorded = load_dataset(flat, SplitSpec(0.2, 0.3, 5)).splits["test"]
    assert sorted(files) == sorted(s.path.relative_to(flat).as_posix() for s in recorded)
    default = load_dataset(flat).splits["test"]
    assert sorted(files) != sorted(s.path.relative_to(flat).as_posix() for s in default)


def test_evaluate_refuses_other_classes(trained, tmp_path, capsys):
    _, out = trained
    other = tmp_path / "other"
    for cls in ("A", "B"):
        (other / cls).mkdir(parents=True)
    make_bands(tmp_path / "x", counts=(4, 2, 2))
    for split in ("train", "val", "test"):
        shutil.copytree(tmp_path / "x" / split / "TOP", other / split / "A", dirs_exist_ok=True)
        shutil.copytree(tmp_path / "x" / split / "BOTTOM", other / split / "B", dirs_exist_ok=True)
    shutil.rmtree(other / "A"), shutil.rmtree(other / "B")
    code = evaluate.main(["--checkpoint", str(out), "--data", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "has classes [A, B] but the checkpoint was trained on [BOTTOM, MIDDLE, TOP]" in err


def test_bad_run_settings_stop_with_one_line(trained, tmp_path, capsys, monkeypatch):
    data, out = trained
    before = (out / "train_state.pt").stat().st_mtime_ns
    cases = [
        (["--out", out, "--resume", "--model", "resnet18"], "holds a mirage_tiny_patch32_512 run"),
        (["--out", out, "--resume", "--model-kwargs", "{depth: 3}"], "--model-kwargs"),
        (["--out", out, "--data", data], "already holds a training run: pass --resume"),
        (["--out", tmp_path / "new", "--resume"], "nothing to resume"),
        (["--data", data], "--out DIR is required"),
        (["--out", tmp_path / "x", "--data", data, "--epochs", "0"], "--epochs must be"),
        (["--out", tmp_path / "x", "--config", tmp_path / "no.yaml"], "no.yaml does not exist"),
        (
            ["--out", tmp_path / "p", "--data", data, *TINY, "--pretrained", *FAST],
            "cannot load pretrained weights for mirage_tiny_patch32_512",
        ),
        (["--out", tmp_path / "w", "--data", data, "--weights", tmp_path / "no.pth"], "no.pth"),
        (["--out", tmp_path / "h", "--data", data, "--amp", "fp16"], "--amp fp16 needs a CUDA"),
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases.append(
        (["--out", tmp_path / "c", "--data", data, "--device", "cuda"], "no CUDA GPU is available")
    )
    for args, message in cases:
        code, _, err = run_main(capsys, *args)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), (args, err)
        assert message in err, (args, err)
    assert (out / "train_state.pt").stat().st_mtime_ns == before  # nothing touched
    assert not (tmp_path / "c").exists()


def test_resume_refuses_a_state_of_another_architecture(trained, tmp_path, capsys):
    _, out = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state = torch.load(copy / "train_state.pt", weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("blocks.1.")}
    torch.save(state, copy / "train_state.pt")
    code, _, err = run_main(capsys, "--out", copy, "--resume", *FAST)
    assert code == 2 and err.count("\n") == 1
    assert "train_state.pt do not fit mirage_tiny_patch32_512" in err


def test_distils_from_a_teacher_checkpoint(trained, tmp_path, capsys):
    """With --distill-weight 1 the student follows the teacher, not the labels: a teacher that
    always answers TOP makes a student that always answers TOP (its input is resized for the
    teacher, which sees 64 px)."""
    data, trained_out = trained
    model, config = load_checkpoint(trained_out)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 6.0]))
    teacher = save_checkpoint(tmp_path / "always-top", model, config)
    out = tmp_path / "student"
    args = train_args(data, out, tmp_path / "cache", epochs=4)
    args[args.index("--img-size") + 1] = 96
    code, _, err = run_main(
        capsys, *args, "--teacher", teacher, "--distill-weight", 1, "--distill-temperature", 1
    )
    assert code == 0, err
    _, student = load_checkpoint(out)
    assert student.training["teacher"] == str(teacher)
    assert "distilled from always-top" in student.description
    with open(out / "predictions.csv", newline="") as handle:
        assert {row["predicted"] for row in csv.DictReader(handle)} == {"TOP"}

    other = tmp_path / "other-classes"
    make_bands(other, counts=(12, 5, 5))
    (other / "train" / "MIDDLE").rename(other / "train" / "CENTRE")
    for split in ("val", "test"):
        if (other / split / "MIDDLE").exists():
            (other / split / "MIDDLE").rename(other / split / "CENTRE")
    code, _, err = run_main(
        capsys, *train_args(other, tmp_path / "o", tmp_path / "cache2"), "--teacher", teacher
    )
    assert code == 2 and "distil from a model of the same classes" in err
    assert len(err.strip().splitlines()) == 1


def test_classifier_retraining_from_a_checkpoint_of_this_project(trained, tmp_path, capsys):
    """Decoupled training's second stage: --weights of an earlier run, only the classifier
    learns; the checkpoint says where it started and that nothing pre-trained came in."""
    data, trained_out = trained
    first, _ = load_checkpoint(trained_out)
    args = train_args(data, tmp_path / "out", tmp_path / "cache", epochs=1)
    args += ["--weights", trained_out / "model.safetensors", "--mode", "linear"]
    code, _, err = run_main(capsys, *args, "--balance", "sampler", "--bootstrap", "0")
    assert code == 0, err
    model, config = load_checkpoint(tmp_path / "out")
    assert config.source_weights == {
        "name": f"{trained_out.name} (a checkpoint of this project)",
        "checkpoint": str(trained_out),
        "from_scratch": True,
    }
    assert torch.equal(model.blocks[-1].mlp.fc2.weight, first.blocks[-1].mlp.fc2.weight)
    assert not torch.equal(model.head.weight, first.head.weight)


def test_bf16_on_a_cpu_that_computes_it(trained, tmp_path, capsys, monkeypatch):
    """--amp bf16 trains on a CPU with native bfloat16, records it, and reports in float32;
    a CPU that would emulate it is refused in one line before anything is written."""
    data, _ = trained
    args = train_args(data, tmp_path / "out", tmp_path / "cache", "--amp", "bf16", epochs=2)
    if train.setup.cpu_computes_bf16():
        code, _, err = run_main(capsys, *args)
        assert code == 0, err
        model, config = load_checkpoint(tmp_path / "out")
        assert config.training["amp"] == "bfloat16" and config.training["device"] == "cpu"
        with open(tmp_path / "out" / "predictions.csv", newline="") as handle:
            row = next(csv.DictReader(handle))
        x = config.preprocessing(data / row["file"])[None]
        with torch.no_grad():  # the report's probabilities are the float32 model's
            probs = torch.softmax(model(x) / config.temperature, dim=1)[0]
        assert float(row["prob_BOTTOM"]) == pytest.approx(float(probs[0]), abs=1e-5)
    monkeypatch.setattr(train.setup, "cpu_computes_bf16", lambda: False)
    code, _, err = run_main(
        capsys, *train_args(data, tmp_path / "emu", tmp_path / "cache", "--amp", "bf16")
    )
    assert code == 2 and err.count("\n") == 1 and "needs native bfloat16" in err
    assert not (tmp_path / "emu").exists()
