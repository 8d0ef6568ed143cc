"""What an OCT device leaves in its images: the image side of "unlike the training scans".

A model trained to ignore what differs between devices (``--shift-augment``) hides a scan from
another device from its own features: its answer can be confidently wrong while its features
look ordinary. These statistics are taken from the image itself, before the model: what the
device and its export do to intensity mapping, background, speckle, noise and sharpness, and
the raw image's aspect ratio. :class:`~mirage_demo.uncertainty.StatisticsOOD` compares them
with the training scans'.

All but the aspect ratio are measured on a canonical copy: the grayscale image scaled to
[0, 1] by its full scale (255 for 8-bit), resized (area-averaged) to :data:`CANONICAL_ROWS`
rows, the width keeping the aspect ratio (64 to 1,024 columns). :data:`STAT_NAMES` lists them:

``aspect``
    log(width / height) of the image as given.
``q01`` ... ``q99``
    intensity percentiles (1, 5, 25, 50, 75, 95, 99): the device's intensity mapping.
``black``, ``white``
    the share of pixels below 0.02 and above 0.97 (clipped background; padding).
``dark_noise``
    the standard deviation of the fine detail (the image less its Gaussian blur, sigma 1) in
    the darker quarter of the pixels: the noise floor of the background.
``tissue_cv``
    the median local coefficient of variation (3x3) of the bright, unsaturated pixels: speckle.
``fine``, ``mid``
    the share of the variance in the fine detail (sigma < 1) and in the middle band (1-3).
``ac_h``, ``ac_v``, ``ac_h2``, ``ac_v2``
    the correlation of the fine detail with itself one pixel to the side and one pixel down,
    and of the middle band two pixels to the side and down: the speckle's grain and shape.
``edges``
    the mean gradient magnitude over the intensity range: sharpness.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["CANONICAL_ROWS", "STAT_NAMES", "downsized", "image_statistics", "jpeg_copy"]

CANONICAL_ROWS = 256
STAT_NAMES = (
    "aspect",
    "q01",
    "q05",
    "q25",
    "q50",
    "q75",
    "q95",
    "q99",
    "black",
    "white",
    "dark_noise",
    "tissue_cv",
    "fine",
    "mid",
    "ac_h",
    "ac_v",
    "ac_h2",
    "ac_v2",
    "edges",
)


def _canonical(gray: np.ndarray, full_scale: float) -> np.ndarray:
    height, width = gray.shape
    columns = int(np.clip(round(CANONICAL_ROWS * width / height), 64, 1024))
    scaled = np.clip(gray / max(full_scale, 1e-12), 0.0, 1.0).astype(np.float32)
    resample = Image.Resampling.BOX if height >= CANONICAL_ROWS else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(scaled).resize((columns, CANONICAL_ROWS), resample))


def _correlation(values: np.ndarray, axis: int, lag: int) -> float:
    moved = np.moveaxis(values, axis, 0)
    first, second = moved[:-lag].ravel(), moved[lag:].ravel()
    if first.std() == 0 or second.std() == 0:
        return 0.0
    return float(np.corrcoef(first, second)[0, 1])


def image_statistics(gray: np.ndarray, full_scale: float = 255.0) -> np.ndarray:
    """The :data:`STAT_NAMES` of a grayscale ``(H, W)`` image in its own intensity range
    (``full_scale``: that range's maximum): a float64 vector. A constant image gives finite
    values (its detail statistics are 0)."""
    height, width = gray.shape
    image = _canonical(gray, full_scale)
    quantiles = np.percentile(image, [1, 5, 25, 50, 75, 95, 99])
    blurred = ndimage.gaussian_filter(image, 1.0)
    fine = image - blurred
    mid = blurred - ndimage.gaussian_filter(image, 3.0)
    variance = float(image.var()) + 1e-8
    dark = image <= quantiles[2]
    dark_noise = float(fine[dark].std()) if dark.any() else 0.0
    mean = ndimage.uniform_filter(image, 3)
    spread = np.sqrt(np.maximum(ndimage.uniform_filter(image * image, 3) - mean * mean, 0.0))
    tissue = (image >= quantiles[4]) & (image < 0.97) & (mean > 1e-3)
    tissue_cv = float(np.median(spread[tissue] / mean[tissue])) if tissue.any() else 0.0
    grad_y, grad_x = np.gradient(blurred)
    edges = float(np.hypot(grad_x, grad_y).mean() / max(quantiles[6] - quantiles[0], 1e-3))
    return np.array(
        [
            np.log(width / height),
            *quantiles,
            float((image < 0.02).mean()),
            float((image > 0.97).mean()),
            dark_noise,
            tissue_cv,
            float(fine.var()) / variance,
            float(mid.var()) / variance,
            _correlation(fine, 1, 1),
            _correlation(fine, 0, 1),
            _correlation(mid, 1, 2),
            _correlation(mid, 0, 2),
            edges,
        ],
        dtype=np.float64,
    )


def downsized(gray: np.ndarray, max_width: int) -> Image.Image:
    """A grayscale image min-maxed to 8 bits and at most ``max_width`` pixels wide (Lanczos,
    aspect kept): how the app bundles its test scans (:mod:`mirage_demo.testscans`)."""
    low, high = float(gray.min()), float(gray.max())
    scaled = (gray - low) / (high - low) * 255.0 if high > low else gray * 0
    image = Image.fromarray(scaled.round().clip(0, 255).astype("uint8"), mode="L")
    if image.width > max_width:
        height = max(1, round(image.height * max_width / image.width))
        image = image.resize((max_width, height), Image.Resampling.LANCZOS)
    return image


def jpeg_copy(gray: np.ndarray, max_width: int, quality: int) -> np.ndarray:
    """:func:`downsized`, saved as a JPEG of ``quality`` and decoded again: ``(H', W')``
    float32 in 0-255 (a bundled copy, without the file)."""
    buffer = io.BytesIO()
    downsized(gray, max_width).save(buffer, "JPEG", quality=quality)
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return np.asarray(decoded.convert("L"), dtype=np.float32)
