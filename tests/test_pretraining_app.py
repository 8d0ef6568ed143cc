"""The "How it learned" tab: masked reconstruction in pictures, and how the app offers it."""

from __future__ import annotations

import pytest
import torch
from gradio import Error as GradioError
from PIL import Image

import mirage_demo.reconstruction as reconstruction
import mirage_demo.space as space
import mirage_demo.ui.pretraining as ui_pretraining
from mirage_demo.data import Preprocessing
from mirage_demo.decoders import (
    MaskedReconstructor,
    PatchDecoder,
    patch_mask_image,
    visible_patches,
)
from mirage_demo.images import read_image
from mirage_demo.pretraining import create_pretraining_model, load_pretraining
from mirage_demo.reconstruction import reconstruct_scan
from mirage_demo.ui import EXAMPLES_DIR
from mirage_demo.ui.app import main
from mirage_demo.ui.learn import LEARN_MD
from mirage_demo.ui.pretraining import (
    available_sources,
    label_efficiency_markdown,
    reconstruct_view,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SCAN = str(EXAMPLES_DIR / "CNV" / "CNV-451136-1.jpeg")


def small_release() -> MaskedReconstructor:
    """MIRAGE's three decoders on a small encoder (128x128 input, a 4x4 patch grid)."""
    torch.manual_seed(0)
    model = create_pretraining_model("mirage_tiny_patch32_512", 32, 1, 2, img_size=128, depth=1)
    tasks = ("bscan", "slo", "bscanlayermap")
    decoders = {
        "bscan": PatchDecoder(192, 32, 1, 2, 1, 32, (4, 4), tasks),
        "slo": PatchDecoder(192, 32, 1, 2, 1, 32, (4, 4), tasks),
        "bscanlayermap": PatchDecoder(192, 32, 1, 2, 13, 8, (4, 4), tasks),
    }
    return MaskedReconstructor(model.encoder, decoders, [(t, (4, 4)) for t in tasks]).eval()


@pytest.fixture
def models(monkeypatch):
    torch.manual_seed(1)
    tiny = create_pretraining_model("mirage_tiny_patch32_512", 32, 1, 2, img_size=128, depth=1)
    monkeypatch.setitem(reconstruction._models, "tiny", tiny.eval())
    monkeypatch.setitem(reconstruction._models, "mirage_base", small_release())


def test_tiny_model_shows_what_it_saw_and_rebuilt(models):
    masked, rebuilt, difference, text, layers, slo, legend = reconstruct_view(SCAN, 0.75, 3, "tiny")
    for path in (masked, rebuilt, difference):
        with Image.open(path) as image:
            width, height = image.size
            assert width == 512 and height == round(512 * 496 / 512)  # the scan's aspect
    assert "saw 4 of the scan's 16 patches (25%)" in text and "rebuilt the other 12" in text
    assert layers is None and slo is None and legend == ""


def test_the_seed_chooses_the_patches_and_the_ratio_is_bounded(models):
    first = Image.open(reconstruct_view(SCAN, 0.5, 7, "tiny")[0])
    again = Image.open(reconstruct_view(SCAN, 0.5, 7, "tiny")[0])
    other = Image.open(reconstruct_view(SCAN, 0.5, 8, "tiny")[0])
    assert first.tobytes() == again.tobytes() != other.tobytes()
    assert "saw 1 of" in reconstruct_view(SCAN, 5.0, 0, "tiny")[3]  # at most 95% hidden
    with pytest.raises(GradioError, match="whole number"):
        reconstruct_view(SCAN, "much", 0, "tiny")


def test_miragess_weights_add_the_layer_map_slo_and_legend(models):
    *_, layers, slo, legend = reconstruct_view(SCAN, 0.75, 0, "mirage_base")
    assert layers is not None and slo is not None
    assert legend.count("layer class") == 13
    with Image.open(slo) as image:
        assert image.size == (384, 384)


def test_bad_input_is_one_clear_message(models, tmp_path):
    broken = tmp_path / "scan.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(GradioError, match="Could not read"):
        reconstruct_view(str(broken), 0.75, 0, "tiny")
    with pytest.raises(GradioError, match="models offered"):
        reconstruct_view(SCAN, 0.75, 0, "/etc/passwd")
    assert reconstruct_view(None, 0.75, 0, "tiny")[3].startswith("Upload a scan")


def test_release_weights_offline_say_where_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("MIRAGE_DEMO_RELEASES", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delitem(reconstruction._models, "mirage_large", raising=False)
    with pytest.raises(GradioError, match="releases/download/weights/MIRAGE-Large.pth"):
        reconstruct_view(SCAN, 0.75, 0, "mirage_large")


def test_the_app_offers_only_registered_release_weights(monkeypatch, capsys):
    bundled = available_sources(None)
    assert available_sources("mirage_base") == ["mirage_base", *bundled]
    with pytest.raises(ValueError, match="mirage_base or mirage_large"):
        available_sources("https://example.com/weights.pth")
    monkeypatch.setenv("MIRAGE_DEMO_PRETRAINING", "somewhere/else.pth")
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    assert "MIRAGE_DEMO_PRETRAINING" in capsys.readouterr().err


def test_the_bundled_tiny_mirage_rebuilds_scans_offline(monkeypatch):
    """Our own weights (no MIRAGE tensors, small enough to ship) rebuild the hidden patches
    of a real scan better than the visible patches' mean brightness does."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bundle = reconstruction.TINY_MIRAGE
    assert sum(f.stat().st_size for f in bundle.iterdir()) < 25_000_000
    model, config = load_pretraining(bundle)
    assert config["license"] == "apache-2.0" and "not MIRAGE" in config["description"]
    result = reconstruct_scan(model.eval(), SCAN, 0.75, seed=0)
    scan = Preprocessing(input_size=(512, 512)).resize_minmax(
        torch.from_numpy(read_image(SCAN))[None]
    )[0]
    visible = visible_patches(1, 0.75, seed=0, patches=256)
    hidden = patch_mask_image(~visible, scan.shape, 32)[0] > 0
    mean_fill = (scan[hidden] - scan[~hidden].mean()).abs().mean().item()
    assert result.visible == 64
    assert result.hidden_error < 0.8 * mean_fill, (result.hidden_error, mean_fill)


def test_learn_shows_the_measured_label_efficiency_curve(monkeypatch, tmp_path):
    table = label_efficiency_markdown()
    assert "| 563 (all) | 0.44 [0.40, 0.48] | 0.34 [0.29, 0.38] |" in table
    assert table.count("\n|") == 8  # the header's rule and 7 points
    assert "## How a foundation model learns without labels" in LEARN_MD
    (tmp_path / "bad.json").write_text('{"results": {}}')
    monkeypatch.setattr(ui_pretraining, "LABEL_EFFICIENCY", tmp_path / "bad.json")
    assert label_efficiency_markdown() == ""


def test_a_space_serves_the_bundled_classifiers_not_the_tiny_mirage():
    """The tiny MIRAGE's folder is a pre-training checkpoint: the Space's list of bundled
    models (its README card) skips it instead of failing on its config.json."""
    assert [c.directory.name for c in space._bundled()] == ["demo-model", "demo-vit"]
