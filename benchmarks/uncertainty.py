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
- ``device``: all five at once, each milder (the "all shifts" copy);

and three guesses at whole other devices, each a raw image of another size and aspect, a
narrower field of view, a deeper scan window (more dark rows below), single-frame speckle
applied to the intensity made linear again (a random power 1.5-2.5), a noise floor, another
display mapping and some blur (:func:`other_device`; none fitted to a real device):

- ``cirrus-like``: 60-80% of the field, 512 or 1,024 columns by 1,024 rows;
- ``topcon-like``: 70-90% of the field, 512 columns by 885 rows;
- ``bioptigen-like``: 60-90% of the field, 1,000 columns by 512 or 1,024 rows.

``bundled copy`` is the test split as the app bundles it (384 pixels wide, JPEG 70): the app's
own copies must keep their verdicts.

Every copy goes through :meth:`mirage_demo.inference.Predictor.predict_batch`, the app's path.
Printed per copy: accuracy, the sets' coverage (overall and per class) and mean size, the share
flagged as unlike the training scans (the false-alarm rate on the clean split, the detection
rate on the shifted copies), the share of the model's mistakes that carry a warning (any
verdict but sure), and the verdicts: the share of each (not a B-scan, unlike training,
unsure, sure), the accuracy among the sure ones and the share of all scans called sure and
wrong. Then the images of ``tests/non_bscans.py`` and the stock photographs of
``benchmarks/quality_gate.py``: the verdict of each. ``--extra DIR``: also a labelled
``<CLASS>/*`` folder of scans none of the splits holds (e.g. scans added after training).
``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mirage_demo.data import Sample, load_dataset, read_image
from mirage_demo.imagestats import jpeg_copy
from mirage_demo.inference import Prediction, Predictor
from mirage_demo.testscans import JPEG_QUALITY, MAX_WIDTH
from mirage_demo.uncertainty import DEFAULT_LEVEL, coverage_report
from mirage_demo.verdict import VERDICTS, verdict_words

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


#: (share of the field kept, raw sizes (columns, rows) to draw from) of each guessed device
DEVICES = {
    "cirrus-like": ((0.6, 0.8), [(512, 1024), (1024, 1024)]),
    "topcon-like": ((0.7, 0.9), [(512, 885)]),
    "bioptigen-like": ((0.6, 0.9), [(1000, 512), (1000, 1024)]),
}


def other_device(image: np.ndarray, rng: np.random.Generator, kind: str) -> np.ndarray:
    """A B-scan as a guessed other device might give it (see the module's docstring)."""
    (low, high), sizes = DEVICES[kind]
    height, width = image.shape
    kept = int(width * rng.uniform(low, high))
    left = rng.integers(0, width - kept + 1)
    part = image[:, left : left + kept]
    below = np.full((int(height * rng.uniform(0, 0.6)), kept), np.percentile(part, 5))
    part = np.concatenate([part, below.astype(np.float32)])
    size = sizes[rng.integers(len(sizes))]
    resized = np.asarray(Image.fromarray(part.astype(np.float32)).resize(size, Image.BILINEAR))
    linear = np.clip(resized, 0, 1) ** rng.uniform(1.5, 2.5)
    shape = rng.uniform(1.0, 3.0)
    linear = linear * rng.gamma(shape, 1 / shape, linear.shape)
    linear += rng.uniform(0.005, 0.03) * rng.gamma(1.0, 1.0, linear.shape)
    shown = np.clip(linear, 0, None) ** (1 / rng.uniform(1.8, 3.0))
    return ndimage.gaussian_filter(shown, rng.uniform(0.3, 1.2))


def as_uint8(image: np.ndarray) -> np.ndarray:
    image = image - image.min()
    return (np.clip(image / max(float(image.max()), 1e-6), 0, 1) * 255).astype(np.uint8)


def measure(
    predictor: Predictor, images: list[np.ndarray], labels: list[int], batch_size: int
) -> dict:
    results = predictor.predict_batch(images, batch_size=batch_size)
    assert all(isinstance(r, Prediction) for r in results)
    return coverage_report(
        predictor.class_names,
        [r.prediction_set for r in results],
        [r.out_of_distribution for r in results],
        np.array([r.index for r in results]),
        np.array(labels),
        [r.trust for r in results],  # the verdicts the app gave
    )


def line(name: str, report: dict) -> str:
    per_class = " ".join(
        f"{c} {v['coverage']:.2f}/{v['mean_set_size']:.2f}"
        for c, v in report["per_class"].items()
        if v["images"]
    )
    verdicts = report["verdicts"]
    shares = " ".join(f"{verdicts[v]['share']:>6.3f}" for v in VERDICTS)
    sure = verdicts["sure"]["accuracy"]
    return (
        f"{name:<15} {report['images']:>5} {report['accuracy']:>5.3f} {report['coverage']:>8.3f} "
        f"{report['mean_set_size']:>5.2f} {report['flagged']:>7.3f} "
        f"{report['mistakes']:>5} {report['mistakes_warned'] or 0:>7.3f} {shares} "
        f"{sure if sure is not None else float('nan'):>7.3f} {verdicts['sure_and_wrong']:>7.3f}"
        f"   {per_class}"
    )


def decode(samples: list[Sample]) -> tuple[list[np.ndarray], list[int]]:
    images = []
    for sample in samples:
        gray = read_image(sample.path, str(sample.path))
        gray = (gray - gray.min()) / max(float(gray.max() - gray.min()), 1e-6)
        images.append(gray.astype(np.float32))
    return images, [s.label for s in samples]


def copies_of() -> dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]]:
    """Every copy of the split, by name (the images are min-maxed floats at their own size)."""
    every: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
        "clean": lambda image, rng: image,
        "bundled copy": lambda image, rng: jpeg_copy(image, MAX_WIDTH, JPEG_QUALITY) / 255.0,
        "device": device,
        **SHIFTS,
    }
    for kind in DEVICES:
        every[kind] = lambda image, rng, kind=kind: other_device(image, rng, kind)
    return every


def non_bscan_verdicts(predictor: Predictor) -> dict[str, str | None]:
    """The verdict of each image that is not a B-scan (tests/non_bscans.py and the stock
    photographs of benchmarks/quality_gate.py)."""
    from quality_gate import stock_photographs

    from tests.non_bscans import non_bscans

    images = {**non_bscans(), **stock_photographs()}
    results = predictor.predict_batch(list(images.values()), batch_size=8)
    return {name: r.trust for name, r in zip(images, results, strict=True)}


def main(argv: list[str] | None = None) -> int:
    every = copies_of()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="assets/demo-model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--every", type=int, default=1, help="every n-th scan of the split")
    parser.add_argument("--extra", help="a labelled <CLASS>/* folder outside every split")
    parser.add_argument("--level", type=float, default=DEFAULT_LEVEL)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--copies", nargs="+", default=list(every), choices=list(every), help="default: all"
    )
    parser.add_argument("--no-non-bscans", action="store_true", help="skip the non-B-scans")
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
    images, labels = decode(data.splits[args.split][:: max(1, args.every)])
    print(
        f"{args.checkpoint}: {len(images)} {args.split} scans, {args.level:.0%} sets "
        "(per class: coverage/mean set size)"
    )
    verdicts = " ".join(f"{v[:7]:>6}" for v in VERDICTS)
    print(
        f"{'copy':<15} {'scans':>5} {'acc':>5} {'coverage':>8} {'size':>5} {'flagged':>7} "
        f"{'wrong':>5} {'warned':>7} {verdicts} {'sure ok':>7} {'sure+wr':>7}"
    )
    figures: dict[str, dict] = {}
    for name in args.copies:
        shifted = [
            as_uint8(every[name](image, np.random.default_rng([args.seed, i])))
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
    if not args.no_non_bscans:
        found = non_bscan_verdicts(predictor)
        figures["not B-scans"] = found
        for verdict in (*VERDICTS, None):
            names = [n for n, v in found.items() if v == verdict]
            if names:
                print(f"not B-scans, {verdict_words(verdict)}: {len(names)}: {', '.join(names)}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
