"""Data for the loop: the epoch sampler, loaders, model inputs (the datasets of file and cached
images are :class:`mirage_demo.data.FileImages` and :class:`mirage_demo.cache.CachedImages`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mirage_demo.augment import BatchAugmentation
from mirage_demo.data import (
    FileImages,
    Preprocessing,
    Sample,
    balanced_sampler,
    collate_skip_unreadable,
)

__all__ = ["EpochSampler", "FileImages", "make_loader", "to_model_input"]

log = logging.getLogger(__name__)


class EpochSampler(Sampler[int]):
    """This rank's share of an epoch: one global order per epoch, the same on every rank.

    The order is a shuffle (``balance_power=None``) or a class-balanced draw with replacement,
    classes weighted by ``count ** -balance_power`` (1: equally often, 0.5: square-root
    sampling; see :func:`balanced_sampler`). It is seeded by ``seed + epoch``, so it depends
    only on the epoch: a resumed run sees what the
    uninterrupted one saw. It is padded by wrapping around to a multiple of the world size,
    then rank ``r`` takes positions ``r, r + world, ...``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        balance_power: float | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.samples = list(samples)
        self.num_classes = num_classes
        self.balance_power = balance_power
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        """The global order of the current epoch (before sharding)."""
        seed = self.seed + self.epoch
        if self.balance_power is not None:
            power = self.balance_power
            return list(balanced_sampler(self.samples, self.num_classes, seed=seed, power=power))
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(len(self.samples), generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        total = len(self) * self.world_size
        order += order[: total - len(order)]
        return iter(order[self.rank : total : self.world_size])

    def __len__(self) -> int:
        return math.ceil(len(self.samples) / self.world_size)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    sampler: Sampler[int] | None = None,
) -> DataLoader:
    """A loader in dataset order (or ``sampler``'s); unreadable files are dropped."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,  # datasets hold no per-epoch state (augment is later)
        pin_memory=device.type == "cuda",
        collate_fn=collate_skip_unreadable,
        generator=torch.Generator(),  # workers' seeds must not consume the global RNG
    )


def to_model_input(
    images: torch.Tensor,
    preprocessing: Preprocessing,
    device: torch.device,
    augment: BatchAugmentation | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A loader batch (cached uint8 or [0, 1] floats) as the model's input on ``device``."""
    images = images.to(device, non_blocking=True)
    images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    if augment is not None:
        images = augment(images, generator)
    return preprocessing.normalize(images)
