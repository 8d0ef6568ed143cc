"""MIRAGE's pre-training model (release weights with their decoders) and our own masked
pre-training: exact against MIRAGE's math, safe to load, offline-friendly."""

import argparse
import importlib
import os
import pathlib
from pathlib import Path

import pytest
import torch

from mirage_demo.decoders import MaskedReconstructor, masked_mse, visible_patches
from mirage_demo.pretraining import (
    PretrainingError,
    create_pretraining_model,
    load_pretraining,
    load_release,
    read_pretraining_config,
    release_path,
    save_pretraining,
)
from tests import mirage_reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {"base": (768, 12, 12), "large": (1024, 24, 16)}
TOLERANCE = 1e-4
OFFICIAL = os.environ.get("MIRAGE_OFFICIAL_SRC")


def release_file(tmp_path: Path, size: str, seed: int = 0) -> Path:
    dim, depth, _ = SIZES[size]
    path = tmp_path / f"MIRAGE-{size}.pth"
    torch.save(ref.full_release_checkpoint(dim, depth, seed=seed), path)
    return path


def scans(batch: int, seed: int = 0) -> torch.Tensor:
    """B-scan-like inputs in [0, 1]: smooth bands plus noise."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.linspace(0, 6.28, 512).view(1, 1, 512, 1)
    image = 0.5 + 0.3 * torch.sin(rows * (1 + torch.rand(batch, 1, 1, 1, generator=g)))
    return (image + 0.1 * torch.rand(batch, 1, 512, 512, generator=g)).clamp(0, 1)


def test_visible_patches_keeps_the_share_asked_for_and_repeats_with_its_seed():
    visible = visible_patches(3, 0.75, seed=5)
    assert visible.dtype == torch.bool and visible.shape == (3, 256)
    assert visible.sum(1).tolist() == [64, 64, 64]
    assert torch.equal(visible, visible_patches(3, 0.75, seed=5))
    assert not torch.equal(visible, visible_patches(3, 0.75, seed=6))
    assert visible_patches(1, 0.0, seed=0).all() and not visible_patches(1, 1.0, seed=0).any()
    with pytest.raises(ValueError, match="mask ratio"):
        visible_patches(1, 1.5)


@pytest.mark.parametrize("size", ["base", pytest.param("large", marks=pytest.mark.slow)])
def test_release_model_matches_miragess_math(size, tmp_path):
    """Every output (B-scan, SLO, layer map) equals an independent write-out of MIRAGE's
    pre-training forward pass, for a partly visible B-scan and a fully visible one."""
    path = release_file(tmp_path, size)
    model = load_release(path)
    sd = ref.full_release_checkpoint(*SIZES[size][:2])["model"]
    images = scans(2)
    for visible in (visible_patches(2, 0.75, seed=1), torch.ones(2, 256, dtype=torch.bool)):
        out = model.reconstruct(images, visible)
        assert out["bscan"].shape == (2, 1, 512, 512) and out["slo"].shape == (2, 1, 512, 512)
        assert out["bscanlayermap"].shape == (2, 13, 128, 128)
        for i in range(2):
            expected = ref.release_reconstruct(sd, images[i : i + 1], visible[i], SIZES[size][2])
            for task, value in expected.items():
                difference = (out[task][i : i + 1] - value).abs().max().item()
                assert difference <= TOLERANCE, (task, difference)


@pytest.mark.skipif(not OFFICIAL, reason="MIRAGE_OFFICIAL_SRC does not name MIRAGE's code")
@pytest.mark.parametrize("size", ["base", pytest.param("large", marks=pytest.mark.slow)])
def test_release_model_matches_miragess_official_code(size, tmp_path, monkeypatch):
    """Against MIRAGE's own MIRAGEModel (MIRAGE_OFFICIAL_SRC: a folder with its
    mirage_wrapper.py and mirage/), with the same random weights in the release layout."""
    monkeypatch.syspath_prepend(OFFICIAL)
    wrapper = importlib.import_module("mirage_wrapper")
    path = release_file(tmp_path, size)
    official = wrapper.MIRAGEWrapper(weights=str(path), device="cpu").eval()
    ours = load_release(path)
    image = scans(1, seed=2)
    worst = {}
    for seed, ratio in ((0, 0.0), (3, 0.75), (4, 0.9)):
        visible = visible_patches(1, ratio, seed=seed)
        hidden = {"slo": torch.ones(1, 256).long(), "bscanlayermap": torch.ones(1, 256).long()}
        masks = {"bscan": (~visible).long(), **hidden}
        inputs = {
            "bscan": image,
            "slo": torch.zeros(1, 1, 512, 512),
            "bscanlayermap": torch.zeros(1, 128, 128).long(),
        }
        with torch.no_grad():
            expected, _ = official.model(inputs, mask_inputs=False, task_masks=masks)
            if ratio == 0.0:  # the wrapper's own B-scan-only call gives the same
                wrapped = official({"bscan": image})
                assert all(torch.equal(wrapped[k], expected[k]) for k in expected)
        out = ours.reconstruct(image, visible)
        for task in ("bscan", "slo", "bscanlayermap"):
            difference = (out[task] - expected[task]).abs().max().item()
            worst[task] = max(worst.get(task, 0.0), difference)
    print(f"max |ours - official| at {size}: {worst}")
    assert all(d <= TOLERANCE for d in worst.values()), worst


def test_release_loader_refuses_any_other_pickled_object(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    checkpoint = ref.full_release_checkpoint(192, 1, decoder_dim=32, decoder_depth=0)
    checkpoint["args"].output_dir = Payload()
    torch.save(checkpoint, tmp_path / "evil.pth")
    with pytest.raises(PretrainingError, match="not a MIRAGE release file we can read"):
        load_release(tmp_path / "evil.pth")
    assert not marker.exists()
    checkpoint["args"].output_dir = pathlib.PurePosixPath("/runs")  # harmless, still refused
    torch.save(checkpoint, tmp_path / "path.pth")
    with pytest.raises(PretrainingError, match="PurePosixPath"):
        load_release(tmp_path / "path.pth")


def test_release_loader_says_what_is_wrong(tmp_path):
    torch.save({"weights": {}}, tmp_path / "other.pth")
    with pytest.raises(PretrainingError, match="no 'model' dictionary"):
        load_release(tmp_path / "other.pth")
    checkpoint = ref.full_release_checkpoint(192, 1, decoder_dim=32, decoder_depth=0)
    with pytest.raises(PretrainingError, match="no MIRAGE size"):
        torch.save(checkpoint, tmp_path / "small.pth")
        load_release(tmp_path / "small.pth")
    with pytest.raises(PretrainingError, match="not found"):
        load_release(tmp_path / "missing.pth")


@pytest.fixture
def releases(tmp_path, monkeypatch):
    folder = tmp_path / "releases"
    folder.mkdir()
    monkeypatch.setenv("MIRAGE_DEMO_RELEASES", str(folder))
    monkeypatch.delenv("MIRAGE_BASE_SHA256", raising=False)
    return folder


def test_release_file_is_trusted_on_first_use_then_checked(releases, monkeypatch):
    weights = releases / "MIRAGE-Base.pth"
    weights.write_bytes(b"first copy")
    assert release_path("mirage_base") == weights
    recorded = (releases / "MIRAGE-Base.pth.sha256").read_text().strip()
    assert len(recorded) == 64
    assert release_path("mirage_base") == weights  # same file: accepted again
    weights.write_bytes(b"another file")
    with pytest.raises(PretrainingError, match=f"expected {recorded}"):
        release_path("mirage_base")


def test_a_pinned_hash_wins(releases, monkeypatch):
    import hashlib

    weights = releases / "MIRAGE-Base.pth"
    weights.write_bytes(b"some weights")
    digest = hashlib.sha256(b"some weights").hexdigest()
    monkeypatch.setenv("MIRAGE_BASE_SHA256", "0" * 64)
    with pytest.raises(PretrainingError, match="expected 0000"):
        release_path("mirage_base")
    monkeypatch.setenv("MIRAGE_BASE_SHA256", digest)
    assert release_path("mirage_base") == weights
    with pytest.raises(PretrainingError, match="64 hex digits"):
        release_path("mirage_base", sha256="abc")


def test_missing_release_offline_is_one_line_naming_the_url(releases, monkeypatch):
    url = "https://github.com/j-morano/MIRAGE/releases/download/weights/MIRAGE-Large.pth"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainingError) as err:
        release_path("mirage_large")
    assert url in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    unreachable = "http://127.0.0.1:9/MIRAGE-Base.pth"  # nothing listens on the discard port
    with pytest.raises(PretrainingError, match="cannot download http://127.0.0.1:9/") as err:
        release_path("mirage_base", url=unreachable)
    assert "\n" not in str(err.value) and not (releases / "MIRAGE-Base.pth").exists()
    with pytest.raises(PretrainingError, match="unknown MIRAGE release"):
        release_path("mirage_huge")


def small_model(**kwargs) -> MaskedReconstructor:
    torch.manual_seed(0)
    return create_pretraining_model(
        "mirage_tiny_patch32_512", 32, 1, 2, img_size=128, depth=2, **kwargs
    )


def test_our_checkpoint_round_trip(tmp_path):
    model = small_model().eval()
    save_pretraining(
        tmp_path,
        model,
        {
            "architecture": "mirage_tiny_patch32_512",
            "encoder_kwargs": {"img_size": 128, "depth": 2},
            "mask_ratio": 0.75,
            "license": "apache-2.0",
        },
    )
    loaded, config = load_pretraining(tmp_path)
    assert config["decoder"] == {"dim": 32, "depth": 1, "num_heads": 2}
    images, visible = torch.rand(2, 1, 128, 128), visible_patches(2, 0.5, seed=0, patches=16)
    assert torch.equal(
        loaded.reconstruct(images, visible)["bscan"], model.reconstruct(images, visible)["bscan"]
    )
    assert set(loaded.reconstruct(images, visible)) == {"bscan"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architecture": "resnet18"}, "mirage_"),
        ({"decoder": {"dim": 30, "depth": 1, "num_heads": 4}}, "divisible"),
        ({"decoder": {"dim": 32, "depth": 1}}, "dim, depth and num_heads"),
        ({"encoder_kwargs": {"pretrained_cfg_overlay": "x"}}, "encoder_kwargs"),
        ({"mask_ratio": "all"}, "mask_ratio"),
        ({"format_version": 9}, "format version"),
    ],
)
def test_our_checkpoint_config_is_checked(tmp_path, change, message):
    import json

    save_pretraining(
        tmp_path,
        small_model(),
        {
            "architecture": "mirage_tiny_patch32_512",
            "encoder_kwargs": {"img_size": 128, "depth": 2},
        },
    )
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(PretrainingError, match=message):
        read_pretraining_config(tmp_path)


def test_masked_loss_counts_only_the_hidden_patches():
    target = torch.zeros(1, 1, 64, 64)
    prediction = torch.zeros(1, 1, 64, 64)
    visible = torch.tensor([[True, False, True, False]])
    prediction[..., :32, :32] = 5.0  # a visible patch: ignored
    prediction[..., :32, 32:] = 2.0  # a hidden one: counts
    assert masked_mse(prediction, target, visible, 32).item() == pytest.approx(2.0)


def test_encoder_on_visible_patches_is_timms_encoder_on_them():
    model = small_model().eval()
    x = torch.randn(2, 1, 128, 128)
    everything = torch.ones(2, 16, dtype=torch.bool)
    tokens = model.encode(x, everything)
    expected = model.encoder.forward_features(x)  # timm: global token first, final norm
    assert torch.allclose(model.encoder.norm(tokens[:, :-1]), expected[:, 1:], atol=1e-5)
    assert torch.allclose(model.encoder.norm(tokens[:, -1]), expected[:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="same number of visible patches"):
        model.encode(x, torch.tensor([[True] * 16, [True] * 15 + [False]]))


def test_args_must_be_a_namespace_of_plain_values(tmp_path):
    checkpoint = ref.full_release_checkpoint(768, 1)
    checkpoint["args"] = argparse.Namespace(decoder_num_heads="eight")
    torch.save(checkpoint, tmp_path / "odd.pth")
    with pytest.raises(PretrainingError, match="decoder_num_heads"):
        load_release(tmp_path / "odd.pth")
