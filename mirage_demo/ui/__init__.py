"""The Gradio app: classify a scan, see where the model looked, read its report, learn OCT.

``app.py`` at the repository root only calls :func:`main`. The app is one module per job:

- :mod:`~mirage_demo.ui.registry`: which checkpoints are served; each resolved, described and
  loaded once (:class:`ModelRegistry`);
- :mod:`~mirage_demo.ui.context`: :class:`AppContext`, what every tab builder receives, and
  the texts and upload helpers the tabs share;
- one module per tab, each with its handlers (plain functions, usable without a browser) and
  its ``build_*_tab(ctx)``: :mod:`~mirage_demo.ui.classify` (``/predict``, ``/explain``),
  :mod:`~mirage_demo.ui.report` (the Model tab and the trust note), :mod:`~mirage_demo.ui.batch`
  (``/batch``), :mod:`~mirage_demo.ui.learn`;
- :mod:`~mirage_demo.ui.app`: :func:`build_app` (header, picker, :data:`TABS`),
  :func:`setup_queue` (one concurrency group, queue limits per session) and :func:`main`.

Everything goes through :class:`~mirage_demo.inference.Predictor`; each checkpoint is loaded
once, on first use, and shared by all requests (the predictor is thread-safe).
"""

from mirage_demo.ui.app import (
    LAUNCH_OPTIONS,
    TABS,
    TITLE,
    build_app,
    default_concurrency,
    main,
    setup_queue,
)
from mirage_demo.ui.batch import classify_batch
from mirage_demo.ui.classify import explain_scan, predict_scan, reblend
from mirage_demo.ui.context import (
    DISCLAIMER,
    EXAMPLES_DIR,
    METHOD_LABELS,
    PREDICTED,
    AppContext,
)
from mirage_demo.ui.registry import ModelChoice, ModelRegistry, available_models
from mirage_demo.ui.report import metrics_markdown, model_facts_markdown, model_report, trust_note

__all__ = [
    "DISCLAIMER",
    "EXAMPLES_DIR",
    "LAUNCH_OPTIONS",
    "METHOD_LABELS",
    "PREDICTED",
    "TABS",
    "TITLE",
    "AppContext",
    "ModelChoice",
    "ModelRegistry",
    "available_models",
    "build_app",
    "classify_batch",
    "default_concurrency",
    "explain_scan",
    "main",
    "metrics_markdown",
    "model_facts_markdown",
    "model_report",
    "predict_scan",
    "reblend",
    "setup_queue",
    "trust_note",
]
