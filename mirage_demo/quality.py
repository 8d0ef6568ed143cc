"""Is it an OCT B-scan at all? The quality gate behind the verdict ``"not_a_bscan"``.

The model answers for any image; this check, taken before the model and without it, decides
when the answer means nothing (:mod:`mirage_demo.verdict`). An image fails the gate, with a
reason in plain words in ``warnings``, when it is:

too small to read
    fewer than :data:`MIN_SIDE` (64) pixels on a side.
blank
    ``contrast`` = ``(p99 - p1) / full scale`` of the grayscale intensities (full scale: 255
    for 8-bit images, 65535 for 16-bit, 1 for float images in [0, 1]) below
    :data:`CONTRAST_MIN` (0.04, about 10 grey levels). Real scans: 0.26 and up.
in colour
    Hasler & Süsstrunk's (2003) ``colourfulness`` on 8-bit RGB, ``hypot(std(rg), std(yb)) + 0.3
    * hypot(mean(rg), mean(yb))`` with ``rg = R - G``, ``yb = (R + G) / 2 - B``, above
    :data:`COLOURFULNESS_MAX` (10). Grayscale scans score 0; colour photographs, fundus
    images, thickness maps and screenshots of heat maps 30 and more.
noise
    ``structure``: the share of the (min-maxed) image's variance left after a Gaussian blur of
    sigma 4 pixels, below :data:`STRUCTURE_MIN` (0.2): noise has none. Real scans: 0.40 and up.
without a dark background
    ``darkness``: the share of pixels below a quarter of the range (1st-99th percentile),
    below :data:`DARKNESS_MIN` (0.2): a B-scan is mostly dark vitreous and choroid. Real scans:
    0.27 and up.
without layers across it
    ``continuity`` below :data:`CONTINUITY_MIN` (0.6): retinal layers run across the whole
    scan, so each column's profile (top to bottom) recurs, a little higher or lower, 16 columns
    on (of 256). The median over the columns of the best correlation of the two profiles
    within 8 rows of shift: real scans 0.63 and up (median 0.97), other devices' too;
    checkerboards and portraits fall below.
without retinal layers
    ``oct_score`` = ``layering + 0.5 * darkness`` below :data:`OCT_SCORE_MIN` (0.7), where
    ``layering`` is the share of the gradient energy along the vertical axis (Gaussian blur of
    sigma 1, 2, 4 or 8 pixels, then Sobel; the largest of the four): 0.5 for isotropic
    texture (fundus and SLO images, most photographs), near 1 for horizontal layers.
    Real scans: 0.74 and up.

All measures but the size are taken on the image resized to 256x256. ``statistics`` also
carries what the device left in the image (:mod:`mirage_demo.imagestats`), for the
unlike-the-training-scans check; :class:`CheckedImages` gives both for image files, in a
data loader (the report of ``train.evaluate`` and the fitting of the check).

On the 3,184 real Kermany scans of ``../shared`` (and their copies downsized as the app
bundles them) the gate rejects none; what it rejects and lets through among images that are
not B-scans (the app then relies on the unlike-the-training-scans check) is measured in
``docs/trust.md`` (``benchmarks/quality_gate.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from mirage_demo.data import (
    FileImages,
    ImageReadError,
    Preprocessing,
    Sample,
    open_image,
    read_image,
)
from mirage_demo.imagestats import STAT_NAMES, image_statistics, jpeg_copy

__all__ = [
    "COLOURFULNESS_MAX",
    "CONTINUITY_MIN",
    "CONTRAST_MIN",
    "DARKNESS_MIN",
    "MIN_SIDE",
    "OCT_SCORE_MIN",
    "STRUCTURE_MIN",
    "CheckedImages",
    "QualityReport",
    "assess",
    "assess_image",
    "colourfulness",
]

MIN_SIDE = 64
CONTRAST_MIN = 0.04
COLOURFULNESS_MAX = 10.0
STRUCTURE_MIN = 0.2
DARKNESS_MIN = 0.2
OCT_SCORE_MIN = 0.7
CONTINUITY_MIN = 0.6
CONTINUITY_STEP = 16  # columns (of 256) between the two profiles compared
CONTINUITY_SHIFT = 8  # rows (of 256) a layer may rise or fall over that step
LAYERING_SIGMAS = (1.0, 2.0, 4.0, 8.0)
ANALYSIS_SIZE = (256, 256)
_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})


@dataclass(frozen=True)
class QualityReport:
    """The measures and the reasons the image fails the gate (none: it looks like an OCT
    B-scan), in plain words."""

    contrast: float
    colourfulness: float
    layering: float
    darkness: float
    oct_score: float
    warnings: tuple[str, ...] = ()
    structure: float = 0.0
    continuity: float = 0.0
    size: tuple[int, int] = (0, 0)  # (height, width) of the image as given
    statistics: tuple[float, ...] = ()  # mirage_demo.imagestats.STAT_NAMES, in order

    @property
    def looks_like_oct(self) -> bool:
        return not self.warnings

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["warnings"] = list(self.warnings)
        data["size"] = list(self.size)
        data["statistics"] = dict(zip(STAT_NAMES, self.statistics, strict=False))
        return data


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Süsstrunk's colourfulness of an 8-bit-range ``(H, W, 3)`` image."""
    rgb = rgb.astype(np.float32, copy=False)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = red - green
    yb = 0.5 * (red + green) - blue
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def assess(
    gray: np.ndarray, rgb: np.ndarray | None = None, full_scale: float = 255.0
) -> QualityReport:
    """Measure a grayscale ``(H, W)`` image (and its RGB version, if it has colours).

    ``gray`` is in its own intensity range, ``full_scale`` that range's maximum; ``rgb`` is an
    ``(h, w, 3)`` array in 0-255, any size.
    """
    height, width = gray.shape
    small = np.asarray(
        Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32)).resize(
            ANALYSIS_SIZE, Image.Resampling.BILINEAR
        )
    )
    low, high = np.percentile(small, [1, 99])
    contrast = float((high - low) / max(full_scale, 1e-12))
    colour = colourfulness(rgb) if rgb is not None else 0.0
    layering = darkness = structure = continuity = 0.0
    if contrast >= CONTRAST_MIN:
        norm = np.clip((small - low) / (high - low), 0.0, 1.0)
        layering = max(_layering(norm, sigma) for sigma in LAYERING_SIGMAS)
        darkness = float((norm < 0.25).mean())
        structure = float(ndimage.gaussian_filter(norm, 4.0).var() / max(norm.var(), 1e-12))
        continuity = _continuity(norm)
    oct_score = layering + 0.5 * darkness
    measures = dict(
        contrast=contrast,
        colourfulness=colour,
        layering=layering,
        darkness=darkness,
        oct_score=oct_score,
        structure=structure,
        continuity=continuity,
        size=(height, width),
    )
    statistics = tuple(float(v) for v in image_statistics(gray, full_scale))
    return QualityReport(**measures, warnings=tuple(_reasons(**measures)), statistics=statistics)


def _layering(norm: np.ndarray, sigma: float) -> float:
    """The vertical share of the gradient energy after a Gaussian blur of ``sigma``."""
    smooth = ndimage.gaussian_filter(norm, sigma)
    energy_y = float((ndimage.sobel(smooth, axis=0) ** 2).sum())
    energy_x = float((ndimage.sobel(smooth, axis=1) ** 2).sum())
    return energy_y / max(energy_y + energy_x, 1e-12)


def _continuity(norm: np.ndarray) -> float:
    """How far each column's profile recurs :data:`CONTINUITY_STEP` columns on, within
    :data:`CONTINUITY_SHIFT` rows of shift: the median over the columns of the best Pearson
    correlation (1: layers running across the image; about 0 for noise)."""
    smooth = ndimage.gaussian_filter(norm, 2.0)
    left, right = smooth[:, :-CONTINUITY_STEP], smooth[:, CONTINUITY_STEP:]
    left, right = left - left.mean(axis=0), right - right.mean(axis=0)
    # a shift only reorders a column's rows: its mean and spread stay, so both are taken once
    spread = np.maximum(np.sqrt((left**2).sum(axis=0) * (right**2).sum(axis=0)), 1e-12)
    best = np.full(left.shape[1], -1.0)
    for shift in range(-CONTINUITY_SHIFT, CONTINUITY_SHIFT + 1):
        shifted = np.roll(right, shift, axis=0)
        best = np.maximum(best, (left * shifted).sum(axis=0) / spread)
    return float(np.median(best))


def _reasons(
    *,
    contrast: float,
    colourfulness: float,
    darkness: float,
    oct_score: float,
    structure: float,
    continuity: float,
    size: tuple[int, int],
    **_: float,
) -> list[str]:
    """Why an image is not an OCT B-scan, in plain words (empty: it may be one)."""
    reasons = []
    if min(size) < MIN_SIDE:
        reasons.append(
            f"it is too small to read ({size[1]}x{size[0]} pixels; a B-scan needs at least "
            f"{MIN_SIDE} on each side)"
        )
    if colourfulness > COLOURFULNESS_MAX:
        reasons.append(
            "it is in colour, and OCT B-scans are grayscale: is it a photograph, a fundus "
            f"image or a screenshot? (colourfulness {colourfulness:.0f})"
        )
    if contrast < CONTRAST_MIN:
        reasons.append(f"it is almost uniform: blank (contrast {contrast:.3f})")
        return reasons
    if structure < STRUCTURE_MIN:
        reasons.append(f"it looks like noise, with no shapes in it (structure {structure:.2f})")
    elif darkness < DARKNESS_MIN:
        reasons.append(
            "it has no dark background, and a B-scan is mostly dark with bright layers "
            f"(dark share {darkness:.2f})"
        )
    elif continuity < CONTINUITY_MIN:
        reasons.append(
            "nothing in it runs across the image as retinal layers do: a B-scan's layers cross "
            f"it from side to side (continuity {continuity:.2f})"
        )
    elif oct_score < OCT_SCORE_MIN:
        reasons.append(
            "it shows no retinal layers: a B-scan shows bright horizontal layers on a dark "
            f"background (layer score {oct_score:.2f})"
        )
    return reasons


def full_scale_of(source: Image.Image | np.ndarray, gray: np.ndarray) -> float:
    """The maximum of an image's intensity range: 255 (8-bit), 65535 (16-bit), 1 (float)."""
    if isinstance(source, Image.Image):
        if source.mode.startswith("I;16"):
            return 65535.0
        if source.mode not in ("I", "F"):
            return 255.0
    elif np.issubdtype(source.dtype, np.integer):
        return float(np.iinfo(source.dtype).max)
    elif source.dtype == np.bool_:
        return 1.0
    peak = float(np.abs(gray).max()) if gray.size else 0.0
    for scale in (1.0, 255.0, 65535.0):
        if peak <= scale:
            return scale
    return peak


def rgb_of(source: Image.Image | np.ndarray, full_scale: float) -> np.ndarray | None:
    """A small 0-255 RGB copy of a colour image, ``None`` for a grayscale one."""
    if isinstance(source, Image.Image):
        if source.mode not in _COLOUR_MODES:
            return None
        image = source.convert("RGB")
    else:
        if source.ndim != 3 or source.shape[-1] not in (3, 4):
            return None
        scaled = source[..., :3].astype(np.float32) * (255.0 / max(full_scale, 1e-12))
        image = Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(image.resize(ANALYSIS_SIZE, Image.Resampling.BILINEAR))


def assess_image(source: str | Image.Image | np.ndarray) -> QualityReport:
    """Read an image (path, PIL image or array) and :func:`assess` it."""
    if isinstance(source, str) or hasattr(source, "__fspath__"):
        with open_image(source) as image:
            return assess_image(image)
    if isinstance(source, Image.Image):
        source = open_image(source)
    gray = read_image(source)
    scale = full_scale_of(source, gray)
    return assess(gray, rgb_of(source, scale), scale)


log = logging.getLogger(__name__)


class CheckedImages(FileImages):
    """:class:`~mirage_demo.data.FileImages` with each image's gate and statistics:
    ``(image, label, index, checked)``, ``checked`` a float32 vector: 1.0 when the image
    passes the gate (:func:`assess`), then its :data:`~mirage_demo.imagestats.STAT_NAMES`,
    then those of each of its ``copies``: the grayscale image downsized to ``(width, JPEG
    quality)`` (at most that wide), as the app bundles its scans. Each file is decoded once."""

    def __init__(
        self,
        samples: Sequence[Sample],
        preprocessing: Preprocessing,
        indices: Sequence[int] | None = None,
        copies: Sequence[tuple[int, int]] = (),
    ) -> None:
        super().__init__(samples, preprocessing, indices)
        self.copies = list(copies)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, int, torch.Tensor] | None:
        index = self.indices[item]
        sample = self.samples[index]
        name = str(sample.path)
        try:
            with open_image(sample.path, name) as image:
                gray = read_image(image, name)
                scale = full_scale_of(image, gray)
                report = assess(gray, rgb_of(image, scale), scale)
        except ImageReadError as err:
            log.warning("skipping unreadable image: %s", err)
            return None
        checked = [float(report.looks_like_oct), *report.statistics]
        for width, quality in self.copies:
            checked += image_statistics(jpeg_copy(gray, width, quality)).tolist()
        tensor = self.preprocessing.resize_minmax(torch.from_numpy(gray)[None])
        return tensor, sample.label, index, torch.tensor(checked, dtype=torch.float32)
