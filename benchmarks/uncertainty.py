"""How far the prediction sets and the "unlike the training scans" flag hold: on the test split
and on shifted copies of it (as another clinic's device might give).

::

    python benchmarks/uncertainty.py --checkpoint assets/demo-model --data DATA [--extra DIR]

The checkpoint must carry its statistics (``python -m train.evaluate --checkpoint DIR --data DATA
--fit-uncertainty``). Its test split is rebuilt from its split record; each scan is decoded once
and shifted in memory, at its own size, by what differs between devices (seeded per scan):

- ``curvature``: the retina bent (a parabolic vertical warp of 6-14% of the height);
- ``crop``: a narrower field of view and another aspect (60-85% of each side, resized back to
  the original size);
- ``contrast``: gamma 0.5-0.7 or 1.5-2.2 and a raised background (+0.05-0.15);
- ``speckle``: multiplicative gamma speckle (shape 2-4) and additive noise (sigma 0.03-0.08);
- ``blur``: Gaussian blur (sigma 1.5-3 pixels at 496 rows);
- ``device``: all five at once, each milder (the "other device" copy).

Every copy goes through :meth:`mirage_demo.inference.Predictor.predict_batch`, the app's path.
Printed per copy: accuracy, the sets' coverage (overall and per class) and mean size, the share
flagged as unlike the training scans (the false-alarm rate on the clean split, the detection
rate on the shifted copies) and the share of the model's mistakes that carry a warning (a set of
2+ classes or the flag). ``--extra DIR``: also a labelled ``<CLASS>/*`` folder of scans none of
the splits holds (e.g. scans added after training). ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mirage_demo.data import Sample, load_dataset, read_image
from mirage_demo.inference import Prediction, Predictor
from mirage_demo.uncertainty import coverage_report

Shift = Callable[[np.ndarray, np.random.Generator, float], np.ndarray]


def curvature(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    height, width = image.shape
    bend = strength * rng.uniform(0.06, 0.14) * height * rng.choice([-1, 1])
    x = np.linspace(-1, 1, width)
    rows, cols = np.mgrid[:height, :width].astype(np.float32)
    return ndimage.map_coordinates(image, [rows + bend * x**2, cols], order=1, mode="constant")


def crop(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    height, width = image.shape
    keep = 1 - strength * rng.uniform(0.15, 0.4, size=2)
    h, w = int(height * keep[0]), int(width * keep[1])
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    part = image[top : top + h, left : left + w]
    return ndimage.zoom(part, (height / h, width / w), order=1)[:height, :width]


def contrast(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    gamma = rng.uniform(0.5, 0.7) if rng.random() < 0.5 else rng.uniform(1.5, 2.2)
    gamma = 1 + strength * (gamma - 1)
    return np.clip(image, 0, 1) ** gamma * (1 - 0.1 * strength) + strength * rng.uniform(0.05, 0.15)


def speckle(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    shape = rng.uniform(2, 4) / strength
    noisy = image * rng.gamma(shape, 1 / shape, image.shape)
    return noisy + rng.normal(0, strength * rng.uniform(0.03, 0.08), image.shape)


def blur(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    sigma = strength * rng.uniform(1.5, 3.0) * image.shape[0] / 496
    return ndimage.gaussian_filter(image, sigma)


SHIFTS: dict[str, Shift] = {
    "curvature": curvature,
    "crop": crop,
    "contrast": contrast,
    "speckle": speckle,
    "blur": blur,
}


def device(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All shifts at once, each at 60% strength."""
    for shift in SHIFTS.values():
        image = shift(image, rng, 0.6)
    return image


def as_uint8(image: np.ndarray) -> np.ndarray:
    image = image - image.min()
    return (np.clip(image / max(float(image.max()), 1e-6), 0, 1) * 255).astype(np.uint8)


def measure(
    predictor: Predictor, images: list[np.ndarray], labels: list[int], batch_size: int
) -> dict:
    results = predictor.predict_batch(images, batch_size=batch_size)
    assert all(isinstance(r, Prediction) for r in results)
    names = predictor.class_names
    sets = np.array([[c in r.prediction_set for c in names] for r in results])
    flagged = np.array([r.out_of_distribution for r in results])
    predicted = np.array([r.index for r in results])
    return coverage_report(names, sets, flagged, predicted, np.array(labels))


def line(name: str, report: dict) -> str:
    per_class = " ".join(
        f"{c} {v['coverage']:.2f}/{v['mean_set_size']:.2f}"
        for c, v in report["per_class"].items()
        if v["images"]
    )
    return (
        f"{name:<12} {report['images']:>5} {report['accuracy']:>5.3f} {report['coverage']:>8.3f} "
        f"{report['mean_set_size']:>5.2f} {report['flagged']:>7.3f} "
        f"{report['mistakes']:>5} {report['mistakes_warned'] or 0:>7.3f}   {per_class}"
    )


def decode(samples: list[Sample]) -> tuple[list[np.ndarray], list[int]]:
    images = []
    for sample in samples:
        gray = read_image(sample.path, str(sample.path))
        gray = (gray - gray.min()) / max(float(gray.max() - gray.min()), 1e-6)
        images.append(gray.astype(np.float32))
    return images, [s.label for s in samples]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="assets/demo-model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--extra", help="a labelled <CLASS>/* folder outside every split")
    parser.add_argument("--level", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--copies",
        nargs="+",
        default=["clean test", "device", *SHIFTS],
        choices=["clean test", "device", *SHIFTS],
        help="which copies of the test split (default: all)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    predictor = Predictor.from_pretrained(args.checkpoint, level=args.level)
    if predictor.uncertainty is None:
        parser.error(f"{args.checkpoint} has no uncertainty statistics: fit them first")
    data = load_dataset(args.data, predictor.config.split)
    if data.class_names != predictor.class_names:
        parser.error(f"{args.data} has classes {data.class_names}, not {predictor.class_names}")
    images, labels = decode(data.splits["test"])
    every: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
        "clean test": lambda image, rng: image,
        "device": device,
        **SHIFTS,
    }
    copies = {name: every[name] for name in args.copies}
    print(
        f"{args.checkpoint}: {len(images)} test scans, {args.level:.0%} sets "
        "(per class: coverage/mean set size)"
    )
    print(
        f"{'copy':<12} {'scans':>5} {'acc':>5} {'coverage':>8} {'size':>5} {'flagged':>7} "
        f"{'wrong':>5} {'warned':>7}"
    )
    figures = {}
    for name, shift in copies.items():
        shifted = [
            as_uint8(shift(image, np.random.default_rng([args.seed, i])))
            for i, image in enumerate(images)
        ]
        figures[name] = measure(predictor, shifted, labels, args.batch_size)
        print(line(name, figures[name]), flush=True)
    if args.extra:
        extra = load_dataset(args.extra, None)
        samples = [s for split in extra.splits.values() for s in split]
        extra_images, extra_labels = decode(samples)
        shifted = [as_uint8(image) for image in extra_images]
        figures["extra"] = measure(predictor, shifted, extra_labels, args.batch_size)
        print(line("extra", figures["extra"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
