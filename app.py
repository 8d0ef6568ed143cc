"""MIRAGE OCT demo: ``python app.py`` serves the bundled demo model (see README.md).

``python app.py --checkpoint DIR_OR_HUB_ID`` serves another checkpoint (repeat the option for
a model picker); on a Hugging Face Space set ``MIRAGE_DEMO_CHECKPOINTS`` instead.
"""

import contextlib
import ctypes
import os


def few_malloc_arenas(arenas: int = 2) -> None:
    """Let glibc's malloc use at most ``arenas`` memory pools (``MALLOC_ARENA_MAX``).

    By default each of the server's many request threads may get a pool of its own, and
    memory they free stays resident: under 32 concurrent clients the app grew 970 -> 1194 MiB
    in 2 minutes; with two pools it stayed at ~1040 MiB at the same throughput (see README).
    Set before torch and Gradio start their threads; a no-op off glibc or if already set.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8: M_ARENA_MAX


few_malloc_arenas()  # before any thread starts

import spaces  # noqa: E402, F401  (on a ZeroGPU Space it patches torch before CUDA is touched)

from mirage_demo.ui import main  # noqa: E402

if __name__ == "__main__":
    main()
