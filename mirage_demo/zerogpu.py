"""Run the app's model work on a ZeroGPU Space, on a GPU box or on a CPU, unchanged.

On a ZeroGPU Space (``SPACES_ZERO_GPU=true``) a GPU is attached only while a function decorated
with ``spaces.GPU`` runs, in a forked worker: its arguments and results are pickled across, its
``duration`` (seconds) is what the call reserves from the visitor's daily quota, and outside it
CUDA is emulated (``torch.cuda.is_available()`` is true, models are placed on ``cuda`` at
start-up). Everywhere else ``spaces.GPU`` returns the function itself, so :func:`gpu_task` is
the identity on a laptop, a GPU box and a CPU Space.

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

__all__ = [
    "CPU_FALLBACK_MESSAGE",
    "ZERO_GPU",
    "gpu_task",
    "is_zerogpu_refusal",
    "resolve_device",
    "serving_device",
]

F = TypeVar("F", bound=Callable[..., Any])

#: True on a ZeroGPU Space (the variable the ``spaces`` package itself reads).
ZERO_GPU = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
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


def resolve_device(device: str = "auto") -> str:
    """``auto``: ``cuda`` when present (or emulated by ZeroGPU), else ``cpu``; others as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def serving_device(device: str) -> str:
    """The device a model should run on now: ``cpu`` inside a ZeroGPU fallback, else ``device``."""
    return "cpu" if _on_cpu.get() else device


@contextlib.contextmanager
def _cpu_fallback() -> Iterator[None]:
    token = _on_cpu.set(True)
    try:
        yield
    finally:
        _on_cpu.reset(token)


def is_zerogpu_refusal(err: BaseException) -> bool:
    """Whether ``err`` is ZeroGPU declining to run a call (quota, no GPU), not a failure of it."""
    return isinstance(err, gr.Error) and getattr(err, "title", "") in _REFUSALS


def gpu_task(
    duration: int | Callable[..., int], gpu: Callable[..., Any] | None = None
) -> Callable[[F], F]:
    """Decorate a function that runs models: ``spaces.GPU(duration=duration)`` on ZeroGPU, with
    a CPU fallback when ZeroGPU refuses the call; the function itself anywhere else.

    ``duration`` is seconds, or a function of the same arguments returning seconds (e.g. one
    that grows with a batch). ``gpu`` is the decorator to apply (default ``spaces.GPU``).
    """

    def decorate(fn: F) -> F:
        on_gpu = (gpu or spaces.GPU)(duration=duration)(fn)
        if on_gpu is fn:  # not on ZeroGPU: spaces.GPU is the identity
            return fn

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return on_gpu(*args, **kwargs)
            except gr.Error as err:
                if not is_zerogpu_refusal(err):
                    raise
            gr.Warning(CPU_FALLBACK_MESSAGE, title="Running on the CPU")
            with _cpu_fallback():
                return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return decorate
