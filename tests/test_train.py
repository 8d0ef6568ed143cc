"""End to end: ``python -m train`` and ``python -m train.evaluate`` with a tiny MIRAGE on CPU."""

import csv
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import train.setup
from mirage_demo.checkpoint import UNCERTAINTY_NAME, load_checkpoint, save_checkpoint
from mirage_demo.inference import Predictor
from mirage_demo.metrics import REPORT_FILES
from train import evaluate
from train.cli import main
from train.config import UsageError, check_resumable, parse_config
from train.data import EpochSampler
from train.optim import lr_factor
from train.state import load_state

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


def weights_of(out):
    state = load_state(out)
    return state["progress"]["epoch"], state["model"]


@pytest.mark.slow  # a killed training process
def test_resume_after_a_kill_ends_with_identical_weights(tmp_path, capsys, monkeypatch):
    data = make_bands(tmp_path / "data", counts=(8, 3, 3))
    extra = ["--mode", "last-k", "--last-k", "1", "--balance", "sqrt", "--patience", "0"]

    def args(out):
        return train_args(data, tmp_path / out, tmp_path / "cache", *extra, "--no-tensorboard")

    code, _, _ = run_main(capsys, *args("straight"))
    assert code == 0
    epochs, expected = weights_of(tmp_path / "straight")
    assert epochs == 5

    # a real process, killed with SIGKILL as soon as its first epoch is saved
    command = [sys.executable, "-m", "train", *map(str, args("killed"))]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = tmp_path / "killed" / "train_state.pt"
    deadline = time.monotonic() + 120
    while not state_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done, _ = weights_of(tmp_path / "killed")
    assert 1 <= done < 5  # really interrupted
    code, out, _ = run_main(capsys, "--out", tmp_path / "killed", "--resume", *FAST)
    assert code == 0 and f"resuming {tmp_path / 'killed'} after epoch {done}" in out

    # interrupted in the middle of writing epoch 3's state: the epoch-2 state survives
    import train.state

    real_save = torch.save

    def dying_save(obj, path):
        if obj["progress"]["epoch"] == 3:
            Path(path).write_bytes(b"half a file")
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(train.state.torch, "save", dying_save)
    code, _, err = run_main(capsys, *args("write"))
    assert code == 130 and "--resume" in err
    assert weights_of(tmp_path / "write")[0] == 2
    assert not [p for p in (tmp_path / "write").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(train.state.torch, "save", real_save)
    code, _, _ = run_main(capsys, "--out", tmp_path / "write", "--resume", *FAST)
    assert code == 0

    for run in ("killed", "write"):
        epochs, weights = weights_of(tmp_path / run)
        assert epochs == 5
        assert weights.keys() == expected.keys()
        for key in expected:
            assert torch.equal(weights[key], expected[key]), (run, key)
        best = load_file(tmp_path / run / "model.safetensors")
        reference = load_file(tmp_path / "straight" / "model.safetensors")
        assert all(torch.equal(best[k], reference[k]) for k in reference), run
        report = json.loads((tmp_path / run / "metrics.json").read_text())
        assert (
            report["overall"]
            == json.loads((tmp_path / "straight" / "metrics.json").read_text())["overall"]
        )


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    data = make_bands(tmp_path / "data", counts=(8, 3, 3))
    calls = {"n": 0}

    class PoisonedLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            calls["n"] += 1
            loss = super().forward(logits, target)
            return loss * float("nan") if calls["n"] > 3 else loss  # epoch 1 has 3 steps

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", PoisonedLoss)
    code, _, err = run_main(capsys, *train_args(data, tmp_path / "out", tmp_path / "cache"))
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "loss became NaN or infinite in epoch 2" in err
    assert f"the last good checkpoint (epoch 1) is kept in {tmp_path / 'out'}" in err
    assert weights_of(tmp_path / "out")[0] == 1
    model, _ = load_checkpoint(tmp_path / "out")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (tmp_path / "out" / "metrics.json").exists()


def write_bad(kind, root):
    if kind == "missing":
        return root / "nowhere"
    if kind == "empty":
        (root / "empty").mkdir()
        return root / "empty"
    data = make_bands(root / kind, counts=(4, 2, 2))
    if kind == "mismatch":
        shutil.rmtree(data / "val" / "MIDDLE")
    elif kind == "empty-class":
        for file in (data / "train" / "TOP").iterdir():
            file.unlink()
    elif kind == "unreadable":
        (data / "train" / "TOP" / "TOP-broken-1.png").write_bytes(b"not an image")
    return data


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "data folder .*nowhere does not exist"),
        ("empty", "empty has no class folders"),
        ("mismatch", r"classes differ between splits: val/ has \[BOTTOM, TOP\].*missing MIDDLE"),
        ("empty-class", "class 'TOP' has no images in"),
        (
            "unreadable",
            r"1 unreadable image\(s\): .*TOP-broken-1.png: not a readable image.*"
            "--skip-unreadable",
        ),
    ],
)
def test_bad_data_stops_before_training_with_one_line(tmp_path, capsys, kind, message):
    data = write_bad(kind, tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run_main(capsys, *train_args(data, out, tmp_path / "cache"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert "epoch" not in stdout
    assert not (out / "train_state.pt").exists()


def test_unreadable_files_can_be_skipped(tmp_path, capsys):
    data = write_bad("unreadable", tmp_path)
    args = train_args(data, tmp_path / "out", tmp_path / "cache", "--skip-unreadable", epochs=1)
    code, stdout, _ = run_main(capsys, *args, "--bootstrap", "0", "--no-tensorboard")
    assert code == 0
    assert "warning: skipping unreadable image" in stdout and "TOP-broken-1.png" in stdout


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


def test_start_from_local_weights_without_the_cache(tmp_path, capsys):
    """--weights FILE (a converted timm state dict) and decoding files every epoch."""
    import timm
    from safetensors.torch import save_file

    data = make_bands(tmp_path / "data", counts=(4, 2, 2))
    torch.manual_seed(1)
    encoder = timm.create_model("mirage_tiny_patch32_512", depth=2, img_size=64)
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith(("head", "norm"))}
    save_file(state, tmp_path / "encoder.safetensors")
    args = train_args(data, tmp_path / "out", tmp_path / "cache", epochs=1)
    args += ["--weights", tmp_path / "encoder.safetensors", "--mode", "linear", "--no-cache"]
    code, stdout, err = run_main(capsys, *args, "--bootstrap", "0", "--no-tensorboard")
    assert code == 0, err
    assert "linear, 963 trainable parameters" in stdout  # norm + head of 192 -> 3 classes
    model, config = load_checkpoint(tmp_path / "out")
    assert config.source_weights["name"] == "encoder.safetensors"
    assert torch.equal(model.blocks[1].mlp.fc2.weight, encoder.blocks[1].mlp.fc2.weight)
    assert not (tmp_path / "cache").exists()  # --no-cache: nothing cached


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


def test_options_yaml_and_resume_rules(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 3\nbatch-size: 4\nmode: linear\n")
    config, explicit = parse_config(["--config", str(tmp_path / "c.yaml"), "--epochs", "7"])
    assert (config.epochs, config.batch_size, config.mode) == (7, 4, "linear")
    assert config.base_lr == 1e-3 and config.layer_decay == 0.75 and config.drop_path == 0.1
    assert parse_config([])[0].base_lr == 1e-5  # MIRAGE's full fine-tuning rate
    assert explicit == {"epochs", "batch_size", "mode"}
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    with pytest.raises(UsageError, match="unknown options: epochz"):
        parse_config(["--config", str(tmp_path / "bad.yaml")])
    saved = config.to_dict()
    config.workers, config.device = 3, "cpu"
    resumed = check_resumable(saved, config, {"workers", "device"})
    assert resumed.workers == 3 and resumed.epochs == 7 and resumed.resume
    config.seed = 5
    with pytest.raises(UsageError, match="--seed 5 differs from the run being resumed"):
        check_resumable(saved, config, {"seed"})


def test_epoch_sampler_shards_one_global_order():
    from mirage_demo.data import Sample

    samples = [Sample(Path(f"{i}.png"), i % 3, str(i)) for i in range(10)]
    ranks = [EpochSampler(samples, 3, seed=1, rank=r, world_size=3) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(4)
    shards = [list(s) for s in ranks]
    assert [len(s) for s in shards] == [4, 4, 4]  # padded to a multiple of the world size
    order = ranks[0].order()
    assert sorted(order) == list(range(10))
    merged = [shards[r][i] for i in range(4) for r in range(3)]
    assert merged == (order + order)[:12]
    single = EpochSampler(samples, 3, seed=1)
    single.set_epoch(4)
    assert list(single) == order  # the order does not depend on the world size
    single.set_epoch(5)
    assert list(single) != order
    balanced = EpochSampler(samples[:7] + samples[:1] * 20, 3, balance_power=1.0, seed=0)
    drawn = np.bincount([balanced.samples[i].label for i in balanced], minlength=3)
    assert drawn.min() >= 3  # rare classes drawn about as often as the common one
    sqrt = EpochSampler(samples[:7] + samples[:1] * 200, 3, balance_power=0.5, seed=0)
    sqrt.set_epoch(0)
    counts = np.bincount([sqrt.samples[i].label for i in sqrt], minlength=3)
    assert counts[0] > counts[1] + counts[2]  # square-root sampling keeps the majority ahead


def test_learning_rate_schedule():
    factors = [lr_factor(s, warmup=4, total=20, floor=0.01) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(factors[3:]))
    assert factors[-1] == pytest.approx(0.01, abs=0.01)
    assert lr_factor(12, 4, 20, 0.0) == pytest.approx(0.5)  # half-way down the cosine


@pytest.mark.slow  # two DDP processes
def test_ddp_on_two_cpu_processes(tmp_path):
    data = make_bands(tmp_path / "data", counts=(8, 5, 3))
    out = tmp_path / "out"
    args = train_args(
        data, out, tmp_path / "cache", "--device", "cpu", "--accum-steps", "2",
        "--clip-grad", "1.0", "--no-tensorboard", epochs=2,
    )  # fmt: skip
    args[args.index("--threads") + 1] = "1"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # the `torchrun` command
    command = [*torchrun, "--standalone", "--nproc_per_node=2", "-m", "train", *map(str, args)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 1/2 ") == 1  # rank 0 logs, the other rank is quiet
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["world_size"] == 2
    assert config["training"]["effective_batch_size"] == 8 * 2 * 2
    with open(out / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    assert [int(r["val_images"]) for r in history] == [15, 15]  # both ranks' shares gathered
    assert int(history[0]["step"]) == 1  # 24 images / 2 ranks = 2 batches of 8 = 1 step
    state = load_state(out)
    assert len(state["rng"]) == 2 and not torch.equal(
        state["rng"][0]["torch"], state["rng"][1]["torch"]
    )
    load_checkpoint(out)
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 9


def test_distillation_loss_matches_its_definition():
    from train.distill import distillation_loss

    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    t = 2.0
    p_teacher = torch.softmax(teacher / t, dim=1)
    expected = (p_teacher * (p_teacher.log() - torch.log_softmax(student / t, dim=1))).sum(1)
    assert distillation_loss(student, teacher, t) == pytest.approx(4 * expected.mean().item())
    assert distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)


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


def test_model_selection_measures():
    from train.run import Progress

    progress = Progress()
    epochs = [
        {"loss": 0.9, "balanced_accuracy": 0.70, "accuracy": 0.6},
        {"loss": 0.5, "balanced_accuracy": 0.60, "accuracy": 0.9},
        {"loss": 0.4, "balanced_accuracy": 0.70, "accuracy": 0.9},
    ]
    assert [progress.update(i + 1, v, 0, 0) for i, v in enumerate(epochs)] == [True, False, True]
    assert progress.best["epoch"] == 3  # same balanced accuracy, lower loss
    by_loss = Progress()
    assert [by_loss.update(i + 1, v, 0, 0, "loss") for i, v in enumerate(epochs)] == [
        True, True, True
    ]  # fmt: skip
    by_accuracy = Progress()
    picks = [by_accuracy.update(i + 1, v, 0, 0, "accuracy") for i, v in enumerate(epochs)]
    assert picks == [True, True, True] and by_accuracy.best["epoch"] == 3


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
