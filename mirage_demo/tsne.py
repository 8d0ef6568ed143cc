"""t-SNE of a feature matrix, in a process of its own.

scikit-learn's Barnes-Hut t-SNE is native code: a degenerate input once crashed it (a
segmentation fault) and with it the whole app. :func:`mirage_demo.featuremap.project` therefore
runs this file as a script, ``python mirage_demo/tsne.py SEED``: it reads an ``(n, d)`` float64
``.npy`` array on stdin and writes the ``(n, 2)`` layout as ``.npy`` on stdout. A crash ends
this process only. It imports numpy and scikit-learn alone (no torch, not the package), so it
starts in a second or two, and runs on one thread.

:func:`tsne_layout` also avoids the crash at its root: scikit-learn's ``init="pca"`` divides by
the spread of the first principal component, which is 0 (then NaN) when every point is alike;
the initial layout is computed here, and points without spread start at random.
"""

from __future__ import annotations

import io
import sys

import numpy as np

__all__ = ["tsne_layout"]


def tsne_layout(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """``(n, 2)`` t-SNE coordinates of centred features ``x`` (on their first 50 principal
    components, perplexity at most 30)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(x, dtype=np.float64)
    reduced = PCA(n_components=min(50, *x.shape), random_state=seed).fit_transform(x)
    start = np.pad(reduced[:, :2], ((0, 0), (0, max(0, 2 - reduced.shape[1]))))
    spread = float(start[:, 0].std())
    if np.isfinite(start).all() and spread > 0:
        init: np.ndarray | str = (start / spread * 1e-4).astype(np.float32)  # as init="pca"
    else:
        init = "random"
    perplexity = float(min(30.0, (len(x) - 1) / 3))
    tsne = TSNE(2, perplexity=perplexity, init=init, learning_rate="auto", random_state=seed)
    return tsne.fit_transform(reduced)


def main() -> int:
    from threadpoolctl import threadpool_limits

    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    x = np.load(io.BytesIO(sys.stdin.buffer.read()), allow_pickle=False)
    with threadpool_limits(1):  # OpenMP threads spinning against a busy machine: 5x slower
        coords = tsne_layout(x, seed)
    out = io.BytesIO()
    np.save(out, np.asarray(coords, dtype=np.float64), allow_pickle=False)
    sys.stdout.buffer.write(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
