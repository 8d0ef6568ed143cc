"""Running a model over a loader of images: the loader, the model's input, the logits.

The one batched forward path of evaluation (:mod:`mirage_demo.evaluation`), the uncertainty
fit (:mod:`mirage_demo.uncertainty`), the feature cache (:mod:`mirage_demo.probe`) and the
trainer (:mod:`train`): the files are decoded by :class:`~mirage_demo.data.FileImages` (or read
from the trainer's cache), batched by :func:`make_loader`, normalised (and, in training,
augmented) on the device by :func:`to_model_input`, and :func:`collect_logits` gathers the
logits (and penultimate features) in the loader's order. :func:`file_outputs` does all of it for
labelled image files: their :class:`Outputs`, what a report or an uncertainty fit is made of
(a probe reads the same from its feature cache: :func:`mirage_demo.probe.head_outputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mirage_demo.augment import BatchAugmentation
from mirage_demo.cache import tqdm_disable
from mirage_demo.data import FileImages, Preprocessing, collate_skip_unreadable
from mirage_demo.images import Sample
from mirage_demo.imagestats import STAT_NAMES
from mirage_demo.models import features_and_logits
from mirage_demo.quality import CheckedImages

__all__ = ["Outputs", "collect_logits", "file_outputs", "make_loader", "to_model_input"]


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


@torch.no_grad()
def collect_logits(
    model: torch.nn.Module,
    loader: DataLoader,
    preprocessing: Preprocessing,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool | None = None,
    desc: str = "predicting",
    on_batch: Callable[[int, int], None] | None = None,
    tta: bool = False,
    features: bool = False,
    checks: bool = False,
) -> tuple[np.ndarray, ...]:
    """``(logits (n, K) float32, labels, dataset indices)`` over a loader of
    ``(image, label, index)`` batches, in the loader's order. ``on_batch(done, total)`` is
    called after each batch (the app's progress bar); ``tta`` averages each image's logits
    with its horizontal mirror's, as ``Predictor(tta=True)`` does; ``features`` adds a fourth
    array, the penultimate features ``(n, D)`` of the same forward pass; ``checks`` (a loader
    of :class:`~mirage_demo.quality.CheckedImages`) adds the batches' fourth element, each
    image's gate and statistics."""
    from tqdm.auto import tqdm

    model.eval()
    logits, labels, indices, kept, checked = [], [], [], [], []
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    )
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=tqdm_disable(progress))
    total = len(loader)
    for done, batch in enumerate(bar, start=1):
        if on_batch is not None:
            on_batch(done - 1, total)
        if batch is None:  # every image of the batch was unreadable
            continue
        images, batch_labels, batch_indices, *rest = batch
        if checks:
            checked.append(rest[0].float())
        x = to_model_input(images, preprocessing, device)
        with autocast:
            feats, out = features_and_logits(model, torch.cat([x, x.flip(-1)]) if tta else x)
        if tta:
            out, feats = (t.float().view(2, len(x), -1).mean(0) for t in (out, feats))
        logits.append(out.float().cpu())
        kept.append(feats.float().cpu())
        labels.append(batch_labels)
        indices.append(batch_indices)
    if on_batch is not None:
        on_batch(total, total)
    if not logits:
        empty = (np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
        more = [np.zeros((0, 0), np.float32)] * (int(features) + int(checks))
        return (*empty, *more)
    outputs = (
        torch.cat(logits).numpy(),
        torch.cat(labels).numpy().astype(np.int64),
        torch.cat(indices).numpy().astype(np.int64),
    )
    outputs += (torch.cat(kept).numpy(),) if features else ()
    return outputs + ((torch.cat(checked).numpy(),) if checks else ())


@dataclass
class Outputs:
    """A model's outputs on the readable images of a list of labelled samples, in order."""

    logits: np.ndarray  # (n, K) float32
    labels: np.ndarray  # (n,) int64
    indices: np.ndarray  # (n,) int64: which of the samples
    features: np.ndarray  # (n, D) float32: the penultimate features of the same forward pass
    #: (n, 1 + S (1 + copies)) float32 or None (not checked): 1.0 where the image passes the
    #: quality gate, then its image statistics and those of each downsized copy
    checked: np.ndarray | None = None

    @property
    def looks_like_oct(self) -> np.ndarray | None:
        """``(n,)`` bool: passes the quality gate (None: not checked)."""
        return None if self.checked is None else self.checked[:, 0] > 0.5

    @property
    def statistics(self) -> np.ndarray | None:
        """``(n, S)`` image statistics, or ``(n, 1 + copies, S)`` with copies (None: not
        checked)."""
        if self.checked is None:
            return None
        stats = self.checked[:, 1:].reshape(len(self.checked), -1, len(STAT_NAMES))
        return stats[:, 0] if stats.shape[1] == 1 else stats


def file_outputs(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    preprocessing: Preprocessing,
    device: torch.device,
    *,
    batch_size: int = 64,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    progress: bool | None = None,
    desc: str = "predicting",
    on_batch: Callable[[int, int], None] | None = None,
    tta: bool = False,
    copies: Sequence[tuple[int, int]] | None = None,
) -> Outputs:
    """``samples`` decoded from their files (:class:`~mirage_demo.data.FileImages`) and run
    through ``model`` in batches (:func:`collect_logits`, whose options these are). With
    ``copies`` (a list, maybe empty) each image is also checked
    (:class:`~mirage_demo.quality.CheckedImages`: the gate, its statistics and those of each
    copy downsized to ``(width, JPEG quality)``), in :attr:`Outputs.checked`."""
    checks = copies is not None
    dataset = (
        CheckedImages(samples, preprocessing, copies=copies)
        if checks
        else FileImages(samples, preprocessing)
    )
    loader = make_loader(dataset, batch_size, workers, device)
    logits, labels, indices, features, *checked = collect_logits(
        model,
        loader,
        preprocessing,
        device,
        amp_dtype,
        progress,
        desc=desc,
        on_batch=on_batch,
        tta=tta,
        features=True,
        checks=checks,
    )
    return Outputs(logits, labels, indices, features, checked[0] if checks else None)
