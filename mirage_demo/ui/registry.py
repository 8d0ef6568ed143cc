"""The checkpoints the app serves: which ones, and each loaded once, on first use."""

from __future__ import annotations

import html
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from mirage_demo.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    read_config,
    resolve_checkpoint_dir,
)
from mirage_demo.inference import DEFAULT_CHECKPOINT, Predictor
from mirage_demo.metrics import load_report
from mirage_demo.zerogpu import serving_device, wants_gpu

__all__ = [
    "ASSETS",
    "ENV_CHECKPOINTS",
    "ENV_PRETRAINING",
    "ModelChoice",
    "ModelRegistry",
    "available_models",
    "pretraining_weights",
]

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"
BUNDLED_MODELS = (DEFAULT_CHECKPOINT, ASSETS / "demo-vit")
ENV_CHECKPOINTS = "MIRAGE_DEMO_CHECKPOINTS"
#: The Space setting of ``--pretraining``: MIRAGE's release weights for "How it learned".
ENV_PRETRAINING = "MIRAGE_DEMO_PRETRAINING"
SESSION_PREFIX = "adapted: "  # the picker name of a session's adapted model starts so
SESSION_MODEL_TTL_S = 600  # a session's adapted model is forgotten 10 minutes after its last use
MAX_SESSION_MODELS = 16  # adapted models kept at once (each a head on a shared backbone)


@dataclass(frozen=True)
class ModelChoice:
    """A checkpoint the app can serve: its name in the picker and where it comes from."""

    name: str
    source: str


def available_models(extra: Sequence[str] = ()) -> list[ModelChoice]:
    """Checkpoints given on the command line or in ``$MIRAGE_DEMO_CHECKPOINTS`` (comma
    separated), then the bundled ones; the first is the default."""
    sources = [*extra, *os.environ.get(ENV_CHECKPOINTS, "").replace(",", " ").split()]
    sources += [str(path) for path in BUNDLED_MODELS if (path / "config.json").is_file()]
    choices, seen = [], set()
    for source in sources:
        key = str(Path(source).resolve()) if Path(source).exists() else source
        if key in seen:
            continue
        seen.add(key)
        path = Path(source)
        if path.is_dir() and path.resolve().is_relative_to(ASSETS):
            name = f"{path.name} (bundled)"
        else:
            name = path.name if path.is_dir() else source
        choices.append(ModelChoice(name, source))
    return choices


def pretraining_weights(asked: str | None = None) -> str | None:
    """MIRAGE's release weights for the "How it learned" tab: ``--pretraining``, else
    ``$MIRAGE_DEMO_PRETRAINING`` (``mirage_base`` or ``mirage_large``; empty: none)."""
    return asked or os.environ.get(ENV_PRETRAINING, "").strip() or None


class ModelRegistry:
    """The served checkpoints by picker name (thread-safe).

    Each checkpoint is resolved (a Hub repo id downloaded) once, its ``config.json`` read once
    and its model loaded once, on first use; :meth:`config` and :meth:`report` never load the
    model, so the app's layout is built from them alone. Models run on ``device``, or on the
    CPU inside a ZeroGPU fallback (a second copy, loaded then; see :mod:`mirage_demo.zerogpu`).
    ``small_on_cpu`` (set on ZeroGPU): models that do not :func:`~mirage_demo.zerogpu.wants_gpu`
    always run on the CPU.
    """

    def __init__(
        self, choices: Sequence[ModelChoice], device: str = "cpu", small_on_cpu: bool = False
    ) -> None:
        if not choices:
            raise CheckpointError(
                "no checkpoint to serve: the bundled demo model is missing and none was given "
                f"(python app.py --checkpoint DIR_OR_HUB_ID, or set {ENV_CHECKPOINTS})"
            )
        self.choices = {choice.name: choice for choice in choices}
        self.device = device
        self.small_on_cpu = small_on_cpu
        self._wants_gpu: dict[str, bool] = {}
        self._directories: dict[str, Path] = {}
        self._configs: dict[str, CheckpointConfig] = {}
        self._loaded: dict[tuple[str, str], Predictor] = {}
        self._failed: dict[str, str] = {}  # name -> why it cannot load: never retried
        self._lock = threading.RLock()
        #: models added while serving (a session's adapted model): name -> (predictor,
        #: directory, last use); forgotten :data:`SESSION_MODEL_TTL_S` after their last use
        self._session: dict[str, tuple[Predictor, Path, float]] = {}

    @property
    def names(self) -> list[str]:
        """The checkpoints served to everyone (not the session models)."""
        return list(self.choices)

    @property
    def default(self) -> str:
        return self.names[0]

    def add_session_model(self, name: str, predictor: Predictor, directory: Path) -> None:
        """Serve ``predictor`` (its report files in ``directory``) under ``name`` until
        :data:`SESSION_MODEL_TTL_S` after its last use; at most :data:`MAX_SESSION_MODELS`
        are kept, the least recently used go first. Only a picker that offers ``name`` (one
        session's) can reach it."""
        with self._lock:
            self._expire()
            self._session[name] = (predictor, Path(directory), time.monotonic())
            while len(self._session) > MAX_SESSION_MODELS:
                del self._session[min(self._session, key=lambda n: self._session[n][2])]

    def _expire(self) -> None:
        now = time.monotonic()
        for name in [
            n for n, (*_, used) in self._session.items() if now - used > SESSION_MODEL_TTL_S
        ]:
            del self._session[name]

    def _session_model(self, name: str | None) -> tuple[Predictor, Path] | None:
        """A session model's predictor and directory (its last use renewed), else None."""
        with self._lock:
            self._expire()
            if name not in self._session:
                return None
            predictor, directory, _ = self._session[name]
            self._session[name] = (predictor, directory, time.monotonic())
            return predictor, directory

    def _name(self, name: str | None) -> str:
        name = name or self.default
        if name.startswith(SESSION_PREFIX) and name not in self.choices:
            raise gr.Error(
                "This adapted model was forgotten (unused for 10 minutes, or the app "
                "restarted): adapt again on the Adapt tab."
            )
        if name not in self.choices:
            shown = html.escape(repr(str(name))[:80])
            raise gr.Error(f"Unknown model {shown}. Available: {', '.join(self.names)}.")
        if name in self._failed:
            raise gr.Error(self._failed[name])
        return name

    def _fail(self, name: str, err: Exception) -> gr.Error:
        """Remember that ``name`` cannot load (so no request retries it) and say why."""
        reason = str(err) if isinstance(err, CheckpointError) else type(err).__name__
        self._failed[name] = html.escape(f"Cannot load model {name!r}: {reason}")
        return gr.Error(self._failed[name])

    def directory(self, name: str | None = None) -> Path:
        """The local directory of a model's checkpoint (resolved once; report files live
        there)."""
        if session := self._session_model(name):
            return session[1]
        name = self._name(name)
        with self._lock:
            if name not in self._directories:
                try:
                    self._directories[name] = resolve_checkpoint_dir(self.choices[name].source)
                except CheckpointError as err:
                    raise self._fail(name, err) from err
            return self._directories[name]

    def config(self, name: str | None = None) -> CheckpointConfig:
        """A model's checkpoint config (read once), without loading its weights."""
        if session := self._session_model(name):
            return session[0].config
        name = self._name(name)
        with self._lock:
            if name not in self._configs:
                loaded = [p for (n, _), p in self._loaded.items() if n == name]
                if loaded and loaded[0].config is not None:
                    self._configs[name] = loaded[0].config
                else:
                    try:
                        self._configs[name] = read_config(self.directory(name))
                    except CheckpointError as err:
                        raise self._fail(name, err) from err
            return self._configs[name]

    def on_cpu(self, name: str | None = None) -> bool:
        """Whether a model always runs on the CPU (``small_on_cpu`` and a small model): its
        calls need no GPU."""
        if not self.small_on_cpu:
            return False
        name = self._name(name)
        with self._lock:
            if name not in self._wants_gpu:
                try:
                    self._wants_gpu[name] = wants_gpu(self.config(name))
                except CheckpointError as err:
                    raise self._fail(name, err) from err
            return not self._wants_gpu[name]

    def get(self, name: str | None = None) -> Predictor:
        """The predictor for a picker name (the default if empty), loaded on first use."""
        if session := self._session_model(name):
            return session[0]
        name = self._name(name)
        key = (name, "cpu" if self.on_cpu(name) else serving_device(self.device))
        with self._lock:
            if key not in self._loaded:
                directory = self.directory(name)
                try:
                    predictor = Predictor.from_pretrained(directory, device=key[1])
                except Exception as err:  # any failure is final: say why once, keep serving
                    raise self._fail(name, err) from err
                self._loaded[key] = predictor
                self._configs.setdefault(name, predictor.config)
            return self._loaded[key]

    def preload(self) -> None:
        """Load every model now (on ZeroGPU models must be placed at start-up)."""
        for name in self.names:
            self.get(name)

    def report(self, name: str | None = None) -> dict[str, Any] | None:
        """A model's ``metrics.json``, or ``None`` if it has no report."""
        return load_report(self.directory(name))
