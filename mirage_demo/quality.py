"""Does an input look like an OCT B-scan? A cheap, documented check behind ``warnings``.

The model answers for any image; this check tells the user when the answer is meaningless.
All measures are taken on the image resized to 256x256:

``contrast``
    ``(p99 - p1) / full scale`` of the grayscale intensities (full scale: 255 for 8-bit images,
    65535 for 16-bit, 1 for float images in [0, 1]). Below :data:`CONTRAST_MIN` (0.04, about
    10 grey levels) the image is called blank. Real scans: 0.26 and up.
``colourfulness``
    Hasler & Süsstrunk (2003) on 8-bit RGB: ``hypot(std(rg), std(yb)) + 0.3 * hypot(mean(rg),
    mean(yb))`` with ``rg = R - G``, ``yb = (R + G) / 2 - B``. Grayscale scans score 0; colour
    photographs and fundus images score 30 and more. Above :data:`COLOURFULNESS_MAX` (10) the
    image is called a colour image.
``oct_score``
    ``layering + 0.5 * darkness`` on the min-maxed (1st-99th percentile) grayscale image:
    ``layering`` is the share of the (Gaussian sigma 2, Sobel) gradient energy along the
    vertical axis (0.5 for isotropic texture, near 1 for horizontal retinal layers), and
    ``darkness`` the fraction of pixels below a quarter of the range (a B-scan is mostly dark
    vitreous and choroid). Below :data:`OCT_SCORE_MIN` (0.65) the image is said not to look like
    a B-scan. On the 1,478 real Kermany scans the score ranges 0.71-1.45 (median 1.24); grayscale
    copies of 8 of 11 stock photographs shipped with matplotlib, scikit-learn and gradio score
    0.43-0.65, the other three 0.69-0.79: this measure catches many, not all, gray photos.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "COLOURFULNESS_MAX",
    "CONTRAST_MIN",
    "OCT_SCORE_MIN",
    "QualityReport",
    "assess",
    "assess_image",
    "colourfulness",
]

CONTRAST_MIN = 0.04
COLOURFULNESS_MAX = 10.0
OCT_SCORE_MIN = 0.65
ANALYSIS_SIZE = (256, 256)
_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})


@dataclass(frozen=True)
class QualityReport:
    """The measures and the warnings they raise (none: it looks like an OCT B-scan)."""

    contrast: float
    colourfulness: float
    layering: float
    darkness: float
    oct_score: float
    warnings: tuple[str, ...] = ()

    @property
    def looks_like_oct(self) -> bool:
        return not self.warnings

    def to_dict(self) -> dict[str, float | list[str]]:
        data = asdict(self)
        data["warnings"] = list(self.warnings)
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
    small = np.asarray(
        Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32)).resize(
            ANALYSIS_SIZE, Image.Resampling.BILINEAR
        )
    )
    low, high = np.percentile(small, [1, 99])
    contrast = float((high - low) / max(full_scale, 1e-12))
    colour = colourfulness(rgb) if rgb is not None else 0.0
    layering = darkness = 0.0
    warnings = []
    if contrast < CONTRAST_MIN:
        warnings.append(
            f"the image is almost uniform (contrast {contrast:.3f} < {CONTRAST_MIN}): "
            "blank, or not an OCT B-scan"
        )
    else:
        norm = np.clip((small - low) / (high - low), 0.0, 1.0)
        smooth = ndimage.gaussian_filter(norm, 2.0)
        grad_y, grad_x = ndimage.sobel(smooth, axis=0), ndimage.sobel(smooth, axis=1)
        energy_y, energy_x = float((grad_y**2).sum()), float((grad_x**2).sum())
        layering = energy_y / max(energy_y + energy_x, 1e-12)
        darkness = float((norm < 0.25).mean())
    oct_score = layering + 0.5 * darkness
    if colour > COLOURFULNESS_MAX:
        warnings.append(
            f"the image is in colour (colourfulness {colour:.0f} > {COLOURFULNESS_MAX:.0f}): "
            "OCT B-scans are grayscale; is it a photograph or a fundus image?"
        )
    if contrast >= CONTRAST_MIN and oct_score < OCT_SCORE_MIN:
        warnings.append(
            f"the image does not look like an OCT B-scan (OCT score {oct_score:.2f} < "
            f"{OCT_SCORE_MIN}: no horizontal layers on a dark background)"
        )
    return QualityReport(
        contrast=contrast,
        colourfulness=colour,
        layering=layering,
        darkness=darkness,
        oct_score=oct_score,
        warnings=tuple(warnings),
    )


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
    from mirage_demo.images import open_image, read_image

    if isinstance(source, str) or hasattr(source, "__fspath__"):
        with open_image(source) as image:
            return assess_image(image)
    if isinstance(source, Image.Image):
        source = open_image(source)
    gray = read_image(source)
    scale = full_scale_of(source, gray)
    return assess(gray, rgb_of(source, scale), scale)
