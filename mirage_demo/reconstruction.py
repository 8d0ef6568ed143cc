"""What a masked autoencoder learned, in pictures: hide most of a scan, let the model rebuild
it (the app's "How it learned" tab and ``benchmarks/reconstruction.py``).

:func:`reconstruct_scan` hides a share of a B-scan's 32x32 patches (chosen by a seed), runs a
pre-training model (:mod:`mirage_demo.pretraining`: the bundled tiny MIRAGE, or MIRAGE's own
release weights) and returns the pictures: the visible patches, the reconstruction, the error
on the hidden patches and, with MIRAGE's weights, the 13-class layer map and the SLO it
predicts from the B-scan alone.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mirage_demo.data import Preprocessing
from mirage_demo.decoders import MaskedReconstructor, patch_mask_image, visible_patches
from mirage_demo.explain import render_overlay
from mirage_demo.images import ImageSource, read_image
from mirage_demo.pretraining import (
    LAYER_NAMES,
    load_pretraining,
    load_release,
    release_path,
)

__all__ = [
    "LAYER_COLOURS",
    "SOURCES",
    "TINY_MIRAGE",
    "Reconstruction",
    "layer_legend_html",
    "load_reconstructor",
    "reconstruct_scan",
]

#: The bundled tiny MIRAGE (our masked pre-training, with its decoder).
TINY_MIRAGE = Path(__file__).resolve().parent.parent / "assets" / "tiny-mirage"
#: What the app may reconstruct with: name -> label (only these; never a path from a request).
SOURCES = {
    "tiny": "tiny MIRAGE (bundled, pre-trained here)",
    "mirage_base": "MIRAGE-Base (its release weights)",
    "mirage_large": "MIRAGE-Large (its release weights)",
}
HIDDEN_COLOUR = np.array([70, 90, 125], dtype=np.float32)  # the hidden patches, slate blue
DISPLAY_WIDTH = 512  # the pictures keep the scan's aspect ratio at this width
ERROR_SCALE = 0.5  # the difference map's colours span an absolute error of 0 to this
#: One colour per layer-map class (13), distinct on a grey scan.
LAYER_COLOURS = (
    "#000000", "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4",
    "#46f0f0", "#f032e6", "#bcf60c", "#fabebe", "#008080", "#9a6324",
)  # fmt: skip

_models: dict[str, MaskedReconstructor] = {}
_lock = threading.Lock()


def load_reconstructor(source: str) -> MaskedReconstructor:
    """The model behind a :data:`SOURCES` name, loaded once (MIRAGE's release weights are
    downloaded on first use; offline and not cached, a one-line error names the URL)."""
    if source not in SOURCES:
        raise ValueError(f"unknown reconstruction model {source!r}: one of {', '.join(SOURCES)}")
    with _lock:
        if source not in _models:
            if source == "tiny":
                _models[source] = load_pretraining(TINY_MIRAGE)[0]
            else:
                _models[source] = load_release(release_path(source))
        return _models[source]


@dataclass
class Reconstruction:
    """The pictures of one reconstruction and what to say about them."""

    masked: Image.Image  # the scan with its hidden patches painted over
    rebuilt: Image.Image  # the model's patches where hidden, the scan's own where visible
    difference: Image.Image  # |rebuilt - scan| on the hidden patches (black where visible)
    visible: int
    patches: int
    hidden_error: float  # mean absolute error on the hidden patches, on the [0, 1] scale
    seconds: float  # the model's forward pass
    layers: Image.Image | None = None  # MIRAGE's layer map over the scan
    slo: Image.Image | None = None  # MIRAGE's SLO predicted from the B-scan
    layer_classes: tuple[int, ...] = ()  # the layer-map classes present, for the legend

    def summary(self) -> str:
        """One plain sentence or two about what happened."""
        shown = self.visible / self.patches
        return (
            f"The model saw {self.visible} of the scan's {self.patches} patches ({shown:.0%}) "
            f"and rebuilt the other {self.patches - self.visible}. On the hidden patches its "
            f"pixels are off by {self.hidden_error:.3f} on average (0 = black, 1 = white)."
        )


def reconstruct_scan(
    model: MaskedReconstructor, source: ImageSource, ratio: float, seed: int
) -> Reconstruction:
    """Hide ``ratio`` of the scan's patches (chosen by ``seed``) and let ``model`` rebuild
    them. ``source``: a path, a PIL image or an array (unreadable: ``ImageReadError``)."""
    original = read_image(source)
    height, width = original.shape
    # MIRAGE's contract at the model's size: bilinear resize, min-max to [0, 1]
    preprocessing = Preprocessing(input_size=tuple(model.encoder.patch_embed.img_size))
    scan = preprocessing.resize_minmax(torch.from_numpy(original)[None])[None]  # (1, 1, H, W)
    rows, cols = model.grid
    visible = visible_patches(1, ratio, seed=seed, patches=rows * cols)
    started = time.perf_counter()
    out = model.reconstruct(scan, visible)
    seconds = time.perf_counter() - started
    hidden = patch_mask_image(~visible, scan.shape[-2:], model.patch)[0].numpy()
    image = scan[0, 0].numpy()
    rebuilt = np.where(hidden > 0, out["bscan"][0, 0].clamp(0, 1).numpy(), image)
    error = np.abs(rebuilt - image) * hidden
    size = (DISPLAY_WIDTH, max(1, round(DISPLAY_WIDTH * height / width)))
    grey = np.repeat(image[..., None] * 255.0, 3, axis=2)
    masked = np.where(hidden[..., None] > 0, HIDDEN_COLOUR, grey)
    result = Reconstruction(
        masked=_picture(masked.astype(np.uint8), size),
        rebuilt=_picture(_grey(rebuilt), size),
        difference=render_overlay(image, np.clip(error / ERROR_SCALE, 0, 1), "magma", 1.0).resize(
            size, Image.BILINEAR
        ),
        visible=int(visible.sum()),
        patches=rows * cols,
        hidden_error=float(error.sum() / max(hidden.sum(), 1.0)),
        seconds=seconds,
    )
    if "bscanlayermap" in out:
        classes = out["bscanlayermap"][0].argmax(0).numpy()
        result.layers = _layer_overlay(image, classes).resize(size, Image.BILINEAR)
        result.layer_classes = tuple(int(c) for c in np.unique(classes))
    if "slo" in out:
        result.slo = _picture(_grey(out["slo"][0, 0].clamp(0, 1).numpy()), (384, 384))
    return result


def _grey(image: np.ndarray) -> np.ndarray:
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _picture(pixels: np.ndarray, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(pixels).convert("RGB").resize(size, Image.BILINEAR)


def _layer_overlay(image: np.ndarray, classes: np.ndarray, opacity: float = 0.45) -> Image.Image:
    """The layer classes (a coarser grid) in their colours, blended over the scan."""
    palette = np.array([_rgb(c) for c in LAYER_COLOURS], dtype=np.uint8)
    coloured = Image.fromarray(palette[classes]).resize(image.shape[::-1], Image.NEAREST)
    base = Image.fromarray(_grey(image)).convert("RGB")
    return Image.blend(base, coloured, opacity)


def _rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def layer_legend_html(present: tuple[int, ...] = ()) -> str:
    """A colour swatch and name for each of MIRAGE's layer-map classes (those ``present``
    in bold)."""
    items = []
    for index, (name, colour) in enumerate(zip(LAYER_NAMES, LAYER_COLOURS, strict=True)):
        weight = "700" if index in present else "400"
        items.append(
            f'<span style="display:inline-flex;align-items:center;margin:2px 10px 2px 0;'
            f'font-weight:{weight}"><span style="width:14px;height:14px;background:{colour};'
            f'border:1px solid #888;margin-right:5px;display:inline-block"></span>'
            f"{name}</span>"
        )
    return '<div class="layer-legend">' + "".join(items) + "</div>"
