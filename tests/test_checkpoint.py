import json
import os

import pytest
import timm
import torch

import mirage_demo  # noqa: F401
from mirage_demo.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from mirage_demo.data import Preprocessing

CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]
KWARGS = {"img_size": 128, "depth": 2}


def tiny_checkpoint(directory, classes=CLASSES, temperature=1.5):
    torch.manual_seed(0)
    model = timm.create_model("mirage_tiny_patch32_512", num_classes=len(classes), **KWARGS)
    config = CheckpointConfig(
        architecture="mirage_tiny_patch32_512",
        class_names=list(classes),
        preprocessing=Preprocessing.from_model(model),
        model_kwargs=KWARGS,
        temperature=temperature,
        training={"epochs": 1},
    )
    save_checkpoint(directory, model.eval(), config)
    return model, config


def test_round_trip_gives_identical_logits(tmp_path):
    model, config = tiny_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded, loaded_config = load_checkpoint(tmp_path / "ckpt")
    x = torch.rand(3, 1, 128, 128)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded_config.class_names == CLASSES
    assert loaded_config.temperature == 1.5
    assert loaded_config.preprocessing == config.preprocessing
    assert not loaded.training
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["format"] == "mirage-demo-checkpoint" and saved["architecture"]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):  # readable like any other file
        assert (tmp_path / "ckpt" / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_load_from_hub_cache_offline(tmp_path, hub_cache):
    model, _ = tiny_checkpoint(tmp_path / "ckpt")
    files = {p.name: p for p in (tmp_path / "ckpt").iterdir()}
    hub_cache("someone/oct-tiny", files)
    loaded, _ = load_checkpoint("someone/oct-tiny")
    x = torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_checkpoint("someone/not-cached")


def test_wrong_shape_says_what_is_wrong(tmp_path):
    tiny_checkpoint(tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    config["class_names"] = ["A", "B", "C"]
    config_path.write_text(json.dumps(config))
    expected = r"head.weight is \(4, 192\).*3 classes expects \(3, 192\)"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / "config.json").write_text("{nope"), "not valid JSON"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 9), "not a readable"),
        (
            lambda d: (d / "config.json").write_text(
                (d / "config.json").read_text().replace("mirage_tiny_patch32_512", "nope_net")
            ),
            "unknown architecture 'nope_net'",
        ),
    ],
)
def test_broken_checkpoints(tmp_path, break_it, message):
    tiny_checkpoint(tmp_path / "ckpt")
    break_it(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "ckpt")


def test_not_a_directory_nor_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "missing" / "deeper")


def test_cnn_checkpoint_round_trip_keeps_one_channel(tmp_path):
    from mirage_demo.models import create_classifier

    model = create_classifier("resnet18", num_classes=2).eval()
    config = CheckpointConfig(
        "resnet18", ["A", "B"], Preprocessing.from_model(model, input_size=64)
    )
    save_checkpoint(tmp_path / "cnn", model, config)
    loaded, _ = load_checkpoint(tmp_path / "cnn")
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_loaded_mirage_keeps_position_embedding_frozen(tmp_path):
    tiny_checkpoint(tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert not loaded.pos_embed.requires_grad
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_half_precision_weights_load_as_float32(tmp_path):
    model, config = tiny_checkpoint(tmp_path / "full")
    save_checkpoint(tmp_path / "half", model, config, dtype=torch.float16)
    full = (tmp_path / "full" / "model.safetensors").stat().st_size
    half = (tmp_path / "half" / "model.safetensors").stat().st_size
    assert half < 0.55 * full
    loaded, _ = load_checkpoint(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-2)


def test_split_record_round_trips_and_wins_over_training_provenance(tmp_path):
    from mirage_demo.checkpoint import read_config
    from mirage_demo.data import SplitSpec

    model, config = tiny_checkpoint(tmp_path / "ckpt")
    config.split = SplitSpec(val_fraction=0.2, test_fraction=0.1, seed=3, exclude=("examples",))
    config.training = {"split_seed": 0, "val_fraction": 0.5}  # provenance, never read back
    save_checkpoint(tmp_path / "ckpt", model, config)
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["split"] == {
        "val_fraction": 0.2,
        "test_fraction": 0.1,
        "seed": 3,
        "exclude": ["examples"],
        "near_copies": 0.95,
    }
    assert read_config(tmp_path / "ckpt").split == config.split
    from mirage_demo.ui.report import model_facts_markdown

    facts = model_facts_markdown(config, "ckpt")
    assert (
        "| Data split | patient-disjoint, seed 3; missing splits carved as val 20%, test 10%"
        in facts
    )
    assert "left out: examples |" in facts


def test_legacy_split_settings_in_training_migrate_to_the_split_record(tmp_path):
    from mirage_demo.checkpoint import read_config
    from mirage_demo.data import SplitSpec

    tiny_checkpoint(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    legacy = json.loads(path.read_text())
    legacy.pop("split")
    legacy["training"] = {"val_fraction": 0.2, "split_seed": 7, "exclude": None, "epochs": 3}
    path.write_text(json.dumps(legacy))
    assert read_config(tmp_path / "ckpt").split == SplitSpec(
        val_fraction=0.2, seed=7, near_copies=None
    )
    legacy["training"] = {"epochs": 3}  # nothing recorded: no split
    path.write_text(json.dumps(legacy))
    assert read_config(tmp_path / "ckpt").split is None
    # the bundled models (today's format) keep evaluating on the split they were trained on
    for bundled in ("demo-model", "demo-vit"):
        directory = os.path.join(os.path.dirname(__file__), "..", "assets", bundled)
        if os.path.isfile(os.path.join(directory, "config.json")):
            config = read_config(directory)
            training = config.training
            assert config.split == SplitSpec(
                val_fraction=training["val_fraction"],
                test_fraction=training["test_fraction"],
                seed=training["split_seed"],
                exclude=tuple(training["exclude"]),
                near_copies=training.get("near_copies") or None,  # older runs: no grouping
            )


@pytest.mark.parametrize(
    "split, message",
    [
        ({"seed": "zero"}, "seed must be an integer"),
        ({"val_fraction": 0.1, "shuffle": True}, "unknown split settings: shuffle"),
        ({"exclude": [1, 2]}, "exclude must be a list of paths"),
        ([0.1, 0.1], "must be an object"),
    ],
)
def test_malformed_split_record_is_a_clear_error(tmp_path, split, message):
    from mirage_demo.checkpoint import read_config

    tiny_checkpoint(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    data = json.loads(path.read_text())
    data["split"] = split
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"unusable split record: .*{message}"):
        read_config(tmp_path / "ckpt")
