"""Hostile checkpoints (issues 12, 30): a checkpoint's config.json, weights, statistics and report
files are untrusted data, read with bounds and checked field by field.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import mirage_demo  # noqa: F401  (registers the mirage_* models)
from mirage_demo.checkpoint import (
    CheckpointError,
    load_checkpoint,
)
from tests.adversarial import CLASSES, EXAMPLE, set_field, with_config

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# A checkpoint's config.json is untrusted data


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
    directory = with_config(tiny_ckpt, tmp_path, set_field("model_kwargs", kwargs))
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
    directory = with_config(tiny_ckpt, tmp_path, set_field(field, value))
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
    directory = with_config(tiny_ckpt, tmp_path, lambda config: text)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(directory)


def test_valid_config_still_loads_with_allowed_kwargs(tiny_ckpt):
    model, config = load_checkpoint(tiny_ckpt)
    assert config.model_kwargs == {"img_size": 64, "depth": 1}
    with torch.no_grad():
        assert model(torch.rand(1, 1, 64, 64)).shape == (1, 4)


def test_a_model_that_cannot_load_is_not_retried(tiny_ckpt, tmp_path, monkeypatch):
    import gradio as gr

    from mirage_demo.inference import Predictor
    from mirage_demo.ui import ModelChoice, ModelRegistry

    broken = with_config(tiny_ckpt, tmp_path, set_field("preprocessing.input_size", [0, 0]))
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
# Issue 30, 7: what a checkpoint may cost, checked before any weights are read or fetched


@pytest.mark.parametrize(
    "change, message",
    [
        (  # a 4 MB one-block ViT at 1024 px in 2x2 patches: 104 s a prediction
            {"model_kwargs": {"img_size": 1024, "depth": 1, "patch_size": 2}},
            r"makes 262,144 tokens per scan \(limit 4,096\)",
        ),
        (
            {"architecture": "resnet101", "model_kwargs": {}, "input_size": [2048, 2048]},
            r"GFLOP per scan \(limit 1,000\)",
        ),
    ],
    ids=["262,144 tokens", "1.3 TFLOP"],
)
def test_a_checkpoint_that_would_cost_minutes_a_scan_is_refused(
    tiny_ckpt, tmp_path, change, message
):
    def hostile(config: dict) -> None:
        config.update({k: v for k, v in change.items() if k != "input_size"})
        size = change.get("input_size") or [change["model_kwargs"]["img_size"]] * 2
        config["preprocessing"]["input_size"] = size

    directory = with_config(tiny_ckpt, tmp_path, hostile)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(directory)
    assert "\n" not in str(info.value) and time.perf_counter() - started < 60


def test_a_probe_on_a_giant_backbone_downloads_nothing(tiny_ckpt, tmp_path, monkeypatch):
    """A probe checkpoint naming a 1.8 B-parameter backbone started its download before any
    size or hash check."""
    import mirage_demo.checkpoint as checkpoint

    fetched = []

    def fetch(*args, **kwargs):
        fetched.append(args)
        raise AssertionError(f"a download of {args[0]} started")

    monkeypatch.setattr(checkpoint, "hub_weights", fetch)

    def giant(config: dict) -> None:
        config.update(architecture="vit_gigantic_patch14_clip_224", model_kwargs={})
        config["preprocessing"]["input_size"] = [224, 224]
        config["backbone"] = {
            "weights": "vit_gigantic_patch14_clip_224.laion2b",
            "revision": "0" * 40,
            "sha256": "0" * 64,
        }

    with pytest.raises(CheckpointError, match=r"M parameters \(limit 600 M\)"):
        load_checkpoint(with_config(tiny_ckpt, tmp_path, giant))
    assert fetched == []


def test_weights_that_are_not_finite_numbers_are_refused(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "nan"
    directory.mkdir()
    (directory / "config.json").write_bytes((tiny_ckpt / "config.json").read_bytes())
    state = load_file(str(tiny_ckpt / "model.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone().fill_(float("nan"))
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not finite numbers"):
        load_checkpoint(directory)


# --------------------------------------------------------------------------------------------
# Issue 30, 2 and 7: a checkpoint's test scans and report files


def _with_predictions(tiny_ckpt: Path, tmp_path: Path, files: list[str], data: str = "/") -> Path:
    """A copy of the tiny checkpoint whose config.json names ``data`` as its training data
    and whose predictions.csv lists ``files``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    directory = with_config(tiny_ckpt, tmp_path, set_field("training", {"data": data}))
    probs = ",".join(["0.25"] * 4)
    rows = [f"{name},{CLASSES[i % 4]},{CLASSES[i % 4]},{probs}" for i, name in enumerate(files)]
    header = "file,true,predicted," + ",".join(f"prob_{c}" for c in CLASSES)
    (directory / "predictions.csv").write_text("\n".join([header, *rows]) + "\n")
    return directory


def test_a_checkpoint_cannot_make_the_app_serve_server_files(tiny_ckpt, tmp_path):
    """``training.data: "/"`` and ``proc/self/environ`` in predictions.csv: "Start a round"
    copied the process's environment into the temporary folder and served it."""
    from mirage_demo.testscans import scan_set_for
    from mirage_demo.ui import ModelChoice, ModelRegistry
    from mirage_demo.ui.quiz import quiz_start

    files = ["proc/self/environ", "etc/passwd", "etc/hostname", "proc/self/cmdline"]
    directory = _with_predictions(tiny_ckpt, tmp_path, files)
    scans, why = scan_set_for(directory)
    assert scans is None and "/" not in why.replace("predictions.csv", "")
    registry = ModelRegistry([ModelChoice("hostile", str(directory))], data_roots=[])
    quiz, image, text = quiz_start(registry.scan_set("hostile"), CLASSES, 4, seed=0)
    assert quiz is None and image is None and "not reachable here" in text and "/" not in text


def test_scan_names_cannot_leave_an_allowed_folder(tiny_ckpt, tmp_path):
    from mirage_demo.testscans import scan_set_for

    root, outside = tmp_path / "data", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (outside / name).write_bytes(EXAMPLE.read_bytes())
        (root / name).write_bytes(EXAMPLE.read_bytes())
    (root / "link.png").symlink_to(outside / "a.png")
    allowed = ["a.png", "b.png", "c.png", "d.png"]
    assert scan_set_for(_with_predictions(tiny_ckpt, tmp_path / "1", allowed), roots=[root])[0]
    for escape in ("../secret/a.png", str(outside / "a.png"), "link.png"):
        files = [escape, *allowed[1:]]
        directory = _with_predictions(tiny_ckpt, tmp_path / escape.replace("/", "_"), files)
        assert scan_set_for(directory, roots=[root])[0] is None, escape


def test_huge_test_predictions_are_refused_unread(tiny_ckpt, tmp_path):
    """A 300k-row predictions.csv cost 10-16 s and +300 MB on every model switch."""
    from mirage_demo.testscans import MAX_PREDICTION_ROWS, scan_set_for

    files = [f"CNV/{i}.png" for i in range(MAX_PREDICTION_ROWS + 1)]
    directory = _with_predictions(tiny_ckpt, tmp_path, files, data="data")
    scans, why = scan_set_for(directory, roots=[tmp_path])
    assert scans is None and f"more than {MAX_PREDICTION_ROWS:,} rows" in why


@pytest.mark.parametrize(
    "report",
    [
        '{"overall": {"balanced_accuracy": {"value": "high", "ci95": [0.1, 0.2]}}}',
        '{"per_class": {"CNV": {"sensitivity": 5}}}',
        '{"confusion_matrix": [[1, 2], [3]]}',
        '{"uncertainty": {"level": "x"}}',
        "not json",
        " " * 2_000_001,
    ],
    ids=[
        "a text for a figure",
        "a number for an entry",
        "a ragged matrix",
        "bad sets",
        "not JSON",
        "2 MB",
    ],
)
def test_a_malformed_report_never_stops_the_app(tiny_ckpt, tmp_path, report):
    """A malformed metrics.json on the default model stopped the app with a traceback; a
    100 MB one cost seconds and memory on every page load."""
    from mirage_demo.ui import ModelChoice, ModelRegistry, build_app

    directory = with_config(tiny_ckpt, tmp_path, lambda config: None)
    (directory / "metrics.json").write_text(report)
    registry = ModelRegistry([ModelChoice("hostile", str(directory))])
    demo = build_app(registry)  # the page's first build reads the default model's report
    assert registry.report("hostile") is None
    demo.close()


# --------------------------------------------------------------------------------------------
# Issue 30, 7 and 8: statistics that overflow; what the command line prints


def test_statistics_that_overflow_flag_the_scan_instead_of_nan():
    from mirage_demo.ood import MahalanobisOOD, UnlikeTraining

    ood = MahalanobisOOD()
    ood.class_means_ = np.tile([1e200, -1e200], (4, 1))  # finite float64 that overflow: the
    ood.precision_ = np.full((2, 2), 1e200)  # distance is inf - inf, NaN, never above a threshold
    assert np.isinf(ood.score(np.zeros((3, 2)))).all()
    flag = UnlikeTraining(ood, feature_threshold=1.0, false_alarm=0.05)
    assert flag.flags(np.zeros((3, 2))).all()


def _with_float64_statistics(tiny_ckpt: Path, tmp_path: Path) -> Path:
    from safetensors.numpy import save_file

    model, _ = load_checkpoint(tiny_ckpt)
    width = model.num_features
    summary = {"ood": {"threshold": 1.0, "false_alarm": 0.05, "feature_dim": width}}
    directory = with_config(tiny_ckpt, tmp_path, set_field("uncertainty", summary))
    arrays = {
        "class_means": np.full((4, width), 1e200),
        "precision": np.eye(width) * 1e200,
        "calibration_scores": np.full(8, 0.5),
        "calibration_labels": np.arange(8) % 4,
    }
    save_file(arrays, str(directory / "uncertainty.safetensors"))
    return directory


def test_the_command_line_prints_valid_json_whatever_the_statistics(tiny_ckpt, tmp_path):
    """Statistics that overflow made the OOD score NaN: the flag silently off, and ``--json``
    printed bare ``NaN`` (invalid JSON)."""
    directory = _with_float64_statistics(tiny_ckpt, tmp_path)
    command = [sys.executable, "-m", "mirage_demo.predict", "--json"]
    done = subprocess.run(
        [*command, "--checkpoint", str(directory), str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    if done.returncode == 2:  # refused in one line: its statistics are out of range
        assert "finite float32" in done.stderr and done.stderr.count("\n") == 1
    else:
        record = json.loads(done.stdout, parse_constant=refuse)
        assert record["out_of_distribution"] is True


def test_a_file_name_cannot_forge_a_row_of_the_text_output(tiny_ckpt, tmp_path):
    forged = tmp_path / "a.png\nfake.png\tNORMAL\t1.000\t{NORMAL}\t"
    forged.write_bytes(EXAMPLE.read_bytes())
    done = subprocess.run(
        [sys.executable, "-m", "mirage_demo.predict", "--checkpoint", str(tiny_ckpt), str(forged)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # file, label, probability, set, verdict, warnings: 5 tabs, the name's own escaped
    assert len(lines) == 1 and lines[0].count("\t") == 5 and "\\n" in lines[0]
