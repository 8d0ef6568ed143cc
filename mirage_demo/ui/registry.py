"""The checkpoints the app serves: which ones, and each loaded once, on first use."""

from __future__ import annotations

import html
import logging
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
from mirage_demo.reports import ReportError, check_report, load_report
from mirage_demo.testscans import ScanSet, scan_set_for
from mirage_demo.zerogpu import serving_device, wants_gpu

__all__ = [
    "ASSETS",
    "ENV_CHECKPOINTS",
    "ENV_DATA_ROOTS",
    "ENV_PRETRAINING",
    "ModelChoice",
    "ModelRegistry",
    "available_models",
    "pretraining_weights",
]

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"
BUNDLED_MODELS = (DEFAULT_CHECKPOINT, ASSETS / "demo-vit")
ENV_CHECKPOINTS = "MIRAGE_DEMO_CHECKPOINTS"
#: The Space setting of ``--pretraining``: MIRAGE's release weights for "How it learned".
ENV_PRETRAINING = "MIRAGE_DEMO_PRETRAINING"
#: Folders (separated by the path separator) whose images the explorer, quiz and feature map
#: may show as a checkpoint's test scans; a checkpoint's config.json never names one.
ENV_DATA_ROOTS = "MIRAGE_DEMO_DATA_ROOTS"
SESSION_PREFIX = "adapted: "  # the picker name of a session's adapted model starts so
SESSION_MODEL_TTL_S = 600  # a session's adapted model is forgotten 10 minutes after its last use
MAX_MODELS_PER_SESSION = 2  # a browser tab's adapted models; its third replaces its oldest
MAX_SESSION_MODELS = 64  # adapted models of all sessions (each a head on a shared backbone)
FORGOTTEN_KEPT = 256  # why a session's model was forgotten, for the next request naming it
EXPIRED = "it was unused for 10 minutes"
NOT_SERVED_HERE = (
    "This adapted model is not served in this browser tab (or the app restarted): adapt "
    "again on the Adapt tab."
)
REPLACED = f"each browser tab keeps its {MAX_MODELS_PER_SESSION} latest adapted models"


@dataclass
class SessionModel:
    """A model added while serving (a session's adapted model): only its session sees it."""

    owner: str | None  # the Gradio session hash of the browser tab that adapted it
    predictor: Predictor
    directory: Path  # its report files; its scans in ``directory / "scans"``
    used: float  # time.monotonic() of its last use


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
        self,
        choices: Sequence[ModelChoice],
        device: str = "cpu",
        small_on_cpu: bool = False,
        data_roots: Sequence[str | Path] | None = None,
    ) -> None:
        if not choices:
            raise CheckpointError(
                "no checkpoint to serve: the bundled demo model is missing and none was given "
                f"(python app.py --checkpoint DIR_OR_HUB_ID, or set {ENV_CHECKPOINTS})"
            )
        self.choices = {choice.name: choice for choice in choices}
        self.device = device
        self.small_on_cpu = small_on_cpu
        if data_roots is None:
            data_roots = [r for r in os.environ.get(ENV_DATA_ROOTS, "").split(os.pathsep) if r]
        self.data_roots = [Path(root) for root in data_roots]
        self._wants_gpu: dict[str, bool] = {}
        self._directories: dict[str, Path] = {}
        self._configs: dict[str, CheckpointConfig] = {}
        self._loaded: dict[tuple[str, str], Predictor] = {}
        self._failed: dict[str, str] = {}  # name -> why it cannot load: never retried
        self._reports: dict[str, dict[str, Any] | None] = {}  # read (and checked) once
        self._scans: dict[str, tuple[ScanSet | None, str]] = {}
        self._lock = threading.RLock()
        #: models added while serving (sessions' adapted models), by picker name
        self._session: dict[str, SessionModel] = {}
        self._forgotten: dict[str, tuple[str | None, str]] = {}  # name -> (owner, why)

    @property
    def names(self) -> list[str]:
        """The checkpoints served to everyone (not the session models)."""
        return list(self.choices)

    @property
    def default(self) -> str:
        return self.names[0]

    def add_session_model(
        self, name: str, predictor: Predictor, directory: Path, owner: str | None = None
    ) -> list[str]:
        """Serve ``predictor`` (its report files in ``directory``) under ``name`` to the session
        ``owner`` until :data:`SESSION_MODEL_TTL_S` after its last use. A session keeps at most
        :data:`MAX_MODELS_PER_SESSION` (its least recently used goes; returned), and no
        session's model is ever pushed out by another's: with :data:`MAX_SESSION_MODELS` in
        all, the next is refused (a ``gr.Error`` saying to wait)."""
        with self._lock:
            self._expire()
            mine = sorted(
                (n for n, m in self._session.items() if m.owner == owner and n != name),
                key=lambda n: self._session[n].used,
            )
            replaced = mine[: max(0, len(mine) + 1 - MAX_MODELS_PER_SESSION)]
            others = len(self._session) - len(mine) - (name in self._session)
            if others + len(mine) - len(replaced) + 1 > MAX_SESSION_MODELS:
                raise gr.Error(
                    f"The app already serves {MAX_SESSION_MODELS} adapted models for other "
                    "visitors: try again in a few minutes (each is forgotten after 10 minutes "
                    "unused)."
                )
            for old in replaced:
                self._forget(old, REPLACED)
            self._session[name] = SessionModel(owner, predictor, Path(directory), time.monotonic())
            return replaced

    def session_names(self, owner: str | None) -> list[str]:
        """The adapted models the session ``owner`` may pick, oldest first."""
        with self._lock:
            self._expire()
            mine = [n for n, m in self._session.items() if m.owner == owner]
            return sorted(mine, key=lambda n: self._session[n].used)

    def may_use(self, name: Any, session: str | None) -> bool:
        """Whether a request of ``session`` may name ``name``: any shared model, and only
        the adapted models that session made (those it made and lost get their reason)."""
        if not isinstance(name, str) or not name.startswith(SESSION_PREFIX):
            return True
        if name in self.choices:
            return True
        with self._lock:
            if name in self._session:
                return self._session[name].owner == session
            return self._forgotten.get(name, (object(), ""))[0] == session

    def _forget(self, name: str, why: str) -> None:
        self._forgotten[name] = (self._session.pop(name).owner, why)
        while len(self._forgotten) > FORGOTTEN_KEPT:
            del self._forgotten[next(iter(self._forgotten))]

    def _expire(self) -> None:
        now = time.monotonic()
        for name in [n for n, m in self._session.items() if now - m.used > SESSION_MODEL_TTL_S]:
            self._forget(name, EXPIRED)

    def _session_model(self, name: str | None) -> SessionModel | None:
        """A session model (its last use renewed), else None. Which session may name it is
        checked where every request enters (:func:`mirage_demo.ui.app.setup_queue`) and
        before every model call (:meth:`~mirage_demo.ui.context.AppContext.model_call`)."""
        with self._lock:
            self._expire()
            found = self._session.get(name) if name else None
            if found is not None:
                found.used = time.monotonic()
            return found

    def _name(self, name: str | None) -> str:
        name = name or self.default
        if name.startswith(SESSION_PREFIX) and name not in self.choices:
            why = self._forgotten.get(name, (None, ""))[1]
            if not why:
                raise gr.Error(NOT_SERVED_HERE)
            raise gr.Error(f"This adapted model is no longer served ({why}): adapt again.")
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
            return session.directory
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
            return session.predictor.config
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
            return session.predictor
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
        """A model's ``metrics.json`` (read and checked once), or ``None`` if it has none or
        it cannot be used (too large, not JSON, a field of the wrong type: logged once)."""
        if session := self._session_model(name):  # the app wrote it: small, read each time
            return _checked_report(session.directory, session.predictor.config)
        name = self._name(name)
        with self._lock:
            if name not in self._reports:
                self._reports[name] = _checked_report(self.directory(name), self.config(name))
            return self._reports[name]

    def scan_set(self, name: str | None = None) -> tuple[ScanSet | None, str]:
        """A model's test scans (read once): the bundled copies, or images inside the data
        folders the app was given (an adapted model: its own uploaded scans), never where a
        checkpoint's config.json points. ``(None, why)`` when there are none."""
        if session := self._session_model(name):
            return scan_set_for(session.directory, roots=[session.directory / "scans"])
        name = self._name(name)
        with self._lock:
            if name not in self._scans:
                self._scans[name] = scan_set_for(self.directory(name), roots=self.data_roots)
            return self._scans[name]


def _checked_report(directory: Path, config: CheckpointConfig | None) -> dict[str, Any] | None:
    try:
        report = load_report(directory)
        names = config.class_names if config is not None else []
        return None if report is None else check_report(report, names)
    except (ReportError, OSError) as err:
        log.warning("%s: the report is not shown: %s", directory, err)
        return None
