"""Classify OCT B-scans and explain the predictions: the API behind the app and the CLI.

>>> p = Predictor.from_pretrained("path/to/checkpoint")     # or a Hub repo id
>>> r = p.predict("scan.jpeg")                              # path | bytes | PIL | ndarray
>>> r.label, r.probabilities, r.warnings
>>> e = p.explain("scan.jpeg", method="gradcam")            # e.heatmap, e.overlay, e.prediction

Images go through the checkpoint's own preprocessing (``config.preprocessing``:
:meth:`~mirage_demo.data.Preprocessing.read_resized` then ``normalize``). Probabilities are
``softmax(logits / temperature)`` with the checkpoint's calibrated temperature; with ``tta=True``
the logits are the mean over the image and its horizontal flip. Every result carries the
quality check of :mod:`mirage_demo.quality` in ``warnings`` and, when the checkpoint carries
them (:mod:`mirage_demo.uncertainty`), its prediction set at ``level`` (default 90%) and whether
the scan is unlike the training scans, both from the same forward pass; and its verdict,
``trust`` (:mod:`mirage_demo.verdict`: ``"not_a_bscan"``, ``"unlike_training"``, ``"unsure"``
or ``"sure"``), decided here for every caller.

A :class:`Predictor` keeps no per-call state, so one instance may serve several threads: the
model stays in eval mode, hooks are registered per call for the calling thread only and always
removed (see :mod:`mirage_demo.explain`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from mirage_demo.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint_dir,
)
from mirage_demo.data import Preprocessing, minmax
from mirage_demo.explain import (
    CLASS_AGNOSTIC_METHODS,
    METHODS,
    Explainer,
    canonical_method,
    render_overlay,
)
from mirage_demo.images import ImageReadError, ImageSource, open_image, read_image
from mirage_demo.models import features_and_logits
from mirage_demo.quality import QualityReport, assess, full_scale_of, rgb_of
from mirage_demo.uncertainty import DEFAULT_LEVEL, Uncertainty, load_uncertainty
from mirage_demo.verdict import decide

__all__ = [
    "DEFAULT_CHECKPOINT",
    "DEFAULT_COLORMAP",
    "METHODS",
    "Explanation",
    "Prediction",
    "Predictor",
]

#: The demo model bundled with the repository (``assets/demo-model/`` at its root).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
DEFAULT_COLORMAP = "jet"  # the heat maps' matplotlib colormap


def _finite(value: float | None) -> float | None:
    """``value``, or None when it is not a finite number (JSON has no NaN or infinity)."""
    return value if value is None or math.isfinite(value) else None


@dataclass
class Prediction:
    """One image's class probabilities, the quality check's warnings and timings (seconds);
    the prediction set at ``level`` and the out-of-distribution score and flag (None when the
    checkpoint has no uncertainty statistics)."""

    label: str
    index: int
    probabilities: dict[str, float]
    logits: list[float]
    warnings: list[str]
    quality: QualityReport
    image_size: tuple[int, int]  # (height, width) of the input image
    timing: dict[str, float] = field(default_factory=dict)
    source: str | None = None
    prediction_set: list[str] | None = None  # most probable first
    level: float | None = None
    ood_score: float | None = None
    out_of_distribution: bool | None = None
    #: the probability the top class needs for "sure" (the checkpoint's bar; 0: none)
    sure_probability: float | None = None
    #: how far to trust the answer (:mod:`mirage_demo.verdict`): "not_a_bscan",
    #: "unlike_training", "unsure", "sure"; None: no statistics (and a B-scan)
    trust: str | None = None

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]

    def record(self) -> dict[str, Any]:
        """The answer as the CLI's ``--json`` line and the app's ``/predict_json``: ``file``,
        ``label``, ``probabilities``, ``trust`` (the verdict), ``prediction_set``, ``level``,
        ``out_of_distribution``, ``ood_score``, ``sure_probability`` (the last five None
        without uncertainty statistics), ``warnings``. Valid JSON: a number that is not
        finite (a distance beyond any number) is None."""
        keys = ("label", "probabilities", "trust", "prediction_set", "level")
        keys += ("out_of_distribution", "ood_score", "sure_probability", "warnings")
        record = {"file": self.source, **{key: getattr(self, key) for key in keys}}
        record["probabilities"] = {k: _finite(v) for k, v in self.probabilities.items()}
        record["ood_score"] = _finite(self.ood_score)
        return record

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``file``, ``label``, ``probabilities``, ``warnings`` and the rest."""
        return {
            "file": self.source,
            "label": self.label,
            "probabilities": self.probabilities,
            "warnings": list(self.warnings),
            "trust": self.trust,
            "prediction_set": self.prediction_set,
            "level": self.level,
            "out_of_distribution": self.out_of_distribution,
            "ood_score": self.ood_score,
            "sure_probability": self.sure_probability,
            "logits": self.logits,
            "quality": self.quality.to_dict(),
            "image_size": list(self.image_size),
            "timing": self.timing,
        }


@dataclass
class Explanation:
    """A prediction and where the model looked for class ``target``.

    ``heatmap`` is float32 ``(H, W)`` in [0, 1] at the input image's own size; ``overlay`` is
    ``image`` (the min-maxed grayscale scan) with the colour-mapped heatmap blended on top.
    """

    prediction: Prediction
    method: str
    target: str
    target_index: int
    heatmap: np.ndarray
    overlay: Image.Image
    class_specific: bool
    image: np.ndarray  # the scan the overlay is drawn on: (H, W) grayscale in [0, 1]
    timing: dict[str, float] = field(default_factory=dict)


@dataclass
class _Loaded:
    tensor: torch.Tensor  # (1, H, W) at the model's input size, in [0, 1]
    display: np.ndarray  # (H, W) original size, min-maxed to [0, 1]
    quality: QualityReport
    name: str
    seconds: float


class Predictor:
    """A classifier, its class names, preprocessing and temperature: predictions and
    explanations for single images or batches; with ``uncertainty``, each answer's prediction
    set (at ``level``, or the level a call asks for) and out-of-distribution flag."""

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        preprocessing: Preprocessing | None = None,
        temperature: float = 1.0,
        *,
        tta: bool = False,
        target_layer: nn.Module | None = None,
        colormap: str = DEFAULT_COLORMAP,
        opacity: float = 0.5,
        uncertainty: Uncertainty | None = None,
        level: float = DEFAULT_LEVEL,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.model = model.eval()
        self.class_names = [str(name) for name in class_names]
        num_outputs = getattr(model, "num_classes", None)
        if num_outputs is not None and num_outputs != len(self.class_names):
            raise ValueError(
                f"the model has {num_outputs} outputs but {len(self.class_names)} class names"
            )
        self.preprocessing = preprocessing or Preprocessing.from_model(model)
        self.temperature = float(temperature)
        self.tta = tta
        self.colormap = colormap
        self.opacity = opacity
        self.explainer = Explainer(model, target_layer=target_layer)
        self.config: CheckpointConfig | None = None
        self.uncertainty = uncertainty
        self.level = check_level(level)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path = DEFAULT_CHECKPOINT,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> Predictor:
        """Load a checkpoint directory or Hub repo id (default: the bundled demo model)."""
        is_default = Path(source).expanduser().resolve() == DEFAULT_CHECKPOINT
        if is_default and not DEFAULT_CHECKPOINT.is_dir():
            raise CheckpointError(
                f"the bundled demo model is missing: expected a checkpoint directory at "
                f"{DEFAULT_CHECKPOINT}; pass a checkpoint directory or Hub repo id instead"
            )
        directory = resolve_checkpoint_dir(source)
        model, config = load_checkpoint(directory, device=device)
        width = getattr(model, "num_features", None)
        uncertainty = load_uncertainty(directory, config, feature_dim=width)
        predictor = cls(
            model,
            config.class_names,
            config.preprocessing,
            config.temperature,
            uncertainty=uncertainty,
            **kwargs,
        )
        predictor.config = config
        return predictor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def methods(self) -> tuple[str, ...]:
        """The explanation methods this model supports."""
        return self.explainer.methods

    # ----------------------------------------------------------------------------------------
    # Prediction

    def predict(
        self, image: ImageSource, *, name: str | None = None, level: float | None = None
    ) -> Prediction:
        """Classify one image (a path, the file's bytes, a PIL image or an array)."""
        names = [name] if name else None
        return self.predict_batch([image], batch_size=1, names=names, level=level)[0]

    def predict_batch(
        self,
        images: Iterable[ImageSource | ImageReadError],
        batch_size: int = 8,
        *,
        names: Sequence[str | None] | None = None,
        on_error: Literal["raise", "return"] = "raise",
        progress: Callable[[int, int], None] | None = None,
        level: float | None = None,
    ) -> list[Prediction | ImageReadError]:
        """Classify images (paths, file bytes, PIL images or arrays) in batches, in order.

        An unreadable image raises :class:`~mirage_demo.data.ImageReadError`, or with
        ``on_error="return"`` its error (``.name``, ``.reason``) takes its place in the result
        list and the others go on; an :class:`ImageReadError` given as an input is passed
        through the same way (e.g. a member that could not be taken out of an archive).
        ``progress(done, total)`` is called before each batch and once at the end; ``level``:
        the prediction sets' (default: the predictor's).
        """
        if on_error not in ("raise", "return"):
            raise ValueError("on_error must be 'raise' or 'return'")
        level = self.level if level is None else check_level(level)
        images = list(images)
        names = list(names) if names is not None else [None] * len(images)
        if len(names) != len(images):
            raise ValueError(f"{len(names)} names for {len(images)} images")
        results: list[Prediction | ImageReadError | None] = [None] * len(images)
        step = max(1, int(batch_size))
        for start in range(0, len(images), step):
            if progress is not None:
                progress(start, len(images))
            chunk: list[tuple[int, _Loaded]] = []
            for index in range(start, min(start + step, len(images))):
                try:
                    if isinstance(images[index], ImageReadError):
                        raise images[index]
                    chunk.append((index, self._load(images[index], names[index])))
                except ImageReadError as err:
                    if on_error == "raise":
                        raise
                    results[index] = err
            if not chunk:
                continue
            began = time.perf_counter()
            logits, features = self._outputs(torch.stack([loaded.tensor for _, loaded in chunk]))
            seconds = (time.perf_counter() - began) / len(chunk)
            for i, (index, loaded) in enumerate(chunk):
                timing = {"model_s": seconds}
                results[index] = self._prediction(logits[i], features[i], loaded, timing, level)
        if progress is not None:
            progress(len(images), len(images))
        return results

    def _outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, K)`` and penultimate features ``(B, D)`` for ``(B, 1, H, W)`` [0, 1]
        images, from one forward pass (means over the views with TTA)."""
        x = self.preprocessing.normalize(images).to(self.device)
        views = torch.cat([x, x.flip(-1)]) if self.tta else x
        with torch.inference_mode():
            features, logits = features_and_logits(self.model, views)
        outputs = (logits.float().cpu(), features.float().cpu())
        return tuple(t.view(len(views) // len(x), len(x), -1).mean(0) for t in outputs)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities: ``softmax(logits / temperature)``."""
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def _prediction(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        loaded: _Loaded,
        timing: dict[str, float],
        level: float,
    ) -> Prediction:
        probs = self.probabilities(logits).tolist()
        index = int(np.argmax(probs))
        timing = {"load_s": loaded.seconds, **timing}
        timing["total_s"] = sum(timing.values())
        passes = loaded.quality.looks_like_oct
        answer: dict[str, Any] = {"trust": decide(passes, None, None)}
        if self.uncertainty is not None:
            statistics = np.array([loaded.quality.statistics])
            answer = self.uncertainty.answers(
                np.array([probs]), features[None].numpy(), level, statistics, [passes]
            )[0]
        return Prediction(
            label=self.class_names[index],
            index=index,
            probabilities=dict(zip(self.class_names, probs, strict=True)),
            logits=logits.tolist(),
            warnings=list(loaded.quality.warnings),
            quality=loaded.quality,
            image_size=tuple(loaded.display.shape),
            timing=timing,
            source=loaded.name,
            **answer,
        )

    # ----------------------------------------------------------------------------------------
    # Explanations

    def explain(
        self,
        image: ImageSource,
        method: str = "gradcam",
        target: int | str | None = None,
        *,
        name: str | None = None,
        colormap: str | None = None,
        opacity: float | None = None,
        level: float | None = None,
    ) -> Explanation:
        """Predict and explain one image with one forward pass.

        ``target`` (class index or name) defaults to the predicted class; ``eigencam``,
        ``attention`` and ``rollout`` are class-agnostic. ``heatmap`` has the image's own size.
        """
        method = self.explainer.check_method(canonical_method(method))
        target_index = None if target is None else self.class_index(target)
        loaded = self._load(image, name)
        began = time.perf_counter()
        x = self.preprocessing.normalize(loaded.tensor[None])
        views = torch.cat([x, x.flip(-1)]) if self.tta else x
        trace = self.explainer.trace(views, method)
        logits = trace.logits.float().cpu().mean(0)
        features = trace.features.float().cpu().mean(0)
        model_s = time.perf_counter() - began
        level = self.level if level is None else check_level(level)
        prediction = self._prediction(logits, features, loaded, {"model_s": model_s}, level)
        if target_index is None:
            target_index = prediction.index
        began = time.perf_counter()
        heatmap = self.explainer.heatmaps(
            trace, targets=[target_index], rows=[0], size=loaded.display.shape
        )[0]
        del trace  # frees the tail's graph
        overlay = render_overlay(
            loaded.display,
            heatmap,
            colormap or self.colormap,
            self.opacity if opacity is None else opacity,
        )
        explain_s = time.perf_counter() - began
        prediction.timing["explain_s"] = explain_s
        prediction.timing["total_s"] += explain_s
        return Explanation(
            prediction=prediction,
            method=method,
            target=self.class_names[target_index],
            target_index=target_index,
            heatmap=heatmap.astype(np.float32, copy=False),
            overlay=overlay,
            class_specific=method not in CLASS_AGNOSTIC_METHODS,
            image=loaded.display,
            timing=dict(prediction.timing),
        )

    def class_index(self, target: int | str) -> int:
        """A class's index from its name or index (``"DME"``, ``1`` or ``"1"``)."""
        if isinstance(target, str) and not target.lstrip("-").isdigit():
            if target not in self.class_names:
                raise ValueError(f"unknown class {target!r}; classes: {self.class_names}")
            return self.class_names.index(target)
        index = int(target)
        if not 0 <= index < len(self.class_names):
            raise ValueError(f"class index {index} is not in 0..{len(self.class_names) - 1}")
        return index

    # ----------------------------------------------------------------------------------------
    # Reading images

    def _load(self, image: ImageSource, name: str | None = None) -> _Loaded:
        """Decode once: the model input (via the checkpoint's preprocessing), the picture shown
        under overlays and the quality check."""
        began = time.perf_counter()
        if isinstance(image, (str, os.PathLike, bytes, bytearray)) or hasattr(image, "read"):
            label = name or (str(image) if isinstance(image, (str, os.PathLike)) else "image")
            with open_image(image, label) as opened:  # bounded size, upright
                loaded = self._load(opened, label)
            loaded.seconds = time.perf_counter() - began
            return loaded
        if not isinstance(image, (Image.Image, np.ndarray)):
            raise TypeError(
                f"expected a path, bytes, PIL image or numpy array, not {type(image).__name__}"
            )
        label = name or "image"
        if isinstance(image, Image.Image):
            image = open_image(image, label)
        gray = read_image(image, label)  # (H, W) float32 in the image's own range
        scale = full_scale_of(image, gray)
        quality = assess(gray, rgb_of(image, scale), scale)
        tensor = self.preprocessing.read_resized(gray, label)
        display = minmax(torch.from_numpy(gray)).numpy()
        return _Loaded(tensor, display, quality, label, time.perf_counter() - began)


def check_level(level: float) -> float:
    """A prediction sets' level, strictly between 0 and 1 (a one-line error otherwise)."""
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"the prediction sets' level must be between 0 and 1, got {level}")
    return level
