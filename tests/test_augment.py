import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from mirage_demo.augment import BatchAugmentation, inverse_affine


def reference(image, params, i, fill):
    """torchvision's per-image path with the same parameters."""
    if params["flip"][i]:
        image = TF.horizontal_flip(image)
    image = TF.affine(
        image,
        angle=float(params["angle"][i]),
        translate=[int(params["tx"][i]), int(params["ty"][i])],
        scale=float(params["scale"][i]),
        shear=[float(params["shear"][i]), 0.0],
        interpolation=InterpolationMode.BILINEAR,
        fill=fill,
    )
    return TF.adjust_brightness(image, float(params["brightness"][i]))


def test_geometry_matches_torchvision_affine():
    aug = BatchAugmentation(fill=0.0)
    images = torch.rand(8, 1, 40, 56)
    params = aug.sample(8, 40, 56, torch.Generator().manual_seed(0))
    params["flip"] = torch.tensor([True, False] * 4)
    out = aug.apply(images, params)
    for i in range(8):
        expected = reference(images[i], params, i, fill=None)  # zero padding
        torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=0)


def test_white_fill_outside_and_same_pixels_inside():
    aug = BatchAugmentation(fill=1.0)
    images = torch.rand(4, 1, 32, 32) * 0.5
    params = aug.sample(4, 32, 32, torch.Generator().manual_seed(1))
    params["scale"] = torch.full((4,), 0.9, dtype=torch.float64)  # shrink: border comes in
    params["brightness"] = torch.ones(4, dtype=torch.float64)
    out = aug.apply(images, params)
    # where the image is sampled fully inside or fully outside, it is torchvision's result
    coverage = BatchAugmentation(fill=0.0, brightness=0.0).apply(torch.ones_like(images), params)
    for i in range(4):
        expected = reference(images[i], params, i, fill=1.0)
        inside, outside = coverage[i] > 1 - 1e-6, coverage[i] < 1e-6
        assert outside.sum() > 20 and inside.sum() > 500
        torch.testing.assert_close(out[i][inside], expected[inside], atol=2e-5, rtol=0)
        assert torch.all(out[i][outside] == 1.0)


def test_parameters_follow_the_recipe_and_the_generator():
    aug = BatchAugmentation()
    p = aug.sample(4000, 100, 200, torch.Generator().manual_seed(0))
    assert p["angle"].abs().max() <= 10 and p["shear"].abs().max() <= 5
    assert p["tx"].abs().max() <= 20 and p["ty"].abs().max() <= 10
    assert torch.equal(p["tx"], p["tx"].round())
    assert p["scale"].min() >= 0.9 and p["scale"].max() <= 1.1
    assert p["brightness"].min() >= 0.8 and p["brightness"].max() <= 1.2
    assert p["flip"].float().mean() == pytest.approx(0.5, abs=0.05)
    images = torch.rand(3, 1, 16, 16)
    a = aug(images, torch.Generator().manual_seed(5))
    b = aug(images, torch.Generator().manual_seed(5))
    c = aug(images, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_identity_parameters_change_nothing():
    params = {
        "flip": torch.zeros(2, dtype=torch.bool),
        **{k: torch.zeros(2) for k in ("angle", "tx", "ty", "shear")},
        "scale": torch.ones(2),
        "brightness": torch.ones(2),
    }
    images = torch.rand(2, 1, 24, 24)
    torch.testing.assert_close(BatchAugmentation().apply(images, params), images)
    theta = inverse_affine(params)
    torch.testing.assert_close(theta, torch.eye(2, 3).expand(2, 2, 3))
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    torch.testing.assert_close(F.grid_sample(images, grid, align_corners=False), images)


def _identity_params(aug, batch, height, width):
    """Parameters that leave MIRAGE's recipe a no-op, so one device change is seen alone."""
    params = aug.sample(batch, height, width, torch.Generator().manual_seed(0))
    params |= {
        "flip": torch.zeros(batch, dtype=torch.bool),
        "angle": torch.zeros(batch, dtype=torch.float64),
        "tx": torch.zeros(batch, dtype=torch.float64),
        "ty": torch.zeros(batch, dtype=torch.float64),
        "scale": torch.ones(batch, dtype=torch.float64),
        "shear": torch.zeros(batch, dtype=torch.float64),
        "brightness": torch.ones(batch, dtype=torch.float64),
    }
    for key, neutral in (("curvature", 0), ("aspect", 1), ("gamma", 1), ("contrast", 1)):
        params[key] = torch.full((batch,), float(neutral), dtype=torch.float64)
    for key in ("offset", "blur", "speckle", "noise"):
        params[key] = torch.zeros(batch, dtype=torch.float64)
    return params


def test_mirage_recipe_is_unchanged_by_the_device_options():
    recipe = BatchAugmentation()
    assert not recipe.shifts_device
    assert set(recipe.sample(2, 8, 8)) == {
        "flip", "angle", "tx", "ty", "scale", "shear", "brightness",
    }  # fmt: skip
    assert BatchAugmentation.device_shift().shifts_device


def test_device_shift_with_neutral_parameters_is_the_identity():
    aug = BatchAugmentation.device_shift(fill=1.0)
    images = torch.rand(3, 1, 24, 40) * 0.9 + 0.05
    out = aug.apply(images, _identity_params(aug, 3, 24, 40))
    torch.testing.assert_close(out, images, atol=2e-3, rtol=0)


def test_curvature_bends_a_flat_layer_and_noise_is_seeded():
    aug = BatchAugmentation.device_shift(fill=0.0)
    images = torch.zeros(1, 1, 64, 64)
    images[:, :, 30:34, :] = 1.0  # one bright horizontal layer
    params = _identity_params(aug, 1, 64, 64)
    params["curvature"] = torch.tensor([0.15], dtype=torch.float64)
    bent = aug.apply(images, params)[0, 0]
    rows = (bent * torch.arange(64.0)[:, None]).sum(0) / bent.sum(0)  # the layer's row per column
    assert rows[32] - rows[0] > 3 and rows[32] - rows[-1] > 3  # edges moved against the centre
    g = torch.Generator().manual_seed(3)
    noisy = aug(torch.full((2, 1, 32, 32), 0.5), g)
    again = aug(torch.full((2, 1, 32, 32), 0.5), torch.Generator().manual_seed(3))
    torch.testing.assert_close(noisy, again)
    assert noisy.min() >= 0 and noisy.max() <= 1 and noisy.std() > 0
