"""Run the app's model work on a ZeroGPU Space, on a GPU box or on a CPU, unchanged.

On a ZeroGPU Space (``SPACES_ZERO_GPU=true``) a GPU is attached only while a function decorated
with ``spaces.GPU`` runs, in a forked worker: its arguments and results are pickled across, its
``duration`` (seconds) is what the call reserves from the visitor's daily quota, and outside it
CUDA is emulated (``torch.cuda.is_available()`` is true, models are placed on ``cuda`` at
start-up). Everywhere else ``spaces.GPU`` returns the function itself, so :func:`gpu_task` is
the identity on a laptop, a GPU box and a CPU Space.

Small models never ask for a GPU: a model below :data:`GPU_MIN_PARAMETERS` (the bundled demo
models) answers in a few hundredths of a second on the Space's CPU, so :func:`gpu_task` runs
calls that use only such models in the main process, with no ``spaces.GPU`` call, no quota
reserved and no worker round trip (:func:`wants_gpu` decides, from a checkpoint's config).

When ZeroGPU refuses a call (daily quota used up, no GPU free), :func:`gpu_task` runs the same
function again on the CPU, with a CPU copy of the model loaded on first need, and tells the
visitor so with a toast; errors of the function itself are never retried.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gradio as gr
import spaces
import torch

from mirage_demo.checkpoint import CheckpointConfig, model_from_config

__all__ = [
    "CPU_FALLBACK_MESSAGE",
    "GPU_MIN_PARAMETERS",
    "ZERO_GPU",
    "gpu_task",
    "is_zerogpu_refusal",
    "on_cpu",
    "parameter_count",
    "resolve_device",
    "serving_device",
    "wants_gpu",
]

F = TypeVar("F", bound=Callable[..., Any])

#: True on a ZeroGPU Space (the variable the ``spaces`` package itself reads).
ZERO_GPU = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
#: Models with fewer parameters run on a ZeroGPU Space's CPU, never on its GPU. The bundled
#: models have 2.9 M (tiny ViT) and 11.2 M (ResNet-18); MIRAGE-Base 86 M, MIRAGE-Large 303 M.
GPU_MIN_PARAMETERS = 30_000_000
CPU_FALLBACK_MESSAGE = (
    "The free GPU time of this Space is used up for now, so this ran on the CPU instead: "
    "same model, same result, possibly slower."
)
# Titles of the gr.Error that ``spaces`` raises when ZeroGPU does not run a call at all.
# "ZeroGPU worker error" (the function itself failed on the GPU) is not among them.
_REFUSALS = (
    "ZeroGPU quota exceeded",
    "ZeroGPU queue timeout",
    "ZeroGPU client error",
    "ZeroGPU pending credits exceeded",
    "ZeroGPU illegal duration",
)
_on_cpu = contextvars.ContextVar("mirage_demo_cpu_fallback", default=False)
# Only what gpu_task decorates asks for a GPU: on a Space, Gradio would otherwise pass every
# event handler through spaces.GPU when the Space sets SPACES_GRADIO_AUTO_WRAP.
spaces.disable_gradio_auto_wrap()


def resolve_device(device: str = "auto") -> str:
    """``auto``: ``cuda`` when present (or emulated by ZeroGPU), else ``cpu``; others as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def serving_device(device: str) -> str:
    """The device a model should run on now: ``cpu`` inside :func:`on_cpu`, else ``device``."""
    return "cpu" if _on_cpu.get() else device


@contextlib.contextmanager
def on_cpu() -> Iterator[None]:
    """Within it, :func:`serving_device` is ``cpu`` (a CPU fallback, or a small model's call)."""
    token = _on_cpu.set(True)
    try:
        yield
    finally:
        _on_cpu.reset(token)


def parameter_count(config: CheckpointConfig) -> int:
    """The parameters of the model a checkpoint's config declares (built on the meta device:
    no memory, no weights read)."""
    return sum(p.numel() for p in model_from_config(config, device="meta").parameters())


def wants_gpu(config: CheckpointConfig) -> bool:
    """Whether a model is worth a ZeroGPU call: MIRAGE-sized, at least
    :data:`GPU_MIN_PARAMETERS` parameters in the architecture its config declares (so a
    head-only probe over a MIRAGE backbone counts as MIRAGE-sized)."""
    return parameter_count(config) >= GPU_MIN_PARAMETERS


def is_zerogpu_refusal(err: BaseException) -> bool:
    """Whether ``err`` is ZeroGPU declining to run a call (quota, no GPU), not a failure of it."""
    return isinstance(err, gr.Error) and getattr(err, "title", "") in _REFUSALS


def gpu_task(
    duration: int | Callable[..., int],
    gpu: Callable[..., Any] | None = None,
    use_gpu: Callable[..., bool] | None = None,
) -> Callable[[F], F]:
    """Decorate a function that runs models: ``spaces.GPU(duration=duration)`` on ZeroGPU, with
    a CPU fallback when ZeroGPU refuses the call; the function itself anywhere else.

    ``duration`` is seconds, or a function of the same arguments returning seconds (e.g. one
    that grows with a batch). ``gpu`` is the decorator to apply (default ``spaces.GPU``).
    ``use_gpu``, a function of the same arguments: when it says no (the call uses only small
    models), the call runs here, on the CPU, and ZeroGPU is never asked.
    """

    def decorate(fn: F) -> F:
        on_gpu = (gpu or spaces.GPU)(duration=duration)(fn)
        if on_gpu is fn:  # not on ZeroGPU: spaces.GPU is the identity
            return fn

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if use_gpu is not None and not use_gpu(*args, **kwargs):
                with on_cpu():
                    return fn(*args, **kwargs)
            try:
                return on_gpu(*args, **kwargs)
            except gr.Error as err:
                if not is_zerogpu_refusal(err):
                    raise
            gr.Warning(CPU_FALLBACK_MESSAGE, title="Running on the CPU")
            with on_cpu():
                return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return decorate
