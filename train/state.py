"""The training state behind ``--resume``: written atomically at the end of every epoch.

``OUT/train_state.pt`` holds the last epoch's weights, optimiser, scheduler and grad-scaler
states, every rank's RNG states, the epoch and step counters, the best model's score, the
early-stopping counter and the history. It is saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``: tensors and plain Python values only.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mirage_demo.fileio import atomic_write
from train.config import UsageError

__all__ = ["STATE_NAME", "get_rng_state", "load_state", "save_state", "set_rng_state"]

STATE_NAME = "train_state.pt"
STATE_VERSION = 1


def get_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    random.setstate(_tuples(state["python"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples where a round trip may give lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``train_state.pt`` through a temporary file and a rename (never half written)."""
    path = Path(directory) / STATE_NAME
    atomic_write(path, lambda tmp: torch.save({"version": STATE_VERSION, **state}, tmp))
    return path


def load_state(directory: str | Path) -> dict[str, Any]:
    """Read ``train_state.pt`` safely; a usage error says what is wrong."""
    path = Path(directory) / STATE_NAME
    if not path.is_file():
        raise UsageError(
            f"nothing to resume: {path} does not exist (drop --resume to start a new run)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say so in one line
        raise UsageError(f"{path} is not a readable training state ({err})") from err
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise UsageError(f"{path} was not written by this version of the trainer")
    return state
