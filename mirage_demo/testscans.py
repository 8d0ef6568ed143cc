"""A checkpoint's test scans with its predictions: what the confusion-matrix explorer and the quiz
show.

A checkpoint's ``predictions.csv`` (``file,true,predicted,prob_<CLASS>...``) names its test
images relative to the data folder it was trained on. :func:`scan_set_for` finds them:

1. the **bundled copies** in ``assets/test-scans/`` (downsized grayscale JPEGs and one manifest per
   bundled model, ``<checkpoint folder name>.json``), used only when the manifest was built from
   this very ``predictions.csv`` (its SHA-256 is recorded);
2. the **original images**, inside one of the data folders the caller allows (``roots``: the
   folders the app's operator names, or an adapted model's own uploaded scans). A checkpoint is
   untrusted data: the data folder its ``config.json`` names is never used, and a file name
   that leads out of the folder (``..``, an absolute path, a link) finds nothing;
3. otherwise nothing, with a sentence saying why.

A ``predictions.csv`` of more than :data:`MAX_PREDICTION_ROWS` rows (or
:data:`MAX_PREDICTIONS_BYTES`) is refused unread.

Build (or rebuild, after retraining) the bundled copies from the original images::

    python -m mirage_demo.testscans --data DATA assets/demo-model assets/demo-vit

It rewrites ``assets/test-scans/`` as a whole: images shared by several models are stored once;
each manifest holds class, prediction and probabilities per scan, and where the data folder's
``manifest.csv`` gives it, the public repository each image was copied from (Kermany et al. 2018,
CC BY 4.0: see ``assets/ATTRIBUTION.md``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mirage_demo.checkpoint import CheckpointError, read_config
from mirage_demo.fileio import atomic_write_text
from mirage_demo.images import ImageReadError, read_image
from mirage_demo.imagestats import downsized as downsized_image

__all__ = [
    "BUNDLED_SCANS",
    "MAX_PREDICTION_ROWS",
    "ScanEntry",
    "ScanSet",
    "build_bundle",
    "inside",
    "read_predictions",
    "scan_set_for",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_SCANS = REPO_ROOT / "assets" / "test-scans"
MAX_WIDTH = 384
MAX_PREDICTION_ROWS = 10_000  # a test set's predictions (the bundled models': 452)
MAX_PREDICTIONS_BYTES = 4_000_000  # 10,000 rows of four classes: about 1 MB
JPEG_QUALITY = 70  # OCT speckle is costly to encode: at 85, 404 scans took 10.9 MB; at 70, 7.2 MB
ATTRIBUTION = (
    "Kermany, Zhang, Goldbaum (2018), Labeled Optical Coherence Tomography (OCT) and Chest X-Ray "
    "Images for Classification, Mendeley Data V2, doi:10.17632/rscbjbr9sj; CC BY 4.0. "
    "Downsized grayscale copies."
)


@dataclass(frozen=True)
class ScanEntry:
    """One test scan: its name in ``predictions.csv``, the image to show, the reference class,
    the model's prediction and probabilities."""

    file: str
    image: Path
    true: str
    predicted: str
    probabilities: dict[str, float]

    @property
    def correct(self) -> bool:
        return self.true == self.predicted


@dataclass
class ScanSet:
    """A model's test scans by cell of its confusion matrix."""

    class_names: list[str]
    entries: list[ScanEntry]
    origin: str  # a phrase for people: "bundled downsized copies", "the original images in ..."

    def cell(self, true: str, predicted: str) -> list[ScanEntry]:
        """The scans of class ``true`` predicted as ``predicted``, most confident first."""
        chosen = [e for e in self.entries if e.true == true and e.predicted == predicted]
        return sorted(chosen, key=lambda e: -e.probabilities.get(predicted, 0.0))

    def matrix(self) -> list[list[int]]:
        """Counts, rows the reference class and columns the prediction."""
        index = {name: i for i, name in enumerate(self.class_names)}
        counts = [[0] * len(self.class_names) for _ in self.class_names]
        for entry in self.entries:
            counts[index[entry.true]][index[entry.predicted]] += 1
        return counts


def read_predictions(path: str | Path, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a ``predictions.csv``: ``{"file", "true", "predicted", "probabilities"}``.

    Raises :class:`ValueError` naming the problem when the file does not match the classes.
    """
    path = Path(path)
    if path.stat().st_size > MAX_PREDICTIONS_BYTES:
        raise ValueError(f"{path.name} is larger than {MAX_PREDICTIONS_BYTES / 1e6:.0f} MB")
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        expected = {"file", "true", "predicted", *(f"prob_{c}" for c in class_names)}
        missing = expected - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path.name} lacks the columns {', '.join(sorted(missing))}")
        rows = []
        for number, row in enumerate(reader, start=2):
            if number > MAX_PREDICTION_ROWS + 1:
                raise ValueError(f"{path.name} holds more than {MAX_PREDICTION_ROWS:,} rows")
            if row["true"] not in class_names or row["predicted"] not in class_names:
                raise ValueError(f"{path.name} line {number}: a class the model does not know")
            probabilities = {c: float(row[f"prob_{c}"]) for c in class_names}
            rows.append(
                {
                    "file": row["file"],
                    "true": row["true"],
                    "predicted": row["predicted"],
                    "probabilities": probabilities,
                }
            )
    return rows


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def inside(root: str | Path, name: str | Path) -> Path | None:
    """``root / name`` when it is a file inside ``root`` once resolved (no ``..``, absolute
    path or link leading out), else ``None``."""
    try:
        base = Path(root).resolve()
        path = (base / name).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return path if path.is_relative_to(base) and path.is_file() else None


def scan_set_for(
    checkpoint: str | Path, bundled: str | Path = BUNDLED_SCANS, roots: Sequence[str | Path] = ()
) -> tuple[ScanSet | None, str]:
    """A checkpoint directory's test scans and a sentence saying where they come from, or
    ``None`` and a sentence saying why they cannot be shown. Images are looked up only in
    ``bundled`` (the manifest of this very predictions.csv) and in the allowed ``roots``."""
    checkpoint = Path(checkpoint)
    predictions = checkpoint / "predictions.csv"
    if not predictions.is_file():
        return None, (
            "This model comes without the answers it gave on its test scans, so there are no "
            "test scans to explore."
        )
    try:
        config = read_config(checkpoint)
        rows = read_predictions(predictions, config.class_names)
    except (CheckpointError, ValueError, OSError) as err:
        return None, f"The test predictions cannot be read: {err}."
    names = list(config.class_names)
    found = _bundled_entries(Path(bundled), checkpoint.name, _sha256(predictions))
    if found is not None:
        origin = f"the {len(found)} scans of its report, bundled with the app (downsized)"
        return ScanSet(names, found, origin), origin
    for root in roots:
        images = [inside(root, row["file"]) for row in rows]
        if rows and all(images):
            entries = [_entry(row, image) for row, image in zip(rows, images, strict=True)]
            origin = f"the {len(entries)} scans of its report (the original images)"
            return ScanSet(names, entries, origin), origin
    return None, (
        "**The scans of this model's test report are not reachable here** (they stayed on the "
        "computer it was trained on): the matrix is shown, its scans are not."
    )


def _bundled_entries(bundled: Path, name: str, digest: str) -> list[ScanEntry] | None:
    """The bundled copies of a checkpoint's test scans, when its manifest was built from the
    predictions.csv of SHA-256 ``digest`` and every image is inside ``bundled``."""
    manifest = bundled / f"{name}.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
        if data.get("predictions_sha256") != digest:
            return None
        scans = data["scans"]
        images = [inside(bundled, s["image"]) for s in scans]
        if not all(images):
            return None
        return [
            ScanEntry(
                s["file"],
                image,
                s["true"],
                s["predicted"],
                {k: float(v) for k, v in s["probabilities"].items()},
            )
            for s, image in zip(scans, images, strict=True)
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def scan_set_from_predictions(
    predictions: str | Path, image_root: str | Path, class_names: Sequence[str], origin: str
) -> ScanSet:
    """The scans of a report written by :func:`mirage_demo.evaluation.evaluate_samples` (file
    names relative to ``image_root``)."""
    rows = read_predictions(predictions, class_names)
    entries = [_entry(row, Path(image_root) / row["file"]) for row in rows]
    return ScanSet(list(class_names), entries, origin)


def _entry(row: dict[str, Any], image: Path) -> ScanEntry:
    return ScanEntry(row["file"], image, row["true"], row["predicted"], row["probabilities"])


# --------------------------------------------------------------------------------------------
# Building the bundle


def _sources(data: Path) -> dict[str, dict[str, str]]:
    """The data folder's ``manifest.csv`` (path -> source repository), if it has one."""
    manifest = data / "manifest.csv"
    if not manifest.is_file():
        return {}
    with open(manifest, newline="") as stream:
        return {row["path"]: row for row in csv.DictReader(stream) if "path" in row}


def downsized(path: Path, max_width: int = MAX_WIDTH) -> Image.Image:
    """A grayscale copy at most ``max_width`` pixels wide (aspect kept)."""
    return downsized_image(read_image(path, str(path)), max_width)


def build_bundle(
    checkpoints: Sequence[str | Path],
    data: str | Path,
    out: str | Path = BUNDLED_SCANS,
    *,
    max_width: int = MAX_WIDTH,
    quality: int = JPEG_QUALITY,
) -> dict[str, Any]:
    """Write downsized copies of the checkpoints' test scans and one manifest per checkpoint
    into ``out`` (replacing what was there). Returns ``{"images", "bytes", "manifests"}``."""
    data, out = Path(data), Path(out)
    staging = out.with_name(out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    sources = _sources(data)
    written: dict[str, str] = {}
    manifests = []
    for checkpoint in map(Path, checkpoints):
        config = read_config(checkpoint)
        predictions = checkpoint / "predictions.csv"
        rows = read_predictions(predictions, config.class_names)
        missing = [row["file"] for row in rows if not (data / row["file"]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} test scans of {checkpoint} are not in {data} (e.g. {missing[0]})"
            )
        scans = []
        for row in rows:
            name = row["file"]
            if name not in written:
                relative = Path("images") / Path(name).with_suffix(".jpg")
                target = staging / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                downsized(data / name, max_width).save(target, "JPEG", quality=quality)
                written[name] = relative.as_posix()
            source = sources.get(name, {})
            scans.append(
                {
                    **{k: row[k] for k in ("file", "true", "predicted", "probabilities")},
                    "image": written[name],
                    "source": {
                        k: source[k]
                        for k in ("source_repo", "commit", "repo_path")
                        if source.get(k)
                    },
                }
            )
        manifest = {
            "checkpoint": checkpoint.name,
            "predictions_sha256": _sha256(predictions),
            "class_names": list(config.class_names),
            "license": "CC BY 4.0",
            "attribution": ATTRIBUTION,
            "scans": scans,
        }
        path = staging / f"{checkpoint.name}.json"
        atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
        manifests.append(path.name)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"images": len(written), "bytes": size, "manifests": manifests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mirage_demo.testscans",
        description="Bundle downsized copies of checkpoints' test scans (named by their "
        "predictions.csv) for the app's confusion-matrix explorer and quiz.",
    )
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT_DIR")
    parser.add_argument("--data", required=True, help="the data folder the checkpoints used")
    parser.add_argument("--out", default=str(BUNDLED_SCANS), help="default: assets/test-scans")
    parser.add_argument("--max-width", type=int, default=MAX_WIDTH)
    parser.add_argument("--quality", type=int, default=JPEG_QUALITY, help="JPEG quality")
    args = parser.parse_args(argv)
    try:
        result = build_bundle(
            args.checkpoints, args.data, args.out, max_width=args.max_width, quality=args.quality
        )
    except (CheckpointError, ValueError, FileNotFoundError, ImageReadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{result['images']} scans, {result['bytes'] / 2**20:.1f} MB, manifests "
        f"{', '.join(result['manifests'])} in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
