"""Convert a MIRAGE release ``.pth`` into a safetensors file, once, without unpickling code.

    python -m mirage_demo.convert MIRAGE-Base.pth MIRAGE-Base.safetensors

The output keeps MIRAGE's key names (like the Hub files), so it loads anywhere a MIRAGE
checkpoint does, e.g. ``create_classifier(name, weights="MIRAGE-Base.safetensors")``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from mirage_demo.models import load_mirage_state_dict


def convert(source: str | Path, target: str | Path) -> int:
    """Write the tensors of ``source`` (unwrapping ``["model"]``) to ``target``; returns count."""
    checkpoint = load_mirage_state_dict(source)
    state = checkpoint.get("model", checkpoint)
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{source} holds no tensors")
    save_file(tensors, str(target), metadata={"format": "pt", "source": Path(source).name})
    return len(tensors)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="MIRAGE .pth from the GitHub release")
    parser.add_argument("target", type=Path, help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        count = convert(args.source, args.target)
    except (OSError, ValueError) as err:
        parser.exit(1, f"error: {err}\n")
    print(f"wrote {count} tensors to {args.target}")


if __name__ == "__main__":
    main()
