"""Synthetic OCT-like B-scans and a tiny trained classifier for the inference tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch

import mirage_demo  # noqa: F401  (registers the mirage_* models)
from mirage_demo.checkpoint import CheckpointConfig, save_checkpoint
from mirage_demo.data import Preprocessing

CLASSES = ["NORMAL", "LESION"]
TINY_KWARGS = {"img_size": 128, "depth": 2}
SCAN_SIZE = (96, 144)  # (height, width): not the model's square input


def oct_like(
    height: int = 248, width: int = 384, band_center: float = 0.5, seed: int = 0
) -> np.ndarray:
    """A grayscale uint8 image with OCT's look: speckled dark background, bright curved
    horizontal layers."""
    rng = np.random.default_rng(seed)
    y = np.arange(height)[:, None] / height
    x = np.arange(width)[None, :] / width
    surface = band_center + 0.05 * np.sin(2 * np.pi * x + rng.uniform(0, 6))
    image = 0.08 + 0.05 * rng.random((height, width))
    layers = [(0.0, 0.02, 0.9), (0.06, 0.04, 0.5), (0.16, 0.02, 1.0), (0.2, 0.05, 0.6)]
    for offset, thickness, brightness in layers:
        image += brightness * np.exp(-(((y - surface - offset) / thickness) ** 2))
    image *= rng.gamma(4.0, 0.25, size=image.shape)  # speckle
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def lesion_scan(label: int, seed: int) -> tuple[np.ndarray, tuple[int, int] | None]:
    """A synthetic scan of class ``label``: LESION (1) has a bright round blob above the
    retina. Returns the image and the blob's centre (row, column) or ``None``."""
    rng = np.random.default_rng(seed)
    height, width = SCAN_SIZE
    image = oct_like(height, width, band_center=rng.uniform(0.45, 0.6), seed=seed)
    image = image.astype(np.float32)
    centre = None
    if label == 1:
        centre = (int(rng.uniform(0.1, 0.3) * height), int(rng.uniform(0.15, 0.85) * width))
        rows, cols = np.mgrid[:height, :width]
        blob = np.exp(-(((rows - centre[0]) / 8) ** 2 + ((cols - centre[1]) / 12) ** 2))
        image += 255 * blob
    return np.clip(image, 0, 255).astype(np.uint8), centre


def train_on_lesions(
    model: torch.nn.Module,
    preprocessing: Preprocessing,
    steps: int = 80,
    lr: float = 2e-3,
    seed: int = 0,
) -> torch.nn.Module:
    """Train ``model`` (2 outputs) to tell :func:`lesion_scan` 1 from 0, on one CPU thread
    (a model this small runs faster on one); returns it in eval mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        for step in range(steps):
            labels = [(step * 16 + i) % 2 for i in range(16)]
            batch = torch.stack(
                [
                    preprocessing(lesion_scan(label, 1000 + step * 16 + i)[0])
                    for i, label in enumerate(labels)
                ]
            )
            loss = torch.nn.functional.cross_entropy(model(batch), torch.tensor(labels))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def lesion_margin(heatmap: np.ndarray, centre: tuple[int, int], radius: float = 15) -> float:
    """Mean heat within ``radius`` pixels of the lesion's centre minus the mean elsewhere:
    positive when the map points at the lesion."""
    rows, cols = np.mgrid[: heatmap.shape[0], : heatmap.shape[1]]
    near = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
    return float(heatmap[near].mean() - heatmap[~near].mean())


def train_tiny_checkpoint(directory: Path, steps: int = 80, temperature: float = 1.7) -> Path:
    """Train ``mirage_tiny_patch32_512`` (128 px, 2 blocks) on :func:`lesion_scan` and save it
    as a checkpoint directory. About 4 s on one CPU thread."""
    torch.manual_seed(0)
    model = timm.create_model("mirage_tiny_patch32_512", num_classes=2, **TINY_KWARGS)
    preprocessing = Preprocessing.from_model(model)
    train_on_lesions(model, preprocessing, steps)
    config = CheckpointConfig(
        architecture="mirage_tiny_patch32_512",
        class_names=list(CLASSES),
        preprocessing=preprocessing,
        model_kwargs=dict(TINY_KWARGS),
        temperature=temperature,
        training={"steps": steps, "task": "synthetic lesion_scan"},
    )
    return save_checkpoint(directory, model, config)
