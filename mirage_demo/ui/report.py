"""The Model tab and the trust note above the tabs: what is loaded and how far to trust it.

Everything here reads the checkpoint's ``config.json`` and report files only: no model is
loaded to describe one.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from mirage_demo.checkpoint import CheckpointConfig
from mirage_demo.ui.context import DISCLAIMER, AppContext
from mirage_demo.ui.explore import build_model_explorer
from mirage_demo.ui.featuremap import build_feature_map
from mirage_demo.ui.registry import ModelRegistry
from mirage_demo.uncertainty import GUARANTEE, SURE_PRECISION

__all__ = [
    "REPORT_FIGURES",
    "build_model_tab",
    "metrics_markdown",
    "model_facts_markdown",
    "model_report",
    "trust_note",
]

REPORT_FIGURES = {
    "confusion_matrix.png": "Confusion matrix: counts and row-normalised (rows: true class)",
    "roc_curves.png": "ROC curves, each class against the rest",
    "reliability.png": "Reliability diagram (calibration)",
}


def model_facts_markdown(config: CheckpointConfig | None, name: str) -> str:
    """The Model tab's table: what is loaded, where its weights come from, how it was
    trained. (The Hub's model card is :func:`mirage_demo.checkpoint.hub_model_card`.)"""
    if config is None:
        return f"### {name}\nThis model was built in Python, not loaded from a checkpoint."
    source = config.source_weights or {}
    training = config.training or {}
    lines = [f"### {name}", "", "| What | |", "|---|---|"]
    lines.append(f"| Architecture | `{config.architecture}` |")
    lines.append(f"| Classes | {', '.join(config.class_names)} |")
    weights = source.get("name") or "none: trained from scratch"
    if source.get("from_scratch"):
        weights += ", itself trained from scratch"
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
    if config.split is not None:
        split = config.split
        excluded = f"; left out: {', '.join(split.exclude)}" if split.exclude else ""
        lines.append(
            f"| Data split | patient-disjoint, seed {split.seed}; missing splits carved as val "
            f"{split.val_fraction:.0%}, test {split.test_fraction:.0%}{excluded} |"
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


#: One line on what each figure of the report means, shown under its table.
OVERALL_MEANING = (
    "<small>**Accuracy**: the share of scans answered right. **Balanced accuracy**: the "
    "share of each class found, averaged over the classes (a rare class counts as much as a "
    "common one). **Macro F1**: F1 (below) averaged over the classes. **Macro AUROC**: how "
    "well the probabilities put each class's scans above the others' (50 is chance, 100 "
    "perfect), averaged. **MCC** (Matthews correlation) and **Cohen's κ**: how far answers "
    "and labels agree beyond chance (0 is chance, 1 perfect). **ECE** (calibration error): how "
    "far the stated probabilities are from how often the model is right (0 is perfect)."
    "</small>"
)
PER_CLASS_MEANING = (
    "<small>**Sensitivity**: the share of this class's scans the model found. "
    "**Specificity**: the share of the other scans it did not call this class. "
    "**Precision**: the share of its answers of this class that were right. **F1**: the "
    "balance of precision and sensitivity. **AUROC**: how well the probability of this class "
    "puts its scans above the others (50 is chance, 100 perfect).</small>"
)
NO_SCANS = "no scans"


def metrics_markdown(metrics: dict[str, Any], *, verdicts: bool = True) -> str:
    """The report's figures as tables, with 95% bootstrap confidence intervals and a line on
    what each figure means; a class without scans says so instead of figures (``verdicts``:
    with the table of verdicts, see :func:`verdicts_markdown`)."""
    overall = metrics.get("overall", {})
    per_class = metrics.get("per_class", {})
    counts = metrics.get("images_per_class", {})
    split = metrics.get("split", "test")
    lines = [
        f"### Results on {_scans_of(split)} ({metrics.get('num_images', '?')} images)",
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
        OVERALL_MEANING,
        "",
        "| Class | Images | Sensitivity | Specificity | Precision | F1 | AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = ("sensitivity", "specificity", "precision", "f1", "auroc")
    for cls, values in per_class.items():
        support = values.get("support", counts.get(cls, "?"))
        cells = [NO_SCANS] * len(keys) if support == 0 else [_ci(values.get(k)) for k in keys]
        lines.append(f"| {cls} | {support} | " + " | ".join(cells) + " |")
    lines += ["", PER_CLASS_MEANING]
    return "\n".join(lines) + "\n\n" + uncertainty_markdown(metrics, verdicts=verdicts)


def uncertainty_markdown(metrics: dict[str, Any], *, verdicts: bool = True) -> str:
    """The prediction sets' coverage and size per class and the share of scans flagged as
    unlike the training scans, on the report's split (or that the checkpoint has none)."""
    found = metrics.get("uncertainty")
    if not found:
        return (
            "### How sure the model may be\nNot available for this model: whoever trained it did "
            "not fit its prediction sets or its check for scans unlike its training scans."
        )
    level = found["level"]
    lines = [
        f"### How far to trust its answers: its {level:.0%} prediction sets",
        GUARANTEE.format(level=level),
        "",
        f"On {_scans_of(metrics.get('split', 'test'))}: the set held the true class for "
        f"**{found['coverage']:.1%}** of scans, with **{found['mean_set_size']:.2f}** classes on "
        f"average; **{found['flagged']:.1%}** of scans were flagged as unlike the training scans "
        f"(set to {found['ood_false_alarm_target']:.0%} on the validation split); "
        f"{_share(found['mistakes_warned'])} of the model's {found['mistakes']} mistakes carried "
        "a warning (not called sure: the flag, a set of 2+ classes, or a probability below "
        "the bar for sure).",
        "",
        "| Class | Images | Coverage | Mean set size | Flagged unlike training |",
        "|---|---|---|---|---|",
    ]
    for cls, values in found["per_class"].items():
        lines.append(
            f"| {cls} | {values['images']} | {_share(values['coverage'])} | "
            f"{_number(values['mean_set_size'])} | {_share(values['flagged'])} |"
        )
    if found.get("pooled_classes"):
        lines += [
            "",
            f"Calibrated together, their validation scans pooled (too few of each): "
            f"{', '.join(found['pooled_classes'])}.",
        ]
    if verdicts and found.get("verdicts"):
        lines += ["", verdicts_markdown(found["verdicts"], level)]
    bar = found.get("sure_probability")
    if verdicts and bar:
        lines += ["", sure_bar_line(bar)]
    return "\n".join(lines)


def sure_bar_line(bar: float) -> str:
    """The checkpoint's bar for sure, in a sentence (a bar above 1: nothing is ever sure)."""
    if bar > 1:
        return (
            "**The bar for sure**: none. On the validation scans no probability made this "
            f"model's answers of one class right {SURE_PRECISION:.0%} of the time, so it never "
            "calls an answer sure."
        )
    return (
        f"**The bar for sure**: an answer of one class is called sure only when its probability "
        f"is at least **{bar:.1%}**. Above that bar, on the validation scans (set aside from "
        f"training), this model's answers of one class were right at least "
        f"{SURE_PRECISION:.0%} of the time."
    )


#: A verdict's row label in the tables, and what it means in a few words.
VERDICT_ROWS = {
    "sure": "**sure**: a B-scan like the training scans, one class, probable enough",
    "unsure": "**unsure**: a set of 2 classes or more, or one class below the bar for sure",
    "unlike_training": "**unlike the training scans**: another device or acquisition?",
    "not_a_bscan": "**not an OCT B-scan**: colour, blank, noise, no retinal layers, too small",
    "not_available": "**not available**: no prediction sets for this checkpoint",
}


def verdicts_markdown(verdicts: dict[str, Any], level: float) -> str:
    """The share of each verdict and the accuracy within it, as a table."""
    lines = [
        f"How far to trust each answer (its verdict, with the {level:.0%} sets):",
        "",
        "| Verdict | Scans | Share | Right among them |",
        "|---|---|---|---|",
    ]
    for key, label in VERDICT_ROWS.items():
        entry = verdicts.get(key)
        if not entry or (key == "not_available" and not entry["images"]):
            continue
        right = _share(entry["accuracy"]) if key != "not_a_bscan" else "(meaningless)"
        lines.append(f"| {label} | {entry['images']} | {_share(entry['share'])} | {right} |")
    return "\n".join(lines)


FAR_BELOW = 0.10  # balanced accuracy this far below the model's own test figure: say so


def trust_headline(metrics: dict[str, Any], own: dict[str, Any] | None) -> str:
    """Evaluate's headline: the share of each verdict on the uploaded scans and the accuracy
    within it, and a warning when they score far below the model's own test figures
    (``own``: the checkpoint's report; balanced accuracy :data:`FAR_BELOW` lower or more, the
    upper end of its 95% interval below the model's figure)."""
    found = metrics.get("uncertainty") or {}
    lines = ["### How far to trust the model on your scans"]
    if found.get("verdicts"):
        lines.append(verdicts_markdown(found["verdicts"], found["level"]))
    else:
        lines.append(
            "This checkpoint has no prediction sets or unlike-the-training-scans check: how "
            "far to trust its answers cannot be told."
        )
    yours = (metrics.get("overall") or {}).get("balanced_accuracy") or {}
    theirs = ((own or {}).get("overall") or {}).get("balanced_accuracy") or {}
    if yours.get("value") is not None and theirs.get("value") is not None:
        high = (yours.get("ci95") or [None, None])[1]
        below = theirs["value"] - yours["value"] >= FAR_BELOW
        if below and (high is None or high < theirs["value"]):
            lines.append(
                f"**Warning: your scans score far below the model's own test figures** "
                f"(balanced accuracy {yours['value']:.0%} against {theirs['value']:.0%} on its "
                f"{(own or {}).get('split', 'test')} split). They may come from another "
                "device, clinic or population than its training scans: trust its answers on "
                "them less, whatever their verdict."
            )
    return "\n\n".join(lines)


def _scans_of(split: str) -> str:
    """The scans a report is on, in words: ``the test split``, or ``your scans``."""
    return "your scans" if split == "uploaded" else f"the {split} split"


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def model_report(
    registry: ModelRegistry, model_name: str | None = None
) -> tuple[str, str, dict[str, str]]:
    """The Model tab: facts table, metrics tables and the report's figures by file name."""
    name = model_name or registry.default
    card = model_facts_markdown(registry.config(name), name)
    directory = registry.directory(name)
    metrics = registry.report(name)
    if metrics is None:
        message = (
            "### No evaluation report\nThis model comes without a test report, so how well it "
            "works is unknown here: there are no test figures, confusion matrix or ROC curves "
            "to show. (Whoever trained it can add one: see the project's documentation.)"
        )
        return card, message, {}
    figures = {fig: str(directory / fig) for fig in REPORT_FIGURES if (directory / fig).is_file()}
    return card, metrics_markdown(metrics), figures


def _origin(config: CheckpointConfig) -> tuple[str, str]:
    """Where a model's weights come from: ``(a few words for the banner's line, a sentence)``."""
    source = config.source_weights or {}
    if not source.get("name"):
        return "not MIRAGE", "It was trained from scratch: it is **not MIRAGE**."
    if source.get("from_scratch"):
        return "not MIRAGE", (
            f"It was trained from scratch, in stages from {source['name']}: it is **not MIRAGE**."
        )
    return f"built on {source['name']}", f"It was fine-tuned from {source['name']}."


def trust_note(
    name: str, config: CheckpointConfig | None, metrics: dict[str, Any] | None = None
) -> str:
    """The banner above the tabs: one line (which model, how well it did, that it is a
    teaching tool), its details on demand: the model's own description (its card), its report's
    figures and the disclaimer."""
    if config is None:
        return (
            f'<details class="model-banner"><summary><b>Model: {html.escape(name)}</b> · '
            f"teaching tool, not a diagnosis</summary>\n\n{DISCLAIMER}\n\n</details>"
        )
    short_origin, origin = _origin(config)
    line, narrow, figures = [short_origin], ["Not a diagnosis", short_origin], ""
    overall = ((metrics or {}).get("overall") or {}).get("balanced_accuracy") or {}
    if overall.get("value") is not None:
        value, (low, high) = overall["value"], overall.get("ci95") or (None, None)
        split, count = metrics.get("split", "test"), metrics.get("num_images", "?")
        line.insert(0, f"balanced accuracy {value:.0%} on {count} {split} scans")
        narrow.append(f"{value:.0%} balanced accuracy")
        interval = f" (95% CI {low:.0%}–{high:.0%})" if low is not None else ""
        parts = []
        for cls, values in metrics.get("per_class", {}).items():
            sens = (values.get("sensitivity") or {}).get("value")
            shown = "–" if sens is None else f"{sens:.0%}"
            parts.append(f"{cls} {shown} of {values.get('support', '?')}")
        figures = (
            f"On its {count} {split} scans: balanced accuracy {value:.0%}{interval} (the "
            "average, over the classes, of the share of each class found); found per class "
            f"(sensitivity): {', '.join(parts)}."
        )
    else:
        line.insert(0, "no test report")
        narrow.append("no test report")
        figures = "It has no test report: how well it works is unknown."
    line.append("teaching tool, not a diagnosis")
    about = config.description or origin
    shown = html.escape(name)
    return (
        f'<details class="model-banner"><summary><span class="banner-name"><b>Model: {shown}'
        f'</b> · </span><span class="wide">{" · ".join(line)}</span><span class="narrow">'
        f"{' · '.join(narrow)}</span></summary>\n\n**{shown}**: {about}\n\n{figures}\n\n"
        f"{DISCLAIMER}\n\n</details>"
    )


def _report_image(name: str, figures: dict[str, str]) -> gr.Image:
    return gr.Image(
        figures.get(name),
        label=REPORT_FIGURES[name],
        show_label=False,  # the figure carries its own title; the label stays for screen readers
        alt_text=REPORT_FIGURES[name] + ", on the model's test scans",
        elem_id="report-" + name.removesuffix(".png").replace("_", "-"),
        visible=name in figures,
        interactive=False,
        buttons=["download", "fullscreen"],
    )


def build_model_tab(ctx: AppContext) -> None:
    """The loaded model's facts, report tables and figures; follows the model picker."""
    registry = ctx.registry
    with gr.Tab("Model", id="model"):
        card, metrics_md, figures = model_report(registry, registry.default)
        card_view = gr.Markdown(card)
        metrics_view = gr.Markdown(metrics_md)
        build_model_explorer(ctx)
        matrix_name, *curve_names = REPORT_FIGURES
        figure_views = [_report_image(matrix_name, figures)]
        with gr.Row():
            figure_views += [_report_image(name, figures) for name in curve_names]
        build_feature_map(ctx, "featuremap")

    def on_model(name):
        card_md, report_md, figs = model_report(registry, name)
        updates = [gr.update(value=figs.get(f), visible=f in figs) for f in REPORT_FIGURES]
        return card_md, report_md, *updates

    ctx.model.change(
        on_model,
        inputs=[ctx.model],
        outputs=[card_view, metrics_view, *figure_views],
        api_visibility="private",
    )
