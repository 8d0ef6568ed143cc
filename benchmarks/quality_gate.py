"""The quality gate ("is it an OCT B-scan?") on real scans and on images that are not B-scans.

::

    python benchmarks/quality_gate.py --data DATA [--json FILE]

Real scans: every image under ``DATA`` (e.g. the 3,184 Kermany scans of ``../shared``), as
given and as the app bundles its test scans (at most 384 pixels wide, JPEG quality 70), and
the repository's own bundled scans (``assets/examples``, ``assets/test-scans``). The gate must
reject none of them. Not B-scans: the generated set of ``tests/non_bscans.py`` and grayscale
copies of the stock photographs that ship with matplotlib, scikit-learn and Gradio. Printed:
how many each kind rejects, the rejected real scans by name, and for each image that is not a
B-scan what the gate says (or that it lets it through: the unlike-the-training-scans check
must then catch it). No model is involved.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mirage_demo.data import IMAGE_SUFFIXES, open_image, read_image  # noqa: E402
from mirage_demo.imagestats import jpeg_copy  # noqa: E402
from mirage_demo.quality import assess_image  # noqa: E402
from mirage_demo.testscans import JPEG_QUALITY, MAX_WIDTH  # noqa: E402
from tests.non_bscans import non_bscans  # noqa: E402


def bundled_copy(path: Path) -> np.ndarray:
    """The scan as ``mirage_demo.testscans`` bundles it: grayscale, downsized, JPEG 70."""
    return jpeg_copy(read_image(path, str(path)), MAX_WIDTH, JPEG_QUALITY)


def stock_photographs() -> dict[str, np.ndarray]:
    """Grayscale copies of the stock photographs installed with matplotlib, scikit-learn and
    Gradio (whichever are there)."""
    import gradio
    import matplotlib
    import sklearn

    folders = [
        Path(matplotlib.get_data_path()) / "sample_data",
        Path(sklearn.__file__).parent / "datasets" / "images",
        Path(gradio.__file__).parent / "media_assets" / "images",
    ]
    found = {}
    for folder in folders:
        for path in sorted(folder.glob("*.jp*g")):
            with open_image(path) as image:
                found[f"stock photograph {path.name} (grayscale)"] = np.asarray(image.convert("L"))
    return found


def real_scans(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of real B-scans")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    figures: dict[str, dict] = {}
    scans = real_scans(args.data)
    bundled = [
        p for folder in ("examples", "test-scans") for p in real_scans(ROOT / "assets" / folder)
    ]
    kinds = {  # the scans, and what of each is checked (a copy is made when its turn comes)
        "real scans": (scans, lambda path: path),
        "real scans, bundled copies": (scans, bundled_copy),
        "the repository's bundled scans": (bundled, lambda path: path),
    }
    for kind, (paths, checked) in kinds.items():
        rejected = []
        for path in paths:
            report = assess_image(checked(path))
            if not report.looks_like_oct:
                rejected.append(f"{path}: {report.warnings[0]}")
        figures[kind] = {"images": len(paths), "rejected": len(rejected), "names": rejected}
        print(f"{kind}: {len(paths)} images, {len(rejected)} rejected", flush=True)
        for line in rejected:
            print(f"  {line}")
    others = {**non_bscans(), **stock_photographs()}
    verdicts = {}
    for name, image in others.items():
        report = assess_image(image)
        verdicts[name] = report.warnings[0] if report.warnings else None
        print(f"  {name}: {verdicts[name] or 'LET THROUGH'}")
    caught = sum(v is not None for v in verdicts.values())
    print(f"not B-scans: {len(verdicts)} images, {caught} rejected")
    figures["not B-scans"] = {"images": len(verdicts), "rejected": caught, "each": verdicts}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
