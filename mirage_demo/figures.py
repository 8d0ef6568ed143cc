"""Figures for slides and words for screen readers: what a heat map shows, as a picture and
as a sentence.

- :func:`strongest_region` and :func:`describe_heatmap`: where a heat map is strongest, in
  words ("strongest at the top left"), for alt texts;
- :func:`answer_figure`: one PNG-ready picture of an answer: the scan, its heat map with a
  colour bar, and a caption (model, method, class, probability, verdict);
- :func:`grid_figure`: many labelled pictures in one grid (every method's map, for a slide);
- :func:`colour_stops`: a colormap's colours, for a colour bar drawn by the page.

Pure numpy, PIL and matplotlib (an explicit ``Figure`` per call: thread-safe, no pyplot).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mirage_demo.explain import render_overlay

__all__ = [
    "answer_figure",
    "colour_stops",
    "describe_heatmap",
    "grid_figure",
    "save_png",
    "strongest_region",
]

_ROWS = ("top", "middle", "bottom")
_COLUMNS = ("left", "centre", "right")
#: A map whose strongest third is less than this times its mean is "spread out".
SPREAD_RATIO = 1.25
SLIDE_DPI = 150


def strongest_region(heatmap: np.ndarray) -> str:
    """Where a heat map (``(H, W)``, larger is stronger) is strongest, as words: ``"at the top
    left"``, ``"at the centre"``, ``"along the bottom"``..., or ``"spread over the whole scan"``
    when no ninth of it stands out (its mean under :data:`SPREAD_RATIO` times the map's)."""
    values = np.nan_to_num(np.asarray(heatmap, dtype=np.float64))
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"a heat map is a 2-D array, got shape {values.shape}")
    rows = np.array_split(np.arange(values.shape[0]), 3)
    columns = np.array_split(np.arange(values.shape[1]), 3)
    means = np.array(
        [[values[np.ix_(r, c)].mean() if r.size and c.size else 0.0 for c in columns] for r in rows]
    )
    overall = values.mean()
    if means.max() <= 0 or means.max() < SPREAD_RATIO * overall:
        return "spread over the whole scan"
    row, column = np.unravel_index(int(np.argmax(means)), means.shape)
    # a whole row (or column) of thirds nearly as strong as the best: say "along"
    strong = means >= 0.85 * means.max()
    if strong[row].all():
        return f"along the {_ROWS[row]}" if row != 1 else "across the middle"
    if strong[:, column].all():
        return f"down the {_COLUMNS[column]}" if column != 1 else "down the centre"
    if (row, column) == (1, 1):
        return "at the centre"
    return f"at the {_ROWS[row]} {_COLUMNS[column]}"


def describe_heatmap(
    method: str, target: str | None, heatmap: np.ndarray, over: str = "the uploaded B-scan"
) -> str:
    """An alt text for a heat map: ``"Grad-CAM heat map for DME over the uploaded B-scan,
    strongest at the centre"`` (``target=None``: a map that does not depend on the class)."""
    what = f"{method} heat map for {target}" if target else f"{method} heat map"
    return f"{what} over {over}, strongest {strongest_region(heatmap)}"


def colour_stops(colormap: str, count: int = 9) -> list[str]:
    """``count`` evenly spaced colours of a matplotlib colormap, low to high, as ``#rrggbb``."""
    import matplotlib

    cmap = matplotlib.colormaps[colormap]
    return [
        "#{:02x}{:02x}{:02x}".format(*(round(v * 255) for v in cmap(x)[:3]))
        for x in np.linspace(0.0, 1.0, count)
    ]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=SLIDE_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _picture(fig) -> Image.Image:
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


def answer_figure(
    scan: np.ndarray,
    heatmap: np.ndarray,
    colormap: str,
    opacity: float,
    title: str,
    caption: Sequence[str],
) -> Image.Image:
    """One slide-ready picture (16:9, 1600x900): the scan on the left, its heat map over it on
    the right with a colour bar, ``title`` above and the ``caption`` lines below.

    ``scan`` is ``(H, W)`` or ``(H, W, 3)`` in [0, 1], ``heatmap`` ``(H, W)`` in [0, 1]."""
    import matplotlib

    overlay = np.asarray(render_overlay(scan, heatmap, colormap, opacity))
    fig = _figure(32 / 3, 6.0)
    grid = fig.add_gridspec(2, 2, height_ratios=[5, 1.35])
    left, right = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    left.imshow(scan, cmap="gray", vmin=0, vmax=1)
    left.set_title("The scan", fontsize=13)
    right.imshow(overlay)
    right.set_title("Where the model looked", fontsize=13)
    for axes in (left, right):
        axes.set_axis_off()
    mappable = matplotlib.cm.ScalarMappable(
        norm=matplotlib.colors.Normalize(0, 1), cmap=matplotlib.colormaps[colormap]
    )
    bar = fig.colorbar(mappable, ax=right, fraction=0.05, pad=0.02)
    bar.set_ticks([0, 1], labels=["weak", "strong"])
    bar.ax.tick_params(labelsize=11)
    fig.suptitle(title, fontsize=16, fontweight="bold")
    text = fig.add_subplot(grid[1, :])
    text.set_axis_off()
    text.text(0.0, 1.0, "\n".join(caption), va="top", ha="left", fontsize=12, wrap=True)
    return _picture(fig)


def grid_figure(
    rows: Sequence[Sequence[tuple[Image.Image | np.ndarray, str]]],
    row_titles: Sequence[str],
    title: str,
    footer: str = "",
) -> Image.Image:
    """Pictures in a labelled grid, one row per entry of ``rows`` (each ``(picture, label)``),
    each row titled, for a slide."""
    columns = max(len(row) for row in rows)
    fig = _figure(max(8.0, 2.6 * columns), 1.0 + 2.4 * len(rows) + (0.4 if footer else 0.0))
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(columns):
            cell = axes[r][c]
            cell.set_xticks([])
            cell.set_yticks([])
            if c >= len(row):
                cell.set_axis_off()
                continue
            picture, label = row[c]
            cell.imshow(np.asarray(picture))
            cell.set_title(label, fontsize=10)
            for spine in cell.spines.values():
                spine.set_visible(False)
        axes[r][0].set_ylabel(row_titles[r], fontsize=11, fontweight="bold")
    fig.suptitle(title, fontsize=14, fontweight="bold")
    if footer:
        fig.supxlabel(footer, fontsize=10)
    return _picture(fig)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """``image`` written as a PNG at ``path``; the path."""
    path = Path(path)
    image.save(path, "PNG", optimize=False)
    return path
