"""Pictures of a classified volume: the class probabilities along it, and where each B-scan
lies on the localizer (or on an en-face view made from the B-scans), coloured by its class.

Pure numpy, Pillow and matplotlib (Agg): the app's Volume tab draws them on every move of its
slider, so each is small and takes a few tens of milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from mirage_demo.volumes import Position

__all__ = [
    "BASE_SIDE",
    "class_colours",
    "enface_row",
    "localizer_base",
    "localizer_figure",
    "probability_strip",
]

BASE_SIDE = 480  # the en-face picture kept per volume: at most this many pixels a side
_PALETTE = ["#d62728", "#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
_NORMAL_COLOUR = "#2ca02c"
UNREADABLE_COLOUR = "#7f7f7f"


def class_colours(class_names: Sequence[str]) -> dict[str, str]:
    """A colour per class, the same in every picture (a class named NORMAL is green)."""
    colours, others = {}, iter(_PALETTE * 4)
    for name in class_names:
        colours[name] = _NORMAL_COLOUR if name.lower() == "normal" else next(others)
    return colours


def enface_row(bscan: np.ndarray) -> np.ndarray:
    """One B-scan's row of the en-face view: the mean brightness of each A-scan (column)."""
    return np.asarray(bscan, dtype=np.float32).mean(axis=0)


def localizer_base(
    localizer: np.ndarray | None,
    positions: Sequence[Position] | None,
    rows: Sequence[np.ndarray],
) -> tuple[np.ndarray, list[Position], str]:
    """The picture the B-scans are marked on, at most :data:`BASE_SIDE` pixels a side: the
    localizer with the B-scans' lines when they fall on it, else an en-face view made from
    ``rows`` (:func:`enface_row` of each B-scan: B-scan 1 at the bottom, as eyepy and Heyex
    show a volume), each B-scan a horizontal line of it. Returns (uint8 picture, the lines on
    it, what it is)."""
    if localizer is not None and positions and _on_picture(positions, localizer.shape):
        factor = BASE_SIDE / max(localizer.shape)
        picture = _resized(localizer, factor)
        lines = [
            ((x0 * factor, y0 * factor), (x1 * factor, y1 * factor))
            for (x0, y0), (x1, y1) in positions
        ]
        return picture, lines, "The localizer, each B-scan's line in the colour of its class"
    stack = np.stack([np.asarray(r, np.float32) for r in rows])[::-1]  # B-scan 1 at the bottom
    low, high = np.percentile(stack, [1, 99]) if stack.size else (0.0, 1.0)
    stack = np.clip((stack - low) / max(high - low, 1e-6) * 255.0, 0, 255).astype(np.uint8)
    count = stack.shape[0]
    height = min(BASE_SIDE, max(count * 4, round(BASE_SIDE * 0.6)))
    picture = np.asarray(Image.fromarray(stack).resize((BASE_SIDE, height), Image.NEAREST))
    step = height / count
    lines = [
        ((0.0, height - (i + 0.5) * step), (BASE_SIDE - 1.0, height - (i + 0.5) * step))
        for i in range(count)
    ]
    what = (
        "Seen from the front: each row is one B-scan's mean brightness (B-scan 1 at the "
        "bottom), its class marked at both sides"
    )
    if localizer is None:
        what += "; the file has no localizer image"
    return picture, lines, what


def _on_picture(positions: Sequence[Position], shape: tuple[int, ...]) -> bool:
    """Whether most of the lines' end points lie on a picture of ``shape`` (height, width)."""
    height, width = shape[:2]
    points = [p for line in positions for p in line]
    inside = sum(0 <= x <= width and 0 <= y <= height for x, y in points)
    return inside >= 0.9 * len(points)


def _resized(picture: np.ndarray, factor: float) -> np.ndarray:
    height, width = picture.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR))


def probability_strip(
    probabilities: np.ndarray,
    labels: Sequence[str | None],
    class_names: Sequence[str],
    current: int,
) -> Image.Image:
    """Each class's probability along the volume (x: B-scan, from 1), the predicted class of
    each B-scan as a band below, the current B-scan marked."""
    count = len(labels)
    colours = class_colours(class_names)
    fig = Figure(figsize=(7.2, 2.8), dpi=100)  # the top 40 px stay free for the app's label
    FigureCanvasAgg(fig)
    axes = fig.add_axes((0.08, 0.36, 0.76, 0.46))
    band = fig.add_axes((0.08, 0.2, 0.76, 0.07), sharex=axes)
    x = np.arange(1, count + 1)
    for k, name in enumerate(class_names):
        axes.plot(x, probabilities[:, k], color=colours[name], lw=1.6, label=name)
    axes.axvline(current + 1, color="black", lw=1.2, ls="--")
    axes.set_ylim(0, 1.02)
    axes.set_xlim(0.5, count + 0.5)
    axes.set_ylabel("probability", fontsize=8)
    axes.tick_params(labelbottom=False, labelsize=8)
    axes.grid(alpha=0.3)
    fig.legend(
        *axes.get_legend_handles_labels(),
        loc="center left",
        fontsize=8,
        frameon=False,
        handlelength=1.2,
        bbox_to_anchor=(0.85, 0.5),
    )
    band.bar(
        x,
        np.ones(count),
        width=1.0,
        color=[colours.get(str(label), UNREADABLE_COLOUR) for label in labels],
    )
    band.axvline(current + 1, color="black", lw=1.6)
    band.set_yticks([])
    band.set_xlabel(
        f"B-scan (1-{count}); the band: the class predicted; dashed: B-scan {current + 1}",
        fontsize=8,
    )
    band.tick_params(labelsize=8)
    return _to_image(fig)


def localizer_figure(
    base: np.ndarray,
    lines: Sequence[Position],
    labels: Sequence[str | None],
    class_names: Sequence[str],
    current: int,
    title: str,
) -> Image.Image:
    """The base picture with every B-scan marked in its predicted class's colour (a line
    across a localizer; ticks at both sides of an en-face view), the current one drawn
    across with a white edge, and a legend of the classes below."""
    colours = class_colours(class_names)
    height, width = base.shape[:2]
    margin = 16 if _enface(lines, width) else 0  # the ticks' columns
    top = 40  # free for the app's label and buttons
    total_w, total_h = width + 2 * margin, height + 64 + top
    fig = Figure(figsize=(total_w / 100, total_h / 100), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.add_axes((0, 64 / total_h, 1, height / total_h))
    axes.imshow(
        base, cmap="gray", vmin=0, vmax=255, interpolation="nearest", extent=(0, width, height, 0)
    )
    for index, ((x0, y0), (x1, y1)) in enumerate(lines):
        colour = colours.get(str(labels[index]), UNREADABLE_COLOUR)
        if margin:
            for left in (-margin, width + 2):
                axes.plot(
                    [left, left + margin - 2],
                    [y0, y1],
                    color=colour,
                    lw=max(1.0, 0.7 * height / len(lines)),
                    solid_capstyle="butt",
                )
        elif index != current:
            axes.plot([x0, x1], [y0, y1], color=colour, lw=1.0, alpha=0.8)
    (x0, y0), (x1, y1) = lines[current]
    colour = colours.get(str(labels[current]), UNREADABLE_COLOUR)
    axes.plot([x0, x1], [y0, y1], color="white", lw=4.0)
    axes.plot([x0, x1], [y0, y1], color=colour, lw=2.0)
    axes.set_xlim(-margin, width + margin)
    axes.set_ylim(height, 0)
    axes.axis("off")
    handles = [Line2D([], [], color=colours[name], lw=3, label=name) for name in class_names]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=min(4, len(handles)),
        fontsize=9,
        frameon=False,
        bbox_to_anchor=(0.5, 30 / total_h),
    )
    fig.text(0.5, 4 / total_h, _wrapped(title, 80), ha="center", va="bottom", fontsize=7)
    return _to_image(fig)


def _enface(lines: Sequence[Position], width: int) -> bool:
    """Whether the lines are an en-face view's rows (horizontal, the whole width)."""
    return all(y0 == y1 and x0 == 0 and x1 >= width - 1 for (x0, y0), (x1, y1) in lines)


def _wrapped(text: str, width: int = 70) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def _to_image(fig: Figure) -> Image.Image:
    canvas = fig.canvas
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())
