"""Classify OCT B-scans from the command line.

::

    python -m mirage_demo.predict [--checkpoint DIR_OR_HUB_ID] [--json] [--tta] [--level 0.9]
                                  [--explain METHOD --out DIR] [--volume]
                                  IMAGES_FOLDERS_OR_VOLUMES...

One line per image: ``file LABEL probability set verdict warnings``, or with ``--json`` one JSON
object ``{"file", "label", "probabilities", "trust", "prediction_set", "level",
"out_of_distribution", "ood_score", "sure_probability", "warnings"}``
(:meth:`~mirage_demo.inference.Prediction.record`): ``trust`` is the verdict
(:mod:`mirage_demo.verdict`: ``not_a_bscan``, ``unlike_training``, ``unsure``, ``sure``), the
set is at ``--level``, ``sure_probability`` is the bar the top class must reach for ``sure``,
and the last five are None for a checkpoint without uncertainty statistics (``trust`` then says only
``not_a_bscan``). An unreadable file gives a line with an ``"error"`` and the run goes
on. Each folder (searched recursively) also gets a CSV ``<folder>-predictions.csv`` in
``--out`` (default: the current directory), in the one predictions format
(:func:`~mirage_demo.predictions_csv.write_predictions_csv`). ``--explain`` writes an overlay
PNG per image into ``--out``. Exit status: 0 when every image was classified, 1 when any
failed, 2 when the checkpoint or the arguments are unusable.

**Volumes** (:mod:`mirage_demo.volume_io`: Heidelberg ``.vol``, ``.e2e`` and XML exports,
DICOM Ophthalmic Tomography, a ``.zip`` of an export or of B-scan images; a folder holding an
XML export; with ``--volume``, any folder as one volume of B-scans in name order): one line
per B-scan, its record with ``"slice"`` (its index from 0), then one line with
``"volume_summary"`` (:meth:`~mirage_demo.volume_predict.VolumeSummary.to_dict`: ``slices``,
``per_class_slices``, each class's highest probability, the B-scan the finding rests on and
the summary in words). In text, a B-scan is named ``file [B-scan N]`` (from 1). Names and
messages in text output have tabs and line breaks escaped (``\\t``, ``\\n``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from mirage_demo.checkpoint import CheckpointError
from mirage_demo.explain import METHODS
from mirage_demo.images import IMAGE_SUFFIXES, ImageReadError
from mirage_demo.inference import DEFAULT_CHECKPOINT, Prediction, Predictor
from mirage_demo.predictions_csv import write_predictions_csv
from mirage_demo.uncertainty import DEFAULT_LEVEL
from mirage_demo.verdict import verdict_words
from mirage_demo.volume_io import is_volume, load_volume
from mirage_demo.volume_predict import classify_volume, summarize
from mirage_demo.volumes import VolumeError, slice_label

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mirage_demo.predict",
        description="Classify OCT B-scans (files or folders) with a fine-tuned checkpoint.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_FOLDERS_OR_VOLUMES")
    parser.add_argument(
        "--checkpoint",
        default=str(DEFAULT_CHECKPOINT),
        help="checkpoint directory or Hugging Face Hub repo id (default: the bundled demo "
        "model, assets/demo-model)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--explain", metavar="METHOD", choices=METHODS, help=f"save overlays: {', '.join(METHODS)}"
    )
    parser.add_argument("--target", help="class to explain (default: the predicted one)")
    parser.add_argument("--out", type=Path, help="folder for overlays and CSV files")
    parser.add_argument("--tta", action="store_true", help="average with the flipped image")
    parser.add_argument(
        "--level",
        type=float,
        default=DEFAULT_LEVEL,
        help="the prediction sets' level (default 0.9: each set holds the true class of about "
        "90%% of scans like the validation scans)",
    )
    parser.add_argument(
        "--volume",
        action="store_true",
        help="read each folder given as one volume of B-scans (in name order), not as images",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    return parser


def _expand(
    inputs: Sequence[str], image_folders: bool = False
) -> tuple[list[tuple[Path, Path | None]], list[Path], list[Path]]:
    """``(file, folder it came from or None)`` for every image, folders searched recursively;
    the folders holding no image; and the volumes (files, zips, exports: in the order given;
    with ``image_folders``, every folder too)."""
    files: list[tuple[Path, Path | None]] = []
    empty: list[Path] = []
    volumes: list[Path] = []
    for text in inputs:
        path = Path(text)
        if (path.exists() or path.is_dir()) and is_volume(path, image_folders=image_folders):
            volumes.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            files += [(p, path) for p in found]
            if not found:
                empty.append(path)
        else:
            files.append((path, None))
    return files, empty, volumes


def _emit(record: dict, as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps(record, allow_nan=False) + "\n")
        out.flush()
        return
    file = _cell(record["file"])
    if "slice" in record:
        file = _cell(slice_label(record["file"], record["slice"]))
    if "volume_summary" in record:
        out.write(f"{file}\tSUMMARY\t{_cell(record['volume_summary']['text'])}\n")
    elif "error" in record:
        out.write(f"{file}\tERROR\t{_cell(record['error'])}\n")
    else:
        probability = record["probabilities"][record["label"]]
        shown = record["prediction_set"]
        shown = "{" + ", ".join(shown) + "}" if shown is not None else "-"
        shown_probability = "-" if probability is None else f"{probability:.3f}"
        out.write(
            f"{file}\t{_cell(record['label'])}\t{shown_probability}\t{_cell(shown)}\t"
            f"{verdict_words(record['trust'])}\t{_cell('; '.join(record['warnings']))}\n"
        )
    out.flush()


def _cell(text: str) -> str:
    """One tab-separated cell: control characters (a newline or tab in a file name, which
    would forge a row or a column) written as escapes, as ``repr`` writes them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _record(file: Path, result: Prediction | Exception) -> dict:
    if isinstance(result, Exception):
        return {"file": str(file), "error": str(result)}
    return {**result.record(), "file": str(file)}


def _unique(path: Path, taken: set[Path]) -> Path:
    candidate, n = path, 1
    while candidate in taken:
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    taken.add(candidate)
    return candidate


def _write_csvs(rows: dict[Path, list[dict]], class_names: list[str], out_dir: Path) -> None:
    taken: set[Path] = set()
    for folder, records in rows.items():
        name = folder.resolve().name or "root"
        path = _unique(out_dir / f"{name}-predictions.csv", taken)
        write_predictions_csv(
            path,
            class_names,
            [r["file"] for r in records],
            [_probabilities(r, class_names) for r in records],
            warnings=[r.get("warnings", []) for r in records],
            errors=[r.get("error") for r in records],
            uncertainty=records,
        )
        print(f"wrote {path}", file=sys.stderr)


def _probabilities(record: dict, class_names: list[str]) -> list[float] | None:
    probabilities = record.get("probabilities")
    return None if probabilities is None else [probabilities[c] for c in class_names]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.explain and args.out is None:
        _parser().error("--explain needs --out DIR for the overlays")
    try:
        predictor = Predictor.from_pretrained(
            args.checkpoint, device=args.device, tta=args.tta, level=args.level
        )
        target = predictor.class_index(args.target) if args.target is not None else None
        if args.explain:
            predictor.explainer.check_method(args.explain)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    files, empty, volumes = _expand(args.inputs, image_folders=args.volume)
    out_dir = args.out or Path.cwd()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    for folder in empty:
        record = {"file": str(folder), "error": f"no images ({suffixes}) in this folder"}
        _emit(record, args.json, sys.stdout)
    taken: set[Path] = set()
    per_folder: dict[Path, list[dict]] = {folder: [] for _, folder in files if folder}
    failed = len(empty) + _classify_images(predictor, files, args, target, per_folder, taken)
    for volume in volumes:
        failed += _classify_volume(predictor, volume, args, target, taken)
    if per_folder:
        _write_csvs(per_folder, predictor.class_names, out_dir)
    if failed:
        total = len(files) + len(empty) + len(volumes)
        print(f"{failed} of {total} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def _classify_images(
    predictor: Predictor,
    files: list[tuple[Path, Path | None]],
    args: argparse.Namespace,
    target: int | None,
    per_folder: dict[Path, list[dict]],
    taken: set[Path],
) -> int:
    """Classify (and explain) image files in batches, one line each; how many failed."""
    failed = 0
    step = max(1, args.batch_size) if not args.explain else 1
    for start in range(0, len(files), step):
        chunk = files[start : start + step]
        results: list[Prediction | Exception]
        if args.explain:
            results = [
                _explained(predictor, file, str(file), args, target, file.stem, taken)
                for file, _ in chunk
            ]
        else:
            results = predictor.predict_batch(
                [file for file, _ in chunk],
                batch_size=step,
                names=[str(file) for file, _ in chunk],
                on_error="return",
            )
        for (file, folder), result in zip(chunk, results, strict=True):
            record = _record(file, result)
            failed += "error" in record
            _emit(record, args.json, sys.stdout)
            if folder is not None:
                per_folder[folder].append(record)
    return failed


def _classify_volume(
    predictor: Predictor,
    path: Path,
    args: argparse.Namespace,
    target: int | None,
    taken: set[Path],
) -> int:
    """One line per B-scan, then the summary; 1 if the volume or any B-scan failed."""
    try:
        volume = load_volume(path, str(path))
    except VolumeError as err:
        _emit({"file": str(path), "error": err.reason}, args.json, sys.stdout)
        return 1
    results = []
    with volume:
        step = 1 if args.explain else max(1, args.batch_size)
        for item in classify_volume(predictor, volume, batch_size=step):
            if args.explain and item.image is not None:
                stem = f"{path.stem}.bscan-{item.index + 1:03d}"
                label = slice_label(str(path), item.index)
                item.result = _explained(predictor, item.image, label, args, target, stem, taken)
            _emit(item.record(str(path)), args.json, sys.stdout)
            item.image = None  # one batch of B-scans at a time
            results.append(item)
    summary = summarize(results, predictor.class_names)
    _emit({"file": str(path), "volume_summary": summary.to_dict()}, args.json, sys.stdout)
    return int(bool(summary.unreadable))


def _explained(
    predictor: Predictor,
    image: Path | np.ndarray,
    name: str,
    args: argparse.Namespace,
    target: int | None,
    stem: str,
    taken: set[Path],
) -> Prediction | ImageReadError:
    """Explain one image, save its overlay in ``--out``; its prediction (or read error)."""
    try:
        explanation = predictor.explain(image, args.explain, target, name=name)
    except ImageReadError as err:
        return err
    explanation.overlay.save(_unique(args.out / f"{stem}.{args.explain}.png", taken))
    return explanation.prediction


if __name__ == "__main__":
    sys.exit(main())
