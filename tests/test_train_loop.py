"""The run's machinery and what goes wrong: resume after a kill, a diverging loss, bad data
and options, the epoch sampler, the schedule, DDP, distillation and model selection
(``python -m train`` with a tiny MIRAGE on CPU; the finished run's checks: test_train.py)."""

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
from safetensors.torch import load_file

from mirage_demo.checkpoint import load_checkpoint
from mirage_demo.data import Sample
from tests.test_train import (  # noqa: F401  (keep_torch_threads: an autouse fixture)
    FAST,
    REPO,
    keep_torch_threads,
    make_bands,
    run_main,
    train_args,
)
from train.config import UsageError, check_resumable, parse_config
from train.data import EpochSampler
from train.optim import lr_factor
from train.state import load_state


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
