"""The app's example volume, built from bundled real B-scans.

``python -m mirage_demo.volume_example``

Writes ``assets/volumes/example-eye.dcm`` (DICOM Ophthalmic Tomography, JPEG Baseline) and
its provenance, ``assets/volumes/example-eye.json``. The rule is fixed here, not chosen by
looking at any prediction: among the bundled test scans of 384x372 pixels
(``assets/test-scans/images``, real B-scans of Kermany et al. 2018, CC BY 4.0), the first
:data:`PATTERN` scans of each class in file-name order, stacked NORMAL - DME - NORMAL so that
the "eye" has a diseased centre. Each frame is the original JPEG file, byte for byte, so each
B-scan of the volume is classified exactly as that file is.

It is **not one eye**: the B-scans come from different patients. It shows how the app reads
and presents a volume; a real volume's neighbouring B-scans look alike.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from mirage_demo.volume_dicom import write_opt

__all__ = ["PATTERN", "build_example", "main"]

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "assets" / "test-scans" / "images"
OUT = ROOT / "assets" / "volumes" / "example-eye.dcm"
SIZE = (384, 372)
PATTERN = (("NORMAL", 8), ("DME", 9), ("NORMAL", 8))  # (class, B-scans), in order
MAX_BYTES = 2 * 2**20


def chosen_scans(source: Path = SOURCE, pattern: Sequence[tuple[str, int]] = PATTERN) -> list[Path]:
    """The B-scans the rule picks, in volume order (no scan used twice)."""
    taken: dict[str, int] = {}
    chosen = []
    for name, count in pattern:
        scans = [p for p in sorted((source / name).iterdir()) if _size(p) == SIZE]
        start = taken.get(name, 0)
        if start + count > len(scans):
            raise SystemExit(f"error: only {len(scans)} {name} scans of {SIZE[0]}x{SIZE[1]}")
        chosen += scans[start : start + count]
        taken[name] = start + count
    return chosen


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def build_example(out: Path = OUT, source: Path = SOURCE) -> Path:
    """Write the example volume and its provenance next to it; the volume's path."""
    scans = chosen_scans(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    frames = [path.read_bytes() for path in scans]
    write_opt(
        out,
        jpeg_frames=frames,
        description="Teaching example: B-scans of different patients",
    )
    size = out.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"error: {out} is {size:,} bytes (limit {MAX_BYTES:,})")
    stacked = " - ".join(f"{name} x{count}" for name, count in PATTERN)
    provenance = {
        "file": out.name,
        "what": "DICOM Ophthalmic Tomography (JPEG Baseline frames, stored as the original "
        "files), built by `python -m mirage_demo.volume_example`",
        "not_one_eye": "the B-scans come from different patients; neighbouring B-scans of a "
        "real volume look alike",
        "rule": f"the first scans of each class in file-name order among the bundled test "
        f"scans of {SIZE[0]}x{SIZE[1]} pixels, stacked {stacked}",
        "source": "Kermany et al. 2018, Mendeley Data doi:10.17632/rscbjbr9sj, CC BY 4.0 "
        "(see assets/ATTRIBUTION.md)",
        "bscans": [
            {
                "index": i,
                "class": path.parent.name,
                "file": str(path.relative_to(ROOT)),
                "sha256": hashlib.sha256(frame).hexdigest(),
            }
            for i, (path, frame) in enumerate(zip(scans, frames, strict=True))
        ],
    }
    out.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"default: {OUT.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    path = build_example(args.out)
    print(f"wrote {path} ({path.stat().st_size:,} bytes) and {path.with_suffix('.json').name}")


if __name__ == "__main__":
    main()
