"""What every tab builder receives (:class:`AppContext`), and the texts and helpers they share."""

from __future__ import annotations

import atexit
import contextlib
import csv
import functools
import hashlib
import html
import inspect
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
from gradio.context import LocalContext
from PIL import Image

from mirage_demo.images import IMAGE_SUFFIXES, ImageReadError
from mirage_demo.inference import Prediction
from mirage_demo.ui.registry import ASSETS, NOT_SERVED_HERE, ModelRegistry
from mirage_demo.zerogpu import gpu_task

__all__ = [
    "COMPARE_GPU_SECONDS",
    "DISCLAIMER",
    "EXAMPLES_DIR",
    "LONG_JOBS_CONCURRENCY_ID",
    "METHOD_LABELS",
    "MODEL_CONCURRENCY_ID",
    "PREDICTED",
    "SCAN_GPU_SECONDS",
    "STATE_TTL_S",
    "AppContext",
    "app_temp",
    "current_session",
    "display_name",
    "example_label",
    "example_order",
    "example_scans",
    "image_file",
    "method_name",
    "neutral_examples",
    "output_file",
    "picture",
    "reference_line",
    "safe_file_name",
    "shown_picture",
    "unreadable",
    "upload_path",
]

EXAMPLES_DIR = ASSETS / "examples"
EXAMPLES_MANIFEST = EXAMPLES_DIR / "manifest.csv"
DISCLAIMER = (
    "**Teaching tool, not a diagnosis.** Predictions and heat maps illustrate how a model "
    "behaves; they must never guide the care of a patient."
)
METHOD_LABELS = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM (class-agnostic)",
    "gradcam-early": "Grad-CAM, earlier block (finer grid)",
    "attention": "Attention of the global token (last block)",
    "rollout": "Attention rollout",
}
PREDICTED = "the predicted class"
MODEL_CONCURRENCY_ID = "model"
#: /batch and /evaluate: their own lane, one at a time, so they never hold up one scan.
LONG_JOBS_CONCURRENCY_ID = "long-jobs"
OUTPUT_MAX_AGE_S = 600  # Gradio serves its own copy of each; ours are deleted after this
STATE_TTL_S = 600  # a session's state (last explanation, explorer, quiz) lives 10 minutes
#: ZeroGPU time a model call reserves by default (seconds): one scan, explanation included,
#: on a MIRAGE-sized model (small ones never call ZeroGPU). A MIRAGE-Large forward is ~0.15
#: TFLOP, a fraction of a second on an H200 slice; the rest is a fresh worker's start (CUDA,
#: weights onto the GPU) and the call's CPU work (README, Hosting: Quotas).
SCAN_GPU_SECONDS = 10
#: ... and ``/compare``: every method's map, its deletion test and sanity check (about 20
#: forward and backward passes, and the overlays).
COMPARE_GPU_SECONDS = 20

F = TypeVar("F", bound=Callable[..., Any])


def _unwrapped(fn: F) -> F:
    return fn


@dataclass
class AppContext:
    """The app's shared state, handed to every tab builder.

    A tab builder is ``build(ctx) -> None``: inside ``with gr.Tabs()`` it opens its own
    ``gr.Tab``, lays out its components and wires its events. It reads models through
    ``registry`` (``registry.config``/``report`` never load a model; ``registry.get`` does,
    and only in event handlers), listens to the model picker with :meth:`on_model`, and
    wraps every handler that runs a model in :meth:`model_call` (its arguments must be
    picklable: on ZeroGPU they cross into the GPU worker process).
    """

    registry: ModelRegistry
    demo: gr.Blocks
    model: gr.Dropdown  # the model picker, above the tabs
    examples: list[tuple[str, str]] = field(default_factory=list)  # (path, class)
    tabs: gr.Tabs | None = None  # the tab bar, for links that switch tabs (set by build_app)
    #: A further decorator for every event handler that runs a model (applied over the
    #: ZeroGPU wrapping :meth:`model_call` always does).
    wrap_model_call: Callable[[Callable[..., Any]], Callable[..., Any]] = _unwrapped
    #: Gradio batching of ``/predict``: up to this many waiting requests in one call (1: off).
    max_batch: int = 1
    #: MIRAGE's release weights the "How it learned" tab also offers (``mirage_base`` or
    #: ``mirage_large``; ``--pretraining``), or ``None``: the bundled tiny MIRAGE only.
    pretraining: str | None = None
    #: Options of every event that runs a model: one concurrency group, so at most
    #: ``--concurrency`` model calls run at once, whichever tab they come from.
    model_events: dict[str, Any] = field(
        default_factory=lambda: {"concurrency_id": MODEL_CONCURRENCY_ID}
    )
    #: Options of the events that run a model on many images (``/batch``, ``/evaluate``):
    #: their own group of one call at a time, beside the one-scan calls, never in front of them.
    long_events: dict[str, Any] = field(
        default_factory=lambda: {"concurrency_id": LONG_JOBS_CONCURRENCY_ID, "concurrency_limit": 1}
    )

    def model_call(
        self, fn: F | None = None, *, duration: int | Callable[..., int] = SCAN_GPU_SECONDS
    ) -> Any:
        """``fn`` run through ZeroGPU (``spaces.GPU`` reserving ``duration`` seconds, or a
        function of the call's arguments; CPU fallback; nothing elsewhere: see
        :func:`~mirage_demo.zerogpu.gpu_task`), then wrapped with :attr:`wrap_model_call`.
        ``@ctx.model_call`` or ``@ctx.model_call(duration=...)``.

        ``fn`` takes the model picker's value as ``name`` (``names`` for a Gradio batch): a
        call whose models all run on the CPU (:meth:`ModelRegistry.on_cpu`) asks no GPU."""
        if fn is None:
            return functools.partial(self.model_call, duration=duration)
        models = _model_names(fn)

        def use_gpu(*args: Any, **kwargs: Any) -> bool:
            return not all(self.registry.on_cpu(name) for name in models(*args, **kwargs))

        wrapped = self.wrap_model_call(gpu_task(duration, use_gpu=use_gpu)(fn))
        if "names" in inspect.signature(fn).parameters:
            return wrapped  # a Gradio batch mixes sessions: checked as each joins the queue

        @functools.wraps(wrapped)
        def checked(*args: Any, **kwargs: Any) -> Any:
            session = current_session()
            for name in models(*args, **kwargs):
                if not self.registry.may_use(name, session):
                    raise gr.Error(NOT_SERVED_HERE)
            return wrapped(*args, **kwargs)

        return checked

    def on_model(self, fn: Callable[[str], Any], outputs: Sequence[gr.components.Component]) -> Any:
        """Call ``fn(model_name)`` when the page loads and whenever the picker changes, to
        update ``outputs``; returns the picker's change event (to chain ``.then``)."""
        self.demo.load(fn, inputs=[self.model], outputs=list(outputs), api_visibility="private")
        return self.model.change(
            fn, inputs=[self.model], outputs=list(outputs), api_visibility="private"
        )


def current_session() -> str | None:
    """The Gradio session hash of the request being handled (None outside a request)."""
    request = LocalContext.request.get(None)
    return getattr(request, "session_hash", None)


def _model_names(fn: Callable[..., Any]) -> Callable[..., list[str | None]]:
    """A function of ``fn``'s arguments giving the models the call uses (its ``name``, or its
    ``names`` under Gradio batching)."""
    signature = inspect.signature(fn)
    key = next((k for k in ("name", "names") if k in signature.parameters), None)
    if key is None:
        raise TypeError(f"{fn.__name__}: a model handler takes the picker's value as `name`")

    def names(*args: Any, **kwargs: Any) -> list[str | None]:
        value = signature.bind_partial(*args, **kwargs).arguments.get(key)
        return list(value or [None]) if key == "names" else [value]

    return names


def example_scans(folder: Path = EXAMPLES_DIR) -> list[tuple[str, str]]:
    """(path, class) of the bundled example scans, sorted by class."""
    if not folder.is_dir():
        return []
    return [
        (str(path), path.parent.name)
        for path in sorted(folder.glob("*/*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]


def example_order(examples: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The example scans in a fixed order that does not follow their class (sorted by a hash
    of their file name), so their place does not give the class away."""
    return sorted(examples, key=lambda e: hashlib.sha256(Path(e[0]).name.encode()).hexdigest())


def neutral_examples(examples: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The example scans in :func:`example_order`, each as a copy named ``example-N`` (their
    file names, ``DME-11053-1.jpeg``, would give the class away in the page), made once in a
    folder of the app's temporary folder named after their contents."""
    ordered = example_order(examples)
    digest = hashlib.sha256()
    for path, _ in ordered:
        digest.update(Path(path).read_bytes())
    folder = app_temp() / "examples" / digest.hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for number, (path, cls) in enumerate(ordered, start=1):
        copy = folder / f"example-{number}{Path(path).suffix.lower()}"
        if not copy.is_file() or copy.stat().st_size != Path(path).stat().st_size:
            partial = copy.with_name(f".{copy.name}.{uuid.uuid4().hex[:8]}")
            shutil.copyfile(path, partial)
            partial.replace(copy)
        copies.append((str(copy), cls))
    return copies


def upload_path(upload: Any) -> str:
    """The local path of an uploaded file (a Gradio file payload, a path, or a temp file)."""
    if upload is None:
        raise gr.Error("Upload an OCT B-scan first (PNG, JPEG, TIFF or BMP).")
    if isinstance(upload, dict):
        upload = upload.get("path") or upload.get("name")
    path = getattr(upload, "path", None) or getattr(upload, "name", None) or upload
    return str(path)


def display_name(upload: Any, path: str) -> str:
    """The name the user knows an upload by (its original file name)."""
    if isinstance(upload, dict) and upload.get("orig_name"):
        return str(upload["orig_name"])
    return Path(path).name


def unreadable(err: ImageReadError) -> gr.Error:
    """The message shown for an image that cannot be read."""
    return gr.Error(
        f"Could not read {html.escape(err.name)}: {html.escape(err.reason)}. Please upload an "
        "OCT B-scan as PNG, JPEG, TIFF, BMP, GIF or WebP (at most 64 megapixels).",
        title="Unreadable image",
    )


def timing_line(prediction: Prediction, what: str, device: str) -> str:
    """``"<what>: 0.12 s on CPU (0.15 s with image decoding)."``"""
    seconds = prediction.timing.get("total_s", 0.0)
    model = prediction.timing.get("model_s", 0.0) + prediction.timing.get("explain_s", 0.0)
    return f"{what}: {model:.2f} s on {device.upper()} ({seconds:.2f} s with image decoding)."


def method_name(method: str) -> str:
    """A method's short name for captions (``EigenCAM``, not its label with notes)."""
    if method in ("attention", "rollout"):
        return method.capitalize()
    return METHOD_LABELS.get(method, method).split(" (")[0]


# --------------------------------------------------------------------------------------------
# Bundled examples: their reference label


@functools.lru_cache(maxsize=1)
def _example_labels() -> dict[str, str]:
    if not EXAMPLES_MANIFEST.is_file():
        return {}
    with open(EXAMPLES_MANIFEST, newline="") as stream:
        return {row["sha256"]: row["class"] for row in csv.DictReader(stream)}


def example_label(path: str | Path) -> str | None:
    """The reference class of a bundled example scan (recognised by its content), else None."""
    labels = _example_labels()
    if not labels:
        return None
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None
    return labels.get(digest)


def reference_line(
    reference: str | None,
    predicted: str,
    confidence: float,
    class_names: list[str] | None = None,
) -> str:
    """``labelled DME; the model says NORMAL`` when a labelled scan is misclassified."""
    if reference is None:
        return ""
    if class_names is not None and reference not in class_names:
        return (
            f"Labelled **{reference}**, a class this model does not know; it says "
            f"**{predicted}** ({confidence:.0%}).\n\n"
        )
    if reference == predicted:
        return f"Labelled **{reference}**; the model agrees ({confidence:.0%}).\n\n"
    return (
        f"**Labelled {reference}; the model says {predicted}** ({confidence:.0%}). The model "
        "disagrees with the reference label: a wrong answer, worth a close look.\n\n"
    )


def picture(
    label: str,
    elem_id: str,
    *,
    kind: str = "pil",
    height: int = 380,
    alt_text: str | None = None,
    elem_classes: str | list[str] | None = None,
) -> gr.Image:
    """An output image (a scan or an overlay), not an upload; ``alt_text`` says what it shows
    (screen readers; set it again with each new picture)."""
    return gr.Image(
        label=label,
        type=kind,
        interactive=False,
        height=height,
        elem_id=elem_id,
        alt_text=alt_text or label,
        format="png",
        buttons=["download", "fullscreen"],
        elem_classes=elem_classes,
    )


@functools.lru_cache(maxsize=1)
def app_temp() -> Path:
    """This process's own temporary folder (its outputs and job folders), made on first use in
    the system's temporary folder and deleted when the process exits: the app never cleans
    up, or counts, anything but its own files."""
    folder = Path(tempfile.mkdtemp(prefix="mirage-demo-"))
    atexit.register(_remove, folder, os.getpid())
    return folder


def _remove(folder: Path, owner: int) -> None:
    """Delete ``folder`` at exit, in the process that made it only (a forked worker, such as
    ZeroGPU's, inherits the exit handlers and must leave the server's files alone)."""
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


def output_file(prefix: str, suffix: str, name: str | None = None) -> Path:
    """A new, unique path for a file the app returns (a CSV, an overlay image), in the app's
    own temporary folder, whose entries older than :data:`OUTPUT_MAX_AGE_S` are deleted first.
    With ``name``, the file is called ``<name><suffix>`` (made safe; what a download is saved
    as), in a folder of its own.

    Gradio copies a returned file into its cache under a temporary name, then renames it:
    never rewritten in place while another request downloads it (as it does with images
    returned as PIL objects, which truncates concurrent downloads of identical images)."""
    outputs = app_temp() / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in outputs.iterdir():
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > OUTPUT_MAX_AGE_S:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    unique = uuid.uuid4().hex[:12]
    if name is None:
        return outputs / f"{prefix}-{unique}{suffix}"
    folder = outputs / f"{prefix}-{unique}"
    folder.mkdir()
    return folder / f"{safe_file_name(name)}{suffix}"


def safe_file_name(name: str, most: int = 80) -> str:
    """``name`` as a file name: letters, digits, ``-``, ``_`` and ``.`` only (others become
    ``-``), no leading dot, at most ``most`` characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return cleaned[:most] or "file"


def image_file(image: Image.Image, prefix: str = "overlay", name: str | None = None) -> str:
    """``image`` saved as a PNG (lossless: a download for slides) to a new
    :func:`output_file` (called ``name`` when given); its path."""
    path = output_file(prefix, ".png", name)
    image.save(path, "PNG")
    return str(path)


def shown_picture(image: Image.Image | None, prefix: str = "overlay") -> Any:
    """An output picture for a ``gr.Image``: ``image`` saved by :func:`image_file`, with the
    alt text kept in ``image.info["alt_text"]`` (None: cleared)."""
    if image is None:
        return None
    return gr.Image(value=image_file(image, prefix), alt_text=image.info.get("alt_text"))
