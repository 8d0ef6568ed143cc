"""Preprocessed image cache: decode every image once, train on memory-mapped pixels.

Each image goes through :meth:`Preprocessing.read_resized` (read, bilinear resize, per-image
min-max to [0, 1]) and is stored as uint8 in one memory-mapped ``images.npy``, so epochs after the
first copy pixels instead of decoding JPEGs (quantisation error at most 0.5/255; augmentation
then runs on the batch, see :mod:`mirage_demo.augment`). A cache entry is keyed by the files
(path, size, modification time) and the preprocessing, so it is rebuilt when either changes,
and is built in a temporary folder and renamed into place: a killed build leaves no half
cache. Unreadable files are named in the index and skipped.

::

    <cache dir>/<key>/index.json   files, labels, unreadable files with the reason, shape
    <cache dir>/<key>/images.npy   uint8 (N, H, W)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mirage_demo.data import Preprocessing
from mirage_demo.images import ImageReadError, Sample

__all__ = [
    "CACHE_VERSION",
    "CachedImages",
    "ImageCache",
    "build_cache",
    "cache_key",
    "default_cache_dir",
    "quantize",
]

CACHE_VERSION = 1
INDEX_NAME = "index.json"
IMAGES_NAME = "images.npy"


def default_cache_dir() -> Path:
    """``$MIRAGE_DEMO_CACHE``, else ``$XDG_CACHE_HOME/mirage-demo/images`` (``~/.cache``)."""
    if os.environ.get("MIRAGE_DEMO_CACHE"):
        return Path(os.environ["MIRAGE_DEMO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mirage-demo" / "images"


def cache_key(samples: Sequence[Sample], preprocessing: Preprocessing) -> str:
    """Hash of the files (resolved path, size, mtime, label) and the preprocessing."""
    digest = hashlib.sha256()
    header = {"version": CACHE_VERSION, "preprocessing": preprocessing.to_dict()}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for sample in samples:
        path = Path(sample.path).resolve()
        try:
            stat = path.stat()
            facts = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{sample.label}\n"
        except OSError:
            facts = f"{path}\0missing\0{sample.label}\n"
        digest.update(facts.encode())
    return digest.hexdigest()[:24]


def quantize(image: torch.Tensor) -> np.ndarray:
    """A ``(1, H, W)`` image in [0, 1] as ``(H, W)`` uint8 (rounded)."""
    return image[0].mul(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()


class ImageCache:
    """A built cache entry: uint8 images aligned with the samples it was built from."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = json.loads((self.directory / INDEX_NAME).read_text())
        self.files: list[str] = index["files"]
        self.labels = np.asarray(index["labels"], dtype=np.int64)
        self.errors: dict[int, str] = {int(k): v for k, v in index["unreadable"].items()}
        self.shape: tuple[int, ...] = tuple(index["shape"])
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def images(self) -> np.ndarray:
        """The ``(N, H, W)`` uint8 array, memory-mapped read-only (opened lazily per process)."""
        if self._images is None:
            self._images = np.load(self.directory / IMAGES_NAME, mmap_mode="r")
        return self._images

    @property
    def readable(self) -> list[int]:
        """Indices of the images that could be decoded."""
        return [i for i in range(len(self.files)) if i not in self.errors]

    @property
    def unreadable(self) -> list[str]:
        """One message per unreadable file, naming it and the reason."""
        return [self.errors[i] for i in sorted(self.errors)]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None}  # workers reopen the memory map


class CachedImages(Dataset):
    """``(uint8 image (1, H, W), label, index)`` of the readable (or chosen) cached images."""

    def __init__(self, cache: ImageCache, indices: Sequence[int] | None = None) -> None:
        self.cache = cache
        self.indices = list(cache.readable if indices is None else indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, int]:
        index = self.indices[item]
        pixels = torch.from_numpy(np.array(self.cache.images[index]))
        return pixels[None], int(self.cache.labels[index]), index


class _Decode(Dataset):
    def __init__(self, samples: Sequence[Sample], preprocessing: Preprocessing) -> None:
        self.samples = list(samples)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str | None]:
        path = self.samples[index].path
        try:
            return index, quantize(self.preprocessing.read_resized(path, name=str(path))), None
        except ImageReadError as err:
            return index, None, str(err)


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def build_cache(
    samples: Sequence[Sample],
    preprocessing: Preprocessing,
    root: str | Path | None = None,
    workers: int = 0,
    progress: bool | None = None,
    desc: str = "caching images",
) -> ImageCache:
    """The cache entry of ``samples``: opened if it exists, else built (decoding in parallel
    with ``workers`` processes). ``progress``: ``None`` shows a bar only on a terminal."""
    root = Path(root) if root is not None else default_cache_dir()
    key = cache_key(samples, preprocessing)
    target = root / key
    if (target / INDEX_NAME).is_file():
        return ImageCache(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        height, width = preprocessing.input_size
        shape = (len(samples), height, width)
        images = np.lib.format.open_memmap(
            tmp / IMAGES_NAME, mode="w+", dtype=np.uint8, shape=shape
        )
        errors: dict[int, str] = {}
        loader = DataLoader(
            _Decode(samples, preprocessing),
            batch_size=16,
            num_workers=workers,
            collate_fn=_as_list,
            generator=torch.Generator(),  # leaves the global RNG stream alone
        )
        from tqdm.auto import tqdm

        with tqdm(total=len(samples), desc=desc, unit="img", disable=tqdm_disable(progress)) as bar:
            for batch in loader:
                for index, pixels, error in batch:
                    if error is None:
                        images[index] = pixels
                    else:
                        errors[index] = error
                bar.update(len(batch))
        images.flush()
        del images
        index = {
            "version": CACHE_VERSION,
            "preprocessing": preprocessing.to_dict(),
            "files": [str(s.path) for s in samples],
            "labels": [int(s.label) for s in samples],
            "unreadable": {str(k): v for k, v in sorted(errors.items())},
            "shape": list(shape),
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index))
        try:
            os.rename(tmp, target)
        except OSError:  # built meanwhile by another process (or a stale folder): use it
            if not (target / INDEX_NAME).is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImageCache(target)


def tqdm_disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``--progress/--no-progress`` option (``None``: tqdm decides,
    i.e. a bar only on a terminal)."""
    return None if progress is None else not progress
