"""The app: a header with the model picker and trust note, then one tab per builder.

``build_app(registry)`` lays out :data:`TABS` around an :class:`~mirage_demo.ui.context.AppContext`;
a new tab is a function ``build(ctx) -> None`` added to that tuple (or passed as ``tabs=``).
Building reads checkpoint configs and reports only; models load on first use.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from mirage_demo.bundled_probe import ProbeUnavailableError, bundled_probe
from mirage_demo.checkpoint import CheckpointError
from mirage_demo.ui.adapt import build_adapt_tab
from mirage_demo.ui.batch import build_batch_tab
from mirage_demo.ui.classify import build_classify_tab
from mirage_demo.ui.context import (
    LONG_JOBS_CONCURRENCY_ID,
    MODEL_CONCURRENCY_ID,
    AppContext,
    app_temp,
    example_scans,
)
from mirage_demo.ui.evaluate import build_evaluate_tab
from mirage_demo.ui.learn import build_learn_tab
from mirage_demo.ui.pretraining import available_sources, build_pretraining_tab
from mirage_demo.ui.quiz import build_quiz_tab
from mirage_demo.ui.registry import (
    ASSETS,
    ENV_CHECKPOINTS,
    ENV_DATA_ROOTS,
    ENV_PRETRAINING,
    NOT_SERVED_HERE,
    ModelRegistry,
    available_models,
    pretraining_weights,
)
from mirage_demo.ui.report import build_model_tab, trust_note
from mirage_demo.ui.style import CSS, JS, TABS_ID
from mirage_demo.ui.volume import build_volume_tab
from mirage_demo.zerogpu import ZERO_GPU, resolve_device

__all__ = [
    "LAUNCH_OPTIONS",
    "TABS",
    "TITLE",
    "build_app",
    "default_concurrency",
    "main",
    "setup_queue",
]

TITLE = "MIRAGE OCT demo"
MAX_FILE_SIZE = "50mb"  # one uploaded file (a scan is < 5 MB; a zip of 500 scans ~50 MB)
MAX_QUEUE = 64  # requests waiting, all sessions together
MAX_WAITING_PER_SESSION = 4  # requests waiting from one browser tab or API client
MODEL_LANES = (MODEL_CONCURRENCY_ID, LONG_JOBS_CONCURRENCY_ID)  # the groups of model work
DELETE_CACHE = (600, 3600)  # every 10 minutes, delete uploads and outputs older than 1 hour
TabBuilder = Callable[[AppContext], None]
#: The tabs, in order.
TABS: tuple[TabBuilder, ...] = (
    build_classify_tab,
    build_volume_tab,
    build_model_tab,
    build_pretraining_tab,
    build_evaluate_tab,
    build_adapt_tab,
    build_batch_tab,
    build_quiz_tab,
    build_learn_tab,
)
FOOTER = (
    "Models fine-tuned from MIRAGE inherit its CC BY-NC-ND 4.0 license (Morano et al. "
    "2025, arXiv:2506.08900). Example scans: Kermany et al., Cell 2018, CC BY 4.0. "
    "Code: Apache-2.0."
)


def subtitle(class_names: Sequence[str]) -> str:
    """What the app does, in the loaded model's classes."""
    names = list(class_names)
    listed = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
    return f"Classify a retinal OCT B-scan as {listed}, and see where the model looked."


def build_app(
    registry: ModelRegistry,
    tabs: Sequence[TabBuilder] = TABS,
    wrap_model_call: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
    max_batch: int = 1,
    notice: str | None = None,
    pretraining: str | None = None,
) -> gr.Blocks:
    """The app around a :class:`ModelRegistry`: header, model picker, then ``tabs``.

    ``wrap_model_call`` decorates every handler that runs a model (e.g. ``spaces.GPU``);
    ``max_batch`` > 1 lets Gradio batch waiting ``/predict`` requests; ``notice`` is shown
    under the header (e.g. why a model asked for is not served); ``pretraining``
    (``mirage_base``/``mirage_large``) adds MIRAGE's release weights to "How it learned".
    Serve it with :func:`setup_queue` (the queue's limits) and :data:`LAUNCH_OPTIONS`.
    """
    config = registry.config(registry.default)
    app_temp()  # made here, in the serving process, before any worker is forked
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        header = gr.Markdown(f"# {TITLE}\n{subtitle(config.class_names)}", elem_classes="app-title")
        if notice:
            gr.Markdown(f"**Note:** {html.escape(notice)}", elem_classes="disclaimer")
        with gr.Row(equal_height=True, elem_classes="header-row"):
            model = gr.Dropdown(
                registry.names,
                value=registry.default,
                label="Model",
                scale=1,
                visible=len(registry.names) > 1,
            )
            trust = gr.Markdown(
                trust_note(registry.default, config, registry.report(registry.default)),
                elem_classes="disclaimer",
                elem_id="model-banner",
                scale=2,
            )
        ctx = AppContext(
            registry,
            demo,
            model,
            example_scans(),
            max_batch=max(1, max_batch),
            pretraining=pretraining,
        )
        if wrap_model_call is not None:
            ctx.wrap_model_call = wrap_model_call
        with gr.Tabs(overflow_behavior="wrap", elem_id=TABS_ID) as ctx.tabs:
            for build_tab in tabs:
                build_tab(ctx)
        gr.Markdown(FOOTER)

        def on_model(name):
            chosen = registry.config(name)
            note = trust_note(name, chosen, registry.report(name))
            return f"# {TITLE}\n{subtitle(chosen.class_names)}", note

        model.change(on_model, inputs=[model], outputs=[header, trust], api_visibility="private")
    return demo


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python app.py``."""
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
        "--max-batch",
        type=int,
        default=1,
        help="let Gradio batch up to N waiting /predict requests into one model call "
        "(default: 1, no batching)",
    )
    parser.add_argument(
        "--share", action="store_true", help="also serve on a public gradio.live link"
    )
    parser.add_argument(
        "--data-root",
        action="append",
        default=None,
        metavar="DIR",
        help="a folder whose images may be shown as a checkpoint's test scans (its "
        "predictions.csv names them relative to it; repeat for several; default: "
        f"${ENV_DATA_ROOTS}, else only the bundled test scans)",
    )
    parser.add_argument(
        "--probe",
        metavar="BACKBONE",
        help="also serve MIRAGE itself, first in the picker: a linear probe on the frozen "
        "features of mirage_base (or mirage_large), fitted on the app's bundled labelled "
        "scans at first start (downloads the backbone; minutes on a CPU), then cached",
    )
    parser.add_argument(
        "--pretraining",
        choices=["mirage_base", "mirage_large"],
        default=None,
        help="also show MIRAGE's own decoders in 'How it learned' (its GitHub release weights: "
        f"downloaded once, SHA-256 recorded; also ${ENV_PRETRAINING})",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python app.py [--checkpoint DIR_OR_HUB_ID ...] [--port N] [--share]``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    notices: list[str] = []
    release = pretraining_weights(args.pretraining)
    try:
        available_sources(release)
    except ValueError as err:
        parser.exit(2, f"error: ${ENV_PRETRAINING}: {err}\n")
    sources = list(args.checkpoint)
    if args.probe:
        try:
            sources.insert(0, str(bundled_probe(args.probe)))
        except ProbeUnavailableError as err:
            notices.append(f"The MIRAGE probe is not served: {err}.")
    try:
        registry = ModelRegistry(  # on ZeroGPU small models run on the CPU, asking no GPU
            available_models(sources),
            device=resolve_device(args.device),
            small_on_cpu=ZERO_GPU,
            data_roots=args.data_root,
        )
        registry = without_missing_backbones(registry, notices)
        if ZERO_GPU:  # models are placed (on emulated CUDA) before ZeroGPU packs them at launch
            registry.preload()
        for notice in notices:
            print(f"warning: {notice}", file=sys.stderr)
        demo = build_app(
            registry,
            max_batch=args.max_batch,
            notice=" ".join(notices) or None,
            pretraining=release,
        )
        registry.get(registry.default)  # a broken default model stops here, not on first use
    except (CheckpointError, gr.Error) as err:
        parser.exit(1, f"error: {err}\n")
    setup_queue(demo, args.concurrency, registry=registry)
    options = dict(LAUNCH_OPTIONS)  # the operator's data folders are shown, nothing else of theirs
    options["allowed_paths"] = [*options["allowed_paths"], *map(str, registry.data_roots)]
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **options)


def without_missing_backbones(registry: ModelRegistry, notices: list[str]) -> ModelRegistry:
    """``registry`` without the probes whose backbone cannot be had here (offline and not
    cached, a failed download), each with a line in ``notices``; the others serve as usual."""
    keep = []
    for name in registry.names:
        if len(registry.names) > 1 and registry.config(name).backbone is not None:
            try:
                registry.get(name)
            except gr.Error as err:
                notices.append(f"{html.unescape(err.message)} Serving the other models.")
                continue
        keep.append(registry.choices[name])
    if len(keep) == len(registry.names):
        return registry
    return ModelRegistry(
        keep,
        device=registry.device,
        small_on_cpu=registry.small_on_cpu,
        data_roots=registry.data_roots,
    )


def setup_queue(
    demo: gr.Blocks,
    concurrency: int,
    max_size: int = MAX_QUEUE,
    per_session: int = MAX_WAITING_PER_SESSION,
    registry: ModelRegistry | None = None,
) -> gr.Blocks:
    """Queue ``demo``'s requests: ``concurrency`` one-scan model calls at once (one group for
    those events) beside one long job (``/batch``, ``/evaluate``, ``/adapt``, the feature map:
    a group of its own), at most ``max_size`` waiting in all and ``per_session`` model requests
    per session, so one client cannot fill the queue; the next request past a limit is refused
    at once. Every request joins the queue (the REST routes that would skip it are closed), and
    one naming an adapted model of another session (``registry``) is refused there."""
    demo.queue(default_concurrency_limit=concurrency, max_size=max_size, api_open=False)
    queue = demo._queue  # Gradio has no per-session limit: wrap its queue's entry point
    push = queue.push

    async def push_limited(body: Any, request: Any, username: Any) -> Any:
        session = getattr(body, "session_hash", None)
        values = body.data if isinstance(body.data, list) else []
        if registry is not None and not all(registry.may_use(v, session) for v in values):
            return False, NOT_SERVED_HERE, "error"
        fn = demo.fns.get(body.fn_index) if body.fn_index is not None else None
        # only model work counts: a page's own load events (a dozen, reading metadata) never do
        if session is not None and getattr(fn, "concurrency_id", None) in MODEL_LANES:
            lanes = [queue.event_queue_per_concurrency_id.get(lane) for lane in MODEL_LANES]
            waiting = sum(
                event.session_hash == session for lane in lanes if lane for event in lane.queue
            )
            if waiting >= per_session:
                return (
                    False,
                    f"Too many requests waiting from this session ({waiting}; at most "
                    f"{per_session}): wait for the results before sending more.",
                    "queue_full",
                )
        return await push(body=body, request=request, username=username)

    queue.push = push_limited
    return demo


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
    "js": JS,
    "footer_links": ["api"],
    "max_file_size": MAX_FILE_SIZE,
    # the bundled scans are shown whatever the working directory (only these folders)
    "allowed_paths": [
        str(ASSETS / "examples"),
        str(ASSETS / "test-scans"),
        str(ASSETS / "volumes"),
    ],
}
