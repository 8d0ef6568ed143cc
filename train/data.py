"""Data for the loop: the epoch sampler. Loaders and model inputs are
:mod:`mirage_demo.logits`' (the app evaluates with them too), the datasets of file and
cached images :class:`mirage_demo.data.FileImages` and :class:`mirage_demo.cache.CachedImages`;
re-exported here."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from mirage_demo.data import FileImages, balanced_sampler
from mirage_demo.images import Sample
from mirage_demo.logits import make_loader, to_model_input

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
