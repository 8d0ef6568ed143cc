"""The figures of docs/pretraining.md: ``python docs/pretraining_figures.py [RUN ...]``.

- ``pretraining-reconstruction.png``: the bundled tiny MIRAGE rebuilding three bundled example
  scans with 75% of their patches hidden (what the model saw, its reconstruction, the error);
- ``pretraining-curves.png``: each run's validation curve from its ``history.csv``: the
  pre-training's reconstruction loss, and the fine-tunes' balanced accuracy (``RUN`` folders,
  e.g. the pre-training run and the two fine-tunes; labelled ``--label`` in order, else by
  folder name).

``--curves-only`` skips the reconstructions (a few minutes on a busy CPU).
"""

from __future__ import annotations

import argparse
import csv
import sys
from io import BytesIO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docs.screenshots import save_png  # noqa: E402
from mirage_demo.reconstruction import load_reconstructor, reconstruct_scan  # noqa: E402
from mirage_demo.ui.context import example_scans  # noqa: E402

OUT = ROOT / "docs" / "img"
EXAMPLES = ("CNV", "DME", "DRUSEN")  # one scan of each, the first bundled


def reconstruction_figure(path: Path, ratio: float = 0.75, seed: int = 0) -> None:
    model = load_reconstructor("tiny")
    scans = {cls: p for p, cls in reversed(example_scans())}  # the first scan of each class
    fig, axes = plt.subplots(len(EXAMPLES), 3, figsize=(9, 2.9 * len(EXAMPLES)), dpi=100)
    titles = ("what the model saw (25%)", "its reconstruction", "error on the hidden patches")
    for row, cls in enumerate(EXAMPLES):
        result = reconstruct_scan(model, scans[cls], ratio, seed)
        for col, image in enumerate((result.masked, result.rebuilt, result.difference)):
            ax = axes[row, col]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=10)
        axes[row, 0].set_ylabel(f"{cls}\nmean error {result.hidden_error:.3f}", fontsize=9)
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    """``fig`` as an optimised PNG (quantised when large, as the screenshots are)."""
    fig.tight_layout()
    buffer = BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    save_png(buffer.getvalue(), path)


def curves_figure(runs: list[Path], path: Path, labels: list[str] | None = None) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    labels = list(labels or []) + [run.name for run in runs[len(labels or []) :]]
    for run, label in zip(runs, labels, strict=True):
        with open(run / "history.csv", newline="") as stream:
            rows = list(csv.DictReader(stream))
        epochs = [int(r["epoch"]) for r in rows]
        if "val_balanced_accuracy" in rows[0]:
            values = [float(r["val_balanced_accuracy"]) for r in rows]
            right.plot(epochs, values, marker=".", label=label)
        else:
            left.plot(epochs, [float(r["val_loss"]) for r in rows], marker=".", label=label)
    left.set(title="pre-training: validation reconstruction loss", xlabel="epoch", yscale="log")
    right.set(title="fine-tuning: validation balanced accuracy", xlabel="epoch", ylim=(0, 1))
    right.axhline(0.25, color="gray", lw=0.8, ls=":")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run folders with a history.csv")
    parser.add_argument("--label", action="append", help="a run's name in the legend, in order")
    parser.add_argument("--curves-only", action="store_true", help="skip the reconstructions")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.curves_only:
        reconstruction_figure(args.out / "pretraining-reconstruction.png")
    if args.runs:
        curves_figure(args.runs, args.out / "pretraining-curves.png", args.label)
    print(f"figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
