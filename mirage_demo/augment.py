"""MIRAGE's fine-tuning augmentation for a whole batch at once, on the batch's device.

:class:`BatchAugmentation`'s defaults are MIRAGE's recipe, written once (horizontal flip,
affine with 10 deg rotation, 0.1 translation, 0.9-1.1 scale and 5 deg shear, white fill,
intensity x0.8-1.2); :meth:`BatchAugmentation.torchvision` gives the same recipe as per-image
torchvision transforms. The batch version has the geometry of torchvision's ``affine`` (checked
by the tests), but every image
gets its own parameters and the whole batch is warped by one ``grid_sample``. On a GPU this
costs next to nothing, so data loader workers only copy cached pixels; parameters are drawn
from an explicit generator, so a run is reproducible and resumable.

Other OCT devices differ in what MIRAGE's recipe leaves alone: how the retina curves and tilts,
the scan's width and aspect ratio, contrast and gamma, intensity offset, sharpness, speckle and
noise level. :meth:`BatchAugmentation.device_shift` adds those (all off by default, so the
defaults stay MIRAGE's recipe): curvature bends every column up or down by a parabola across
the width, ``aspect`` stretches the width against the height, then intensity (gamma, contrast
about the mean, brightness, offset), a Gaussian blur and multiplicative speckle plus additive
noise, each of random strength per image.

One deliberate difference: on the one-pixel seam where bilinear sampling straddles the image
border, ``fill`` acts as plain padding (torchvision weights the image by its coverage twice).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["BatchAugmentation"]


@dataclass(frozen=True)
class BatchAugmentation:
    """Random flip, affine and brightness, independently per image of a ``(B, C, H, W)`` batch.

    Images are floats in [0, 1] (before mean/std normalisation); ``fill`` is the value of the
    pixels the affine brings in from outside (1.0, white, for Kermany's white-padded scans).
    """

    flip: float = 0.5
    degrees: float = 10.0
    translate: float = 0.1
    scale: tuple[float, float] = (0.9, 1.1)
    shear: float = 5.0
    brightness: float = 0.2
    fill: float = 1.0
    curvature: float = 0.0  # columns shift by up to this share of the height at the edges
    aspect: float = 1.0  # width stretched by a factor in [1/aspect, aspect] (log-uniform)
    gamma: float = 1.0  # x ** g, g in [1/gamma, gamma] (log-uniform)
    contrast: float = 0.0  # (x - mean) * c + mean, c in [1 - contrast, 1 + contrast]
    offset: float = 0.0  # + o, o in [-offset, offset]
    blur: float = 0.0  # Gaussian sigma in [0, blur] pixels of the model input
    speckle: float = 0.0  # x * (1 + s * N(0, 1)), s in [0, speckle]
    noise: float = 0.0  # + n * N(0, 1), n in [0, noise]

    @classmethod
    def device_shift(cls, fill: float = 1.0) -> BatchAugmentation:
        """MIRAGE's recipe plus what differs between OCT devices (the ranges are a guess at
        the spread of commercial devices, wide enough to cover it, not fitted to any)."""
        return cls(
            fill=fill,
            curvature=0.08,
            aspect=1.3,
            gamma=1.5,
            contrast=0.3,
            offset=0.08,
            blur=1.2,
            speckle=0.25,
            noise=0.06,
        )

    @property
    def shifts_device(self) -> bool:
        return (self.curvature, self.aspect, self.gamma) != (0.0, 1.0, 1.0) or any(
            (self.contrast, self.offset, self.blur, self.speckle, self.noise)
        )

    def torchvision(self, fill: float | None = None) -> list[Callable[[Any], Any]]:
        """The same recipe as torchvision transforms of one image at a time (tensor or PIL;
        ``fill`` overrides :attr:`fill`, e.g. 255 for 8-bit PIL images)."""
        from torchvision.transforms import InterpolationMode, v2

        return [
            v2.RandomHorizontalFlip(p=self.flip),
            v2.RandomAffine(
                degrees=self.degrees,
                translate=(self.translate, self.translate),
                scale=self.scale,
                shear=self.shear,
                interpolation=InterpolationMode.BILINEAR,
                fill=self.fill if fill is None else fill,
            ),
            v2.ColorJitter(brightness=self.brightness),
        ]

    def sample(
        self, batch: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-image parameters, drawn on the CPU (torchvision's distributions)."""

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.rand(batch, generator=generator, dtype=torch.float64) * (high - low) + low

        params = {
            "flip": torch.rand(batch, generator=generator) < self.flip,
            "angle": uniform(-self.degrees, self.degrees),
            "tx": uniform(-self.translate * width, self.translate * width).round(),
            "ty": uniform(-self.translate * height, self.translate * height).round(),
            "scale": uniform(*self.scale),
            "shear": uniform(-self.shear, self.shear),
            "brightness": uniform(1 - self.brightness, 1 + self.brightness),
        }
        if not self.shifts_device:  # MIRAGE's recipe draws exactly what it always drew
            return params
        log_aspect, log_gamma = math.log(self.aspect), math.log(self.gamma)
        params |= {
            "curvature": uniform(-self.curvature, self.curvature),
            "aspect": uniform(-log_aspect, log_aspect).exp(),
            "gamma": uniform(-log_gamma, log_gamma).exp(),
            "contrast": uniform(1 - self.contrast, 1 + self.contrast),
            "offset": uniform(-self.offset, self.offset),
            "blur": uniform(0.0, self.blur),
            "speckle": uniform(0.0, self.speckle),
            "noise": uniform(0.0, self.noise),
            "noise_seed": torch.randint(0, 2**62, (1,), generator=generator),
        }
        return params

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Augmented copy of ``images``."""
        batch, _, height, width = images.shape
        return self.apply(images, self.sample(batch, height, width, generator))

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply given parameters (flip, then affine, then brightness)."""
        height, width = images.shape[-2:]
        theta = inverse_affine(params).to(device=images.device, dtype=images.dtype)
        # flip first: sample the input at x -> -x, i.e. negate the x row of the map
        theta[:, 0, :] *= torch.where(params["flip"], -1.0, 1.0).to(theta)[:, None]
        shifted = "curvature" in params
        if shifted:  # the width stretched by `aspect`: the input sampled at x / aspect
            theta[:, 0, :] /= params["aspect"].to(theta)[:, None]
        grid = _affine_grid(theta, height, width)
        if shifted:
            grid = _bend(grid, params["curvature"].to(grid))
        warped = F.grid_sample(
            images - self.fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        factor = params["brightness"].to(device=images.device, dtype=images.dtype)
        out = ((warped + self.fill) * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
        return _device_intensity(out, params) if shifted else out


def _per_image(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def _bend(grid: torch.Tensor, curvature: torch.Tensor) -> torch.Tensor:
    """Shift each output column's sampling row by a parabola across the width (zero mean):
    the retina bends by up to ``curvature`` of the height at the edges."""
    x = grid[..., 0].detach().clamp(-1.0, 1.0)
    bend = curvature.view(-1, 1, 1) * 2.0 * (x.square() - 1.0 / 3.0)
    return torch.stack([grid[..., 0], grid[..., 1] + bend], dim=-1)


def _device_intensity(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Gamma, contrast about each image's mean, offset, blur, then speckle and noise."""
    x = images.clamp(1e-6, 1.0).pow(_per_image(params["gamma"], images))
    mean = x.mean(dim=(-2, -1), keepdim=True)
    x = (x - mean) * _per_image(params["contrast"], x) + mean + _per_image(params["offset"], x)
    x = _gaussian_blur(x, params["blur"])
    generator = torch.Generator(device=x.device).manual_seed(int(params["noise_seed"]))
    speckle = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x = (
        x * (1 + _per_image(params["speckle"], x) * speckle)
        + _per_image(params["noise"], x) * noise
    )
    return x.clamp_(0.0, 1.0)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """Separable Gaussian blur with each image's own ``sigma`` (0: unchanged)."""
    batch, chans, height, width = images.shape
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    s = sigma.to(device=images.device, dtype=images.dtype).clamp(min=1e-3).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / s).square())
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(chans, dim=0)
    x = images.reshape(1, batch * chans, height, width)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(-1, 1, 1, 2 * radius + 1), groups=batch * chans)
    x = F.conv2d(x, kernel.view(-1, 1, 2 * radius + 1, 1), groups=batch * chans)
    return x.view(batch, chans, height, width)


def inverse_affine(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, 2, 3)`` output-to-input maps in pixel units about the image centre.

    torchvision's ``_get_inverse_affine_matrix`` for a batch (centre 0, shear along x only):
    the inverse of ``T * RotateScaleShear``.
    """
    rot = params["angle"].double() * (math.pi / 180)
    sx = params["shear"].double() * (math.pi / 180)
    scale = params["scale"].double()
    tx, ty = params["tx"].double(), params["ty"].double()
    # RotateScaleShear without the scale: R(a) * SHx(sx); its determinant is 1
    a, c = torch.cos(rot), torch.sin(rot)
    b = -torch.cos(rot) * torch.tan(sx) - torch.sin(rot)
    d = -torch.sin(rot) * torch.tan(sx) + torch.cos(rot)
    m00, m01, m10, m11 = d / scale, -b / scale, -c / scale, a / scale
    theta = torch.stack(
        [
            torch.stack([m00, m01, -(m00 * tx + m01 * ty)], dim=1),
            torch.stack([m10, m11, -(m10 * tx + m11 * ty)], dim=1),
        ],
        dim=1,
    )
    return theta.float()


def _affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Sampling grid for ``grid_sample`` (pixel-centred coordinates, as torchvision)."""
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=theta.device)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=theta.device)
    base = torch.stack(
        [
            xs.to(theta.dtype).expand(height, width),
            ys.to(theta.dtype)[:, None].expand(height, width),
            torch.ones(height, width, dtype=theta.dtype, device=theta.device),
        ],
        dim=-1,
    ).view(1, height * width, 3)
    scale = torch.tensor([0.5 * width, 0.5 * height], dtype=theta.dtype, device=theta.device)
    grid = base.expand(theta.shape[0], -1, -1).bmm(theta.transpose(1, 2) / scale)
    return grid.view(theta.shape[0], height, width, 2)
