"""Classify OCT B-scans from the command line.

::

    python -m mirage_demo.predict [--checkpoint DIR_OR_HUB_ID] [--json] [--tta] [--level 0.9]
                                  [--explain METHOD --out DIR] IMAGES_OR_FOLDERS...

One line per image: ``file LABEL probability set warnings``, or with ``--json`` one JSON object
``{"file", "label", "probabilities", "prediction_set", "level", "out_of_distribution",
"ood_score", "warnings"}`` (:meth:`~mirage_demo.inference.Prediction.record`) (the set at
``--level``, and whether the scan is unlike the training scans: None for a checkpoint without
uncertainty statistics). An unreadable file gives a line with an ``"error"`` and the run goes
on. Each folder (searched recursively) also gets a CSV ``<folder>-predictions.csv`` in
``--out`` (default: the current directory), in the one predictions format
(:func:`~mirage_demo.predictions_csv.write_predictions_csv`). ``--explain`` writes an overlay
PNG per image into ``--out``. Exit status: 0 when every image was classified, 1 when any
failed, 2 when the checkpoint or the arguments are unusable.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from mirage_demo.checkpoint import CheckpointError
from mirage_demo.explain import METHODS
from mirage_demo.images import IMAGE_SUFFIXES, ImageReadError
from mirage_demo.inference import DEFAULT_CHECKPOINT, Prediction, Predictor
from mirage_demo.predictions_csv import write_predictions_csv
from mirage_demo.uncertainty import DEFAULT_LEVEL

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mirage_demo.predict",
        description="Classify OCT B-scans (files or folders) with a fine-tuned checkpoint.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS")
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
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    return parser


def _expand(inputs: Sequence[str]) -> tuple[list[tuple[Path, Path | None]], list[Path]]:
    """``(file, folder it came from or None)`` for every input, folders searched recursively;
    and the folders holding no image."""
    files: list[tuple[Path, Path | None]] = []
    empty: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
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
    return files, empty


def _emit(record: dict, as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps(record) + "\n")
    elif "error" in record:
        out.write(f"{record['file']}\tERROR\t{record['error']}\n")
    else:
        probability = record["probabilities"][record["label"]]
        shown = record["prediction_set"]
        shown = "{" + ", ".join(shown) + "}" if shown is not None else "-"
        warnings = record["warnings"] + (
            ["unlike the training scans"] * bool(record["out_of_distribution"])
        )
        out.write(
            f"{record['file']}\t{record['label']}\t{probability:.3f}\t{shown}\t"
            f"{'; '.join(warnings)}\n"
        )
    out.flush()


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

    files, empty = _expand(args.inputs)
    out_dir = args.out or Path.cwd()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    per_folder: dict[Path, list[dict]] = {folder: [] for _, folder in files if folder}
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    for folder in empty:
        record = {"file": str(folder), "error": f"no images ({suffixes}) in this folder"}
        _emit(record, args.json, sys.stdout)
    failed = len(empty)
    taken: set[Path] = set()
    step = max(1, args.batch_size) if not args.explain else 1
    for start in range(0, len(files), step):
        chunk = files[start : start + step]
        results: list[Prediction | Exception]
        if args.explain:
            results = []
            for file, _ in chunk:
                try:
                    explanation = predictor.explain(file, args.explain, target, name=str(file))
                except ImageReadError as err:
                    results.append(err)
                    continue
                overlay = _unique(args.out / f"{file.stem}.{args.explain}.png", taken)
                explanation.overlay.save(overlay)
                results.append(explanation.prediction)
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
    if per_folder:
        _write_csvs(per_folder, predictor.class_names, out_dir)
    if failed:
        print(f"{failed} of {len(files) + len(empty)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
