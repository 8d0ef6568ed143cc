"""Hostile checkpoints (issues 12, 30): a checkpoint's config.json, weights, statistics and report
files are untrusted data, read with bounds and checked field by field.
"""

from __future__ import annotations

import pytest
import timm
import torch

import mirage_demo  # noqa: F401  (registers the mirage_* models)
from mirage_demo.checkpoint import (
    CheckpointError,
    load_checkpoint,
)
from tests.adversarial import (
    CLASSES,
    set_field,
    with_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")


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
