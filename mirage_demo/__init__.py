"""Fine-tune MIRAGE (a retinal OCT foundation model) and explain its predictions.

The names the README teaches, in one place (as ``timm`` does)::

    import mirage_demo

    p = mirage_demo.Predictor.from_pretrained("path/or/hub-id")
    model, config = mirage_demo.load_checkpoint("path/or/hub-id")
    model = mirage_demo.create_classifier("mirage_base_patch32_512", num_classes=4)

Importing the package registers the ``mirage_*`` timm models; the rest loads on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from mirage_demo import models  # noqa: F401  (registers the mirage_* timm models)
from mirage_demo.version import __version__

#: public name -> the module that defines it (imported on first access)
_EXPORTS = {
    "create_classifier": "models",
    "configure_finetuning": "models",
    "optimizer_param_groups": "models",
    "checkpoint_filter_fn": "models",
    "load_dataset": "data",
    "read_image": "images",
    "Preprocessing": "data",
    "SplitSpec": "data",
    "ImageReadError": "images",
    "DataError": "data",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "push_to_hub": "checkpoint",
    "CheckpointConfig": "checkpoint",
    "CheckpointError": "checkpoint",
    "compute_metrics": "metrics",
    "write_report": "metrics",
    "write_predictions_csv": "predictions_csv",
    "Explainer": "explain",
    "METHODS": "explain",
    "Predictor": "inference",
    "Prediction": "inference",
    "Explanation": "inference",
}

__all__ = [
    "METHODS",
    "CheckpointConfig",
    "CheckpointError",
    "DataError",
    "Explainer",
    "Explanation",
    "ImageReadError",
    "Prediction",
    "Predictor",
    "Preprocessing",
    "SplitSpec",
    "__version__",
    "checkpoint_filter_fn",
    "compute_metrics",
    "configure_finetuning",
    "create_classifier",
    "load_checkpoint",
    "load_dataset",
    "optimizer_param_groups",
    "push_to_hub",
    "read_image",
    "save_checkpoint",
    "write_predictions_csv",
    "write_report",
]

if TYPE_CHECKING:
    from mirage_demo.checkpoint import (
        CheckpointConfig,
        CheckpointError,
        load_checkpoint,
        push_to_hub,
        save_checkpoint,
    )
    from mirage_demo.data import DataError, Preprocessing, SplitSpec, load_dataset
    from mirage_demo.explain import METHODS, Explainer
    from mirage_demo.images import ImageReadError, read_image
    from mirage_demo.inference import Explanation, Prediction, Predictor
    from mirage_demo.metrics import compute_metrics, write_report
    from mirage_demo.models import (
        checkpoint_filter_fn,
        configure_finetuning,
        create_classifier,
        optimizer_param_groups,
    )
    from mirage_demo.predictions_csv import write_predictions_csv


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f"mirage_demo.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mirage_demo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
