"""Near-copies: scans that are one scan in all but name, kept on one side of every split.

Public OCT collections hold renamed copies that are not byte-identical: neighbouring B-scans of
one eye, re-encoded or resized copies, and mirror images (the "Retinal OCT C8" compilation
flipped some Kermany scans). A file without a patient id is its own group, so such a twin could
land in train while its copy is tested. :func:`group_near_copies` merges the groups of images
whose small grayscale thumbnails correlate strongly, as they are or mirrored, before any
patient-disjoint split; :func:`near_copy_pairs` is the comparison itself.

The criterion: Pearson correlation of ``size x size`` thumbnails (the whole image squashed to a
square, so one scan at two resolutions matches) of at least ``threshold``. It is invariant to
brightness and contrast, so re-encoded and re-windowed copies match too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from mirage_demo.images import ImageReadError, Sample, open_image

__all__ = ["NearCopyGroups", "group_near_copies", "near_copy_pairs", "thumbnails"]

THUMBNAIL = 64  # pixels a side: a B-scan's layers, not its speckle
_BLOCK = 2048  # rows of the correlation matrix computed at once (bounded memory)


def thumbnails(paths: Sequence[str | Path], size: int = THUMBNAIL) -> np.ndarray:
    """``(N, size * size)`` float32 rows of zero mean and unit norm (a flat image: all zeros).

    Each image is decoded at a reduced scale where the format allows (JPEG ``draft``) and
    squashed to ``size x size`` with an antialiased resize.
    """
    rows = np.zeros((len(paths), size * size), dtype=np.float32)
    for i, path in enumerate(paths):
        try:
            image = open_image(path)
        except ImageReadError:
            continue  # unreadable files are reported where they are read for training
        with image:
            small = image.convert("L").resize((size, size), Image.Resampling.BOX)
        row = np.asarray(small, dtype=np.float32).ravel()
        row -= row.mean()
        norm = float(np.linalg.norm(row))
        if norm > 0:
            rows[i] = row / norm
    return rows


def _mirrored(rows: np.ndarray, size: int) -> np.ndarray:
    return rows.reshape(-1, size, size)[:, :, ::-1].reshape(len(rows), -1)


def near_copy_pairs(
    rows: np.ndarray, threshold: float, size: int = THUMBNAIL
) -> list[tuple[int, int, bool]]:
    """Pairs ``(i, j, mirrored)`` with ``i < j`` whose thumbnails (from :func:`thumbnails`)
    correlate at least ``threshold``, as they are or with one of them mirrored left-right."""
    flipped = _mirrored(rows, size)
    pairs: dict[tuple[int, int], bool] = {}
    for start in range(0, len(rows), _BLOCK):
        block = rows[start : start + _BLOCK]
        direct = block @ rows.T
        mirror = block @ flipped.T
        for corr, is_mirror in ((mirror, True), (direct, False)):  # direct wins a tie
            i, j = np.nonzero(corr >= threshold)
            i = i + start
            keep = i < j
            pairs.update(
                {(int(a), int(b)): is_mirror for a, b in zip(i[keep], j[keep], strict=True)}
            )
    return sorted((i, j, m) for (i, j), m in pairs.items())


@dataclass(frozen=True)
class NearCopyGroups:
    """What :func:`group_near_copies` merged: groups of file names (``CLASS/file``), each
    holding images from at least two groups before, and the pairs found."""

    threshold: float
    groups: tuple[tuple[str, ...], ...]
    pairs: int
    mirrored_pairs: int

    @property
    def merged(self) -> int:
        """How many groups were merged into others."""
        return sum(len(g) for g in self.groups) - len(self.groups)

    def note(self) -> str:
        return (
            f"near-copies (thumbnail correlation >= {self.threshold:g}, mirror-aware): "
            f"{self.pairs} pairs ({self.mirrored_pairs} mirrored), {len(self.groups)} groups "
            f"of {sum(len(g) for g in self.groups)} images kept on one side of every split"
        )

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "pairs": self.pairs,
            "mirrored_pairs": self.mirrored_pairs,
            "groups": [list(g) for g in self.groups],
        }


def _name(sample: Sample) -> str:
    return f"{sample.path.parent.name}/{sample.path.name}"


def group_near_copies(
    samples: Sequence[Sample], threshold: float, size: int = THUMBNAIL
) -> tuple[list[Sample], NearCopyGroups]:
    """``samples`` with the groups of near-copies merged (union of their old groups), and what
    was merged. Deterministic: a merged group is named after its smallest old group."""
    rows = thumbnails([s.path for s in samples], size)
    pairs = near_copy_pairs(rows, threshold, size)
    parent = {s.group: s.group for s in samples}

    def root(group: str) -> str:
        while parent[group] != group:
            parent[group] = parent[parent[group]]
            group = parent[group]
        return group

    for i, j, _ in pairs:
        a, b = sorted((root(samples[i].group), root(samples[j].group)))
        if a != b:
            parent[b] = a
    merged = [replace(s, group=root(s.group)) for s in samples]
    members: dict[str, set[str]] = {}
    for before, after in zip(samples, merged, strict=True):
        members.setdefault(after.group, set()).add(before.group)
    names: dict[str, list[str]] = {}
    for sample in merged:
        if len(members[sample.group]) > 1:
            names.setdefault(sample.group, []).append(_name(sample))
    groups = tuple(tuple(sorted(v)) for _, v in sorted(names.items()))
    mirrored = sum(1 for *_, m in pairs if m)
    return merged, NearCopyGroups(threshold, groups, len(pairs), mirrored)
