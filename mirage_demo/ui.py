"""The Gradio app: classify a scan, see where the model looked, read its report, learn OCT.

``app.py`` at the repository root only calls :func:`main`. Everything here goes through
:class:`~mirage_demo.inference.Predictor`; each checkpoint is loaded once, on first use, and
shared by all requests (the predictor is thread-safe).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import tempfile
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from mirage_demo.checkpoint import CheckpointConfig, CheckpointError, resolve_checkpoint_dir
from mirage_demo.data import IMAGE_SUFFIXES, ImageReadError
from mirage_demo.explain import render_overlay
from mirage_demo.inference import DEFAULT_CHECKPOINT, Prediction, Predictor
from mirage_demo.metrics import load_report
from mirage_demo.zerogpu import ZERO_GPU, gpu_task, resolve_device, serving_device

__all__ = ["ModelChoice", "ModelRegistry", "available_models", "build_app", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS = REPO_ROOT / "assets"
EXAMPLES_DIR = ASSETS / "examples"
BUNDLED_MODELS = (DEFAULT_CHECKPOINT, ASSETS / "demo-vit")
ENV_CHECKPOINTS = "MIRAGE_DEMO_CHECKPOINTS"
TITLE = "MIRAGE OCT demo"
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
    "attention": "Attention of the global token (last block)",
    "rollout": "Attention rollout",
}
PREDICTED = "the predicted class"
MAX_BATCH_FILES = 500
#: ZeroGPU time reserved per call (seconds): one scan, and a batch (grows with its size).
SCAN_GPU_SECONDS = 30
BATCH_GPU_SECONDS = (30, 0.25, 120)  # base, per image, at most
MAX_ZIP_BYTES = 500 * 2**20
REPORT_FIGURES = {
    "confusion_matrix.png": "Confusion matrix: counts and row-normalised (rows: true class)",
    "roc_curves.png": "ROC curves, each class against the rest",
    "reliability.png": "Reliability diagram (calibration)",
}


# --------------------------------------------------------------------------------------------
# Models


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


class ModelRegistry:
    """Loads each checkpoint once per device, on first use, and keeps it (thread-safe).

    Models run on ``device``, or on the CPU inside a ZeroGPU fallback (see
    :mod:`mirage_demo.zerogpu`).
    """

    def __init__(self, choices: Sequence[ModelChoice], device: str = "cpu") -> None:
        if not choices:
            raise CheckpointError(
                "no checkpoint to serve: the bundled demo model is missing and none was given "
                f"(python app.py --checkpoint DIR_OR_HUB_ID, or set {ENV_CHECKPOINTS})"
            )
        self.choices = {choice.name: choice for choice in choices}
        self.device = device
        self._loaded: dict[tuple[str, str], Predictor] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.choices)

    @property
    def default(self) -> str:
        return self.names[0]

    def get(self, name: str | None = None) -> Predictor:
        """The predictor for a picker name (the default if empty)."""
        name = name or self.default
        if name not in self.choices:
            raise gr.Error(f"Unknown model {name!r}. Available: {', '.join(self.names)}.")
        key = (name, serving_device(self.device))
        with self._lock:
            if key not in self._loaded:
                source = self.choices[name].source
                try:
                    self._loaded[key] = Predictor.from_pretrained(source, device=key[1])
                except CheckpointError as err:
                    raise gr.Error(f"Cannot load model {name!r}: {err}") from err
            return self._loaded[key]

    def preload(self) -> None:
        """Load every model now (on ZeroGPU models must be placed at start-up)."""
        for name in self.names:
            self.get(name)

    def directory(self, name: str | None = None) -> Path:
        """The local directory of a model's checkpoint (report files live there)."""
        return resolve_checkpoint_dir(self.choices[name or self.default].source)

    def report(self, name: str | None = None) -> dict[str, Any] | None:
        """A model's ``metrics.json``, or ``None`` if it has no report."""
        return load_report(self.directory(name))


# --------------------------------------------------------------------------------------------
# Handlers: plain functions of the inputs, usable without a browser


def upload_path(upload: Any) -> str:
    """The local path of an uploaded file (a Gradio file payload, a path, or a temp file)."""
    if upload is None:
        raise gr.Error("Upload an OCT B-scan first (PNG, JPEG, TIFF or BMP).")
    if isinstance(upload, dict):
        upload = upload.get("path") or upload.get("name")
    path = getattr(upload, "path", None) or getattr(upload, "name", None) or upload
    return str(path)


def _friendly(err: ImageReadError, name: str) -> gr.Error:
    reason = str(err).split(": ", 1)[-1]
    return gr.Error(
        f"Could not read {name}: {reason}. Please upload an OCT B-scan as PNG, JPEG, TIFF or "
        "BMP (at most 64 megapixels).",
        title="Unreadable image",
    )


def _display_name(upload: Any, path: str) -> str:
    if isinstance(upload, dict) and upload.get("orig_name"):
        return str(upload["orig_name"])
    return Path(path).name


def _timing_line(prediction: Prediction, what: str, device: str) -> str:
    seconds = prediction.timing.get("total_s", 0.0)
    model = prediction.timing.get("model_s", 0.0) + prediction.timing.get("explain_s", 0.0)
    return f"{what}: {model:.2f} s on {device.upper()} ({seconds:.2f} s with image decoding)."


def _warnings_md(prediction: Prediction) -> str:
    if not prediction.warnings:
        return ""
    items = "\n".join(f"- {w}" for w in prediction.warnings)
    return f"**Warning: this may not be an OCT B-scan**; the result is meaningless.\n{items}\n\n"


def predict_scan(
    registry: ModelRegistry, upload: Any, model_name: str | None = None
) -> tuple[dict[str, float], str]:
    """``/predict``: class probabilities and a short text (warnings, timing)."""
    predictor = registry.get(model_name)
    path = upload_path(upload)
    name = _display_name(upload, path)
    try:
        prediction = predictor.predict(path, name=name)
    except ImageReadError as err:
        raise _friendly(err, name) from err
    info = _warnings_md(prediction) + _timing_line(prediction, "Prediction", str(predictor.device))
    return prediction.probabilities, info


def explain_scan(
    registry: ModelRegistry,
    upload: Any,
    model_name: str | None = None,
    method: str = "gradcam",
    target: str | None = PREDICTED,
    opacity: float = 0.5,
) -> tuple[Image.Image, dict[str, float], str, dict[str, Any]]:
    """``/explain``: the overlay, probabilities, a short text and the state to re-blend."""
    predictor = registry.get(model_name)
    path = upload_path(upload)
    name = _display_name(upload, path)
    if method not in predictor.methods:
        raise gr.Error(
            f"{METHOD_LABELS.get(method, method)} is not available for this model; "
            f"choose one of: {', '.join(METHOD_LABELS.get(m, m) for m in predictor.methods)}."
        )
    explained_class = None if target in (None, "", PREDICTED) else target
    try:
        explanation = predictor.explain(
            path, method=method, target=explained_class, name=name, opacity=float(opacity)
        )
    except ImageReadError as err:
        raise _friendly(err, name) from err
    except ValueError as err:
        raise gr.Error(str(err)) from err
    prediction = explanation.prediction
    what = f"Prediction + {METHOD_LABELS.get(explanation.method, explanation.method)}"
    shown = (
        f"Map for class **{explanation.target}**."
        if explanation.class_specific
        else "This map is class-agnostic: it does not depend on the class chosen."
    )
    info = (
        _warnings_md(prediction)
        + f"Predicted **{prediction.label}** ({prediction.confidence:.0%}). {shown}\n\n"
        + _timing_line(prediction, what, str(predictor.device))
    )
    state = {
        "scan": explanation.image,
        "heatmap": explanation.heatmap,
        "colormap": predictor.colormap,
    }
    return explanation.overlay, prediction.probabilities, info, state


def reblend(state: dict[str, Any] | None, opacity: float) -> Any:
    """A new overlay at another opacity, from the last explanation (no model call)."""
    if not state:
        return gr.skip()
    return render_overlay(state["scan"], state["heatmap"], state["colormap"], float(opacity))


def _batch_inputs(uploads: Sequence[Any]) -> list[tuple[str, Any]]:
    """(name, image source) for every uploaded image and every image inside uploaded zips."""
    items: list[tuple[str, Any]] = []
    for upload in uploads or []:
        path = upload_path(upload)
        name = _display_name(upload, path)
        if name.lower().endswith(".zip"):
            items += _zip_members(path, name)
        else:
            items.append((name, path))
    if not items:
        raise gr.Error("Upload some OCT scans (or a .zip of them) first.")
    if len(items) > MAX_BATCH_FILES:
        raise gr.Error(f"{len(items)} images is too many for one batch (limit {MAX_BATCH_FILES}).")
    return items


def _zip_members(path: str, name: str) -> list[tuple[str, Any]]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise gr.Error(f"{name} is not a readable zip archive.") from err
    with archive:
        members = [
            m
            for m in archive.infolist()
            if not m.is_dir()
            and Path(m.filename).suffix.lower() in IMAGE_SUFFIXES
            and not Path(m.filename).name.startswith(".")
        ]
        if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
            raise gr.Error(f"{name} unpacks to more than {MAX_ZIP_BYTES // 2**20} MB.")
        out = []
        for member in members:
            try:
                data = archive.read(member)
            except (zipfile.BadZipFile, OSError) as err:
                out.append((f"{name}/{member.filename}", ImageReadError(f"corrupt in zip ({err})")))
                continue
            out.append((f"{name}/{member.filename}", io.BytesIO(data)))
    return out


def batch_gpu_seconds(uploads: Sequence[Any] | None, *_: Any, **__: Any) -> int:
    """ZeroGPU seconds to reserve for ``/batch``: a base plus a little per image, capped."""
    base, per_image, cap = BATCH_GPU_SECONDS
    images = 0
    for upload in uploads or []:
        try:
            with zipfile.ZipFile(upload_path(upload)) as archive:
                images += len(archive.namelist())
        except (zipfile.BadZipFile, OSError):
            images += 1
    return int(min(cap, base + per_image * images))


def classify_batch(
    registry: ModelRegistry,
    uploads: Sequence[Any],
    model_name: str | None = None,
    progress: gr.Progress | None = None,
) -> tuple[list[list[Any]], str, str]:
    """``/batch``: a table of predictions (one row per image), a CSV file and a summary."""
    predictor = registry.get(model_name)
    items = _batch_inputs(uploads)
    classes = predictor.class_names
    rows: list[list[Any]] = []
    chunk = 8
    for start in range(0, len(items), chunk):
        if progress is not None:
            progress((start, len(items)), desc="Classifying", unit="images")
        part = items[start : start + chunk]
        sources, names, failures = [], [], {}
        for name, source in part:
            if isinstance(source, ImageReadError):
                failures[name] = source
                continue
            if isinstance(source, io.BytesIO):
                try:
                    source = Image.open(source)
                except Exception as err:  # PIL raises many types for bad bytes
                    failures[name] = ImageReadError(f"not a readable image ({err})")
                    continue
            sources.append(source)
            names.append(name)
        results = iter(
            predictor.predict_batch(sources, batch_size=chunk, names=names, on_error="return")
        )
        for name, _ in part:
            result = failures.get(name) or next(results)
            if isinstance(result, Prediction):
                probs = [round(result.probabilities[c], 4) for c in classes]
                rows.append([name, result.label, *probs, "; ".join(result.warnings)])
            else:
                reason = str(result).split(": ", 1)[-1]
                rows.append([name, "unreadable", *[None] * len(classes), reason])
    header = ["file", "prediction", *[f"p({c})" for c in classes], "warnings / errors"]
    handle, csv_path = tempfile.mkstemp(prefix="oct-predictions-", suffix=".csv")
    with os.fdopen(handle, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    failed = sum(row[1] == "unreadable" for row in rows)
    counts = {c: sum(row[1] == c for row in rows) for c in classes}
    summary = f"**{len(rows) - failed} classified**" + (
        f", **{failed} unreadable**" if failed else ""
    )
    summary += " — " + ", ".join(f"{c}: {n}" for c, n in counts.items())
    return rows, csv_path, summary


# --------------------------------------------------------------------------------------------
# The model card


def model_card(config: CheckpointConfig | None, name: str) -> str:
    """What is loaded, where its weights come from, and how far to trust it."""
    if config is None:
        return f"### {name}\nThis model was built in Python, not loaded from a checkpoint."
    source = config.source_weights or {}
    training = config.training or {}
    lines = [f"### {name}", "", "| What | |", "|---|---|"]
    lines.append(f"| Architecture | `{config.architecture}` |")
    lines.append(f"| Classes | {', '.join(config.class_names)} |")
    weights = source.get("name") or "none: trained from scratch"
    license_id = source.get("license")
    lines.append(
        f"| Starting weights | {weights}"
        + (f" (license {license_id})" if license_id else "")
        + " |"
    )
    data = training.get("data_name") or Path(str(training.get("data") or "")).name
    images = training.get("images") or {}
    split_sizes = ", ".join(f"{sum(c.values()):,} {s}" for s, c in images.items() if c)
    if data or split_sizes:
        lines.append(
            f"| Training data | {data}" + (f" ({split_sizes})" if split_sizes else "") + " |"
        )
    for key, label in (
        ("mode", "Fine-tuning"),
        ("epochs", "Epochs"),
        ("best_epoch", "Selected epoch"),
    ):
        if training.get(key) is not None:
            lines.append(f"| {label} | {training[key]} |")
    lines.append(f"| Input | {config.preprocessing.describe()} |")
    lines.append(f"| Temperature (calibration) | {config.temperature:.3g} |")
    lines.append(f"| Created | {config.created[:10]} (mirage_demo {config.library_version}) |")
    if config.description:
        lines += ["", config.description]
    return "\n".join(lines)


def _ci(entry: dict[str, Any] | None, percent: bool = True) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    scale = 100 if percent else 1
    fmt = "{:.1f}" if percent else "{:.3f}"
    value = fmt.format(entry["value"] * scale)
    low, high = entry.get("ci95") or (None, None)
    if low is None or high is None:
        return value
    return f"{value} ({fmt.format(low * scale)}–{fmt.format(high * scale)})"


def metrics_markdown(metrics: dict[str, Any]) -> str:
    """The report's figures as tables, with 95% bootstrap confidence intervals."""
    overall = metrics.get("overall", {})
    per_class = metrics.get("per_class", {})
    counts = metrics.get("images_per_class", {})
    split = metrics.get("split", "test")
    lines = [
        f"### Results on the {split} split ({metrics.get('num_images', '?')} images)",
        "Values in %, with 95% bootstrap confidence intervals. Classes with few images have "
        "wide intervals: read them as such.",
        "",
        "| Accuracy | Balanced accuracy | Macro F1 | Macro AUROC | MCC | Cohen's κ | ECE |",
        "|---|---|---|---|---|---|---|",
        "| "
        + " | ".join(
            [
                _ci(overall.get("accuracy")),
                _ci(overall.get("balanced_accuracy")),
                _ci(overall.get("macro_f1")),
                _ci(overall.get("macro_auroc")),
                _ci(overall.get("mcc"), percent=False),
                _ci(overall.get("cohen_kappa"), percent=False),
                _ci(overall.get("ece")),
            ]
        )
        + " |",
        "",
        "| Class | Images | Sensitivity | Specificity | Precision | F1 | AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    for cls, values in per_class.items():
        lines.append(
            f"| {cls} | {values.get('support', counts.get(cls, '?'))} | "
            + " | ".join(
                _ci(values.get(k))
                for k in ("sensitivity", "specificity", "precision", "f1", "auroc")
            )
            + " |"
        )
    return "\n".join(lines)


def model_report(
    registry: ModelRegistry, model_name: str | None = None
) -> tuple[str, str, dict[str, str]]:
    """The Model tab: card, metrics tables and the report's figures by file name."""
    name = model_name or registry.default
    predictor = registry.get(name)
    card = model_card(predictor.config, name)
    directory = registry.directory(name)
    metrics = load_report(directory)
    if metrics is None:
        message = (
            "### No evaluation report\nThis checkpoint has no `metrics.json`: evaluate it with "
            f"`python -m train.evaluate --checkpoint {registry.choices[name].source} --data "
            "DATA_DIR` to see its test figures, confusion matrix and ROC curves here."
        )
        return card, message, {}
    figures = {fig: str(directory / fig) for fig in REPORT_FIGURES if (directory / fig).is_file()}
    return card, metrics_markdown(metrics), figures


def trust_note(
    name: str, config: CheckpointConfig | None, metrics: dict[str, Any] | None = None
) -> str:
    """Which model is loaded, and how far to trust it (its test figures, if it has any)."""
    if config is None:
        return f"**Model: {name}.** {DISCLAIMER}"
    source = (config.source_weights or {}).get("name")
    origin = f"fine-tuned from {source}" if source else "trained from scratch: **not MIRAGE**"
    line = f"**Model: {name}** ({config.architecture}, {origin})."
    if metrics:
        overall = metrics.get("overall", {}).get("balanced_accuracy") or {}
        value, (low, high) = overall.get("value"), overall.get("ci95") or (None, None)
        if value is not None:
            interval = f" (95% CI {low:.0%}–{high:.0%})" if low is not None else ""
            line += (
                f" On its {metrics.get('num_images', '?')} test scans: balanced accuracy "
                f"{value:.0%}{interval}; sensitivity "
            )
            parts = []
            for cls, values in metrics.get("per_class", {}).items():
                sens = (values.get("sensitivity") or {}).get("value")
                shown = "–" if sens is None else f"{sens:.0%}"
                parts.append(f"{cls} {shown} of {values.get('support', '?')}")
            line += ", ".join(parts) + "."
    else:
        line += " It has no test report: how well it works is unknown."
    return f"{line} {DISCLAIMER}"


# --------------------------------------------------------------------------------------------
# Layout


LEARN_MD = """
## What is OCT?
**Optical coherence tomography** measures how deep tissue reflects near-infrared light, by
interferometry, and builds cross-sections of the retina at a few micrometres' resolution. One
cross-section is a **B-scan**: the vitreous (dark) at the top, then the retinal layers — from the
bright nerve fibre layer down to the bright band of the retinal pigment epithelium (RPE) and
Bruch's membrane — and the choroid below. The dip in the middle of a macular scan is the fovea.

## The four classes (Kermany et al. 2018)
- **CNV — choroidal neovascularisation** (neovascular, "wet" age-related macular degeneration):
  vessels growing from the choroid through Bruch's membrane. On OCT: a lumpy, hyper-reflective
  lesion under the retina or the RPE, often with sub-retinal or intra-retinal fluid (dark spaces)
  and a detached, irregular RPE.
- **DME — diabetic macular oedema**: a thickened retina with dark, cyst-like pockets of
  intra-retinal fluid, bright dots of hard exudate, sometimes fluid under the retina.
- **DRUSEN** (early or intermediate AMD): deposits between the RPE and Bruch's membrane that
  lift the RPE into small domes or a wavy line; the retina above is usually dry.
- **NORMAL**: a smooth foveal dip, continuous layers, no fluid, a straight RPE.

## Reading a heat map
- **Grad-CAM and its variants** weigh the last block's features by how much they raise the score
  of the chosen class: warm colours mark image regions whose features pushed the model *towards*
  that class. Pick another class in "Explain class" to see the evidence for it.
- **EigenCAM**, **attention** and **attention rollout** do not depend on the class: they show
  what the model's features or attention concentrate on, not why it chose a label.
- A ViT at 512x512 with 32-pixel patches sees a 16x16 grid: the maps are coarse, then smoothed
  to the scan's size. They show *where*, never *what*: they are not a segmentation of the lesion.

## Pitfalls
- A plausible map does not make a prediction right: wrong answers get convincing maps too.
- Maps can light up borders, text, padding or noise: signs of shortcuts a model learnt from its
  training data rather than disease.
- Different methods disagree; some barely change when the model's weights are randomised
  (Adebayo et al., *Sanity checks for saliency maps*, 2018). Compare several before concluding.
- The probabilities are the model's, calibrated on its validation split; they are not the
  probability that a patient has a disease.
"""

CSS = """
.disclaimer {border-left: 4px solid #d97706; padding: 6px 12px; background: #fffbeb;}
.disclaimer p {margin: 0; color: #78350f;}
footer {visibility: hidden}
"""


def _example_scans() -> list[tuple[str, str]]:
    """(path, class) of the bundled example scans, sorted by class."""
    if not EXAMPLES_DIR.is_dir():
        return []
    return [
        (str(path), path.parent.name)
        for path in sorted(EXAMPLES_DIR.glob("*/*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]


def _report_image(name: str, figures: dict[str, str]) -> gr.Image:
    return gr.Image(
        figures.get(name),
        label=REPORT_FIGURES[name],
        show_label=False,  # the figure carries its own title; the label stays for screen readers
        elem_id="report-" + name.removesuffix(".png").replace("_", "-"),
        visible=name in figures,
        interactive=False,
        buttons=["download", "fullscreen"],
    )


def build_app(registry: ModelRegistry) -> gr.Blocks:
    """The four-tab app around a :class:`ModelRegistry`."""
    default = registry.get(registry.default)
    examples = _example_scans()

    def methods_for(name: str | None) -> list[tuple[str, str]]:
        return [(METHOD_LABELS.get(m, m), m) for m in registry.get(name).methods]

    def targets_for(name: str | None) -> list[str]:
        return [PREDICTED, *registry.get(name).class_names]

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {TITLE}\nClassify a retinal OCT B-scan as CNV, DME, drusen or normal, and see "
            "where the model looked."
        )
        with gr.Row(equal_height=True):
            model = gr.Dropdown(
                registry.names,
                value=registry.default,
                label="Model",
                scale=1,
                visible=len(registry.names) > 1,
            )
            trust = gr.Markdown(
                trust_note(registry.default, default.config, registry.report(registry.default)),
                elem_classes="disclaimer",
            )

        with gr.Tabs():
            with gr.Tab("Classify", id="classify"):
                with gr.Row():
                    with gr.Column(scale=1):
                        scan = gr.Image(
                            type="filepath",
                            image_mode=None,
                            sources=["upload", "clipboard"],
                            label="OCT B-scan (drop, paste or click to upload)",
                            height=320,
                        )
                        with gr.Row():
                            method = gr.Dropdown(
                                methods_for(None), value="gradcam", label="Explanation"
                            )
                            target = gr.Dropdown(
                                targets_for(None), value=PREDICTED, label="Explain class"
                            )
                        opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Opacity")
                        if examples:
                            gr.Examples(
                                examples=[[path] for path, _ in examples],
                                example_labels=[f"{cls}" for _, cls in examples],
                                inputs=[scan],
                                label="Real scans from Kermany et al. 2018 (CC BY 4.0)",
                                examples_per_page=12,
                            )
                    with gr.Column(scale=1):
                        probabilities = gr.Label(
                            num_top_classes=4, label="Class probabilities", elem_id="probabilities"
                        )
                        overlay = gr.Image(
                            label="Where the model looked",
                            elem_id="overlay",
                            type="pil",
                            interactive=False,
                            height=320,
                            buttons=["download", "fullscreen"],
                        )
                        info = gr.Markdown("Upload a scan or pick an example.", elem_id="info")
                state = gr.State(None)
                predict_button = gr.Button("Predict only", visible=False)

            with gr.Tab("Model", id="model"):
                card, metrics_md, figures = model_report(registry, registry.default)
                card_view = gr.Markdown(card)
                metrics_view = gr.Markdown(metrics_md)
                matrix_name, *curve_names = REPORT_FIGURES
                figure_views = [_report_image(matrix_name, figures)]
                with gr.Row():
                    figure_views += [_report_image(name, figures) for name in curve_names]

            with gr.Tab("Batch", id="batch"):
                gr.Markdown(
                    "Classify many scans at once: select several images, or a .zip of them. "
                    "Unreadable files are listed, not fatal."
                )
                batch_files = gr.File(
                    file_count="multiple",
                    file_types=[*sorted(IMAGE_SUFFIXES), ".zip"],
                    label="Scans or .zip archives",
                )
                batch_button = gr.Button("Classify all", variant="primary")
                batch_summary = gr.Markdown()
                batch_table = gr.Dataframe(
                    headers=["file", "prediction", *[f"p({c})" for c in default.class_names]],
                    label="Predictions",
                    interactive=False,
                    wrap=True,
                )
                batch_csv = gr.File(label="Download as CSV")

            with gr.Tab("Learn", id="learn"):
                intro, rest = LEARN_MD.split("## Reading a heat map")
                gr.Markdown(intro)
                if examples:
                    gr.Gallery(
                        [(path, f"{cls} ({Path(path).name})") for path, cls in examples],
                        label="Real scans of each class (Kermany et al. 2018, CC BY 4.0)",
                        columns=5,
                        height="auto",
                        object_fit="contain",
                    )
                gr.Markdown("## Reading a heat map" + rest)

        gr.Markdown(
            "Models fine-tuned from MIRAGE inherit its CC BY-NC-ND 4.0 license (Morano et al. "
            "2025, arXiv:2506.08900). Example scans: Kermany et al., Cell 2018, CC BY 4.0. "
            "Code: Apache-2.0."
        )

        # -- events ----------------------------------------------------------------------
        # The model-running handlers take only picklable arguments (on ZeroGPU they cross into
        # a GPU worker process); the registry reaches them through the closure.
        @gpu_task(duration=SCAN_GPU_SECONDS)
        def on_explain(upload, name, method_name, target_name, alpha):
            if upload is None:  # cleared
                return None, None, "Upload a scan or pick an example.", None
            return explain_scan(registry, upload, name, method_name, target_name, alpha)

        @gpu_task(duration=SCAN_GPU_SECONDS)
        def on_predict(upload, name):
            return predict_scan(registry, upload, name)

        @gpu_task(duration=batch_gpu_seconds)
        def on_batch(files, name, progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
            return classify_batch(registry, files, name, progress)

        def on_model(name):
            predictor = registry.get(name)
            card_md, report_md, figs = model_report(registry, name)
            methods = methods_for(name)
            chosen = "gradcam" if "gradcam" in predictor.methods else methods[0][1]
            return (
                gr.update(choices=methods, value=chosen),
                gr.update(choices=targets_for(name), value=PREDICTED),
                trust_note(name, predictor.config, registry.report(name)),
                card_md,
                report_md,
                *[gr.update(value=figs.get(f), visible=f in figs) for f in REPORT_FIGURES],
            )

        explain_inputs = [scan, model, method, target, opacity]
        explain_outputs = [overlay, probabilities, info, state]
        gr.on(
            [scan.change, method.change, target.change],
            on_explain,
            inputs=explain_inputs,
            outputs=explain_outputs,
            api_name="explain",
            preprocess=False,
            trigger_mode="always_last",
        )
        opacity.release(
            reblend, inputs=[state, opacity], outputs=[overlay], api_visibility="private"
        )
        predict_button.click(
            on_predict,
            inputs=[scan, model],
            outputs=[probabilities, info],
            api_name="predict",
            preprocess=False,
        )
        batch_button.click(
            on_batch,
            inputs=[batch_files, model],
            outputs=[batch_table, batch_csv, batch_summary],
            api_name="batch",
        )
        model.change(
            on_model,
            inputs=[model],
            outputs=[method, target, trust, card_view, metrics_view, *figure_views],
            api_visibility="private",
        ).then(
            on_explain,
            inputs=explain_inputs,
            outputs=explain_outputs,
            preprocess=False,
            api_visibility="private",
        )
    return demo


def main(argv: list[str] | None = None) -> None:
    """``python app.py [--checkpoint DIR_OR_HUB_ID ...] [--port N] [--share]``."""
    parser = argparse.ArgumentParser(description="Serve the MIRAGE OCT demo app.")
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="DIR_OR_HUB_ID",
        help="checkpoint directory or Hugging Face repo id to serve (repeat for a picker; "
        f"default: the bundled models; also ${ENV_CHECKPOINTS})",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (cuda when present, also on a ZeroGPU Space; else cpu), cpu or cuda",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument(
        "--concurrency", type=int, default=default_concurrency(), help="parallel requests"
    )
    parser.add_argument(
        "--share", action="store_true", help="also serve on a public gradio.live link"
    )
    args = parser.parse_args(argv)
    try:
        registry = ModelRegistry(
            available_models(args.checkpoint), device=resolve_device(args.device)
        )
        if ZERO_GPU:
            registry.preload()
        demo = build_app(registry)
    except (CheckpointError, gr.Error) as err:
        parser.exit(1, f"error: {err}\n")
    demo.queue(default_concurrency_limit=args.concurrency, max_size=256)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **LAUNCH_OPTIONS)


def default_concurrency() -> int:
    """Requests served at once: one per two cores (each uses torch's intra-op threads)."""
    return max(1, (os.cpu_count() or 2) // 2)


def theme() -> gr.themes.Base:
    """A clean theme with system fonts (no web-font downloads)."""
    fonts = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "monospace"]
    return gr.themes.Soft(primary_hue="indigo", neutral_hue="slate", font=fonts, font_mono=mono)


#: ``demo.launch(**LAUNCH_OPTIONS)``: look and limits (Gradio 6 takes theme and css here).
LAUNCH_OPTIONS: dict[str, Any] = {
    "theme": theme(),
    "css": CSS,
    "footer_links": ["api"],
    "max_file_size": "100mb",
}
