"""The real MIRAGE in the app without a GPU: a probe fitted on the labelled scans the app ships.

``python app.py --probe mirage_base`` (and ``python -m mirage_demo.space deploy ... --probe
mirage_base``) calls :func:`bundled_probe`. On first use it downloads MIRAGE-Base into the
Hugging Face cache and runs ``python -m train --mode probe`` on ``assets/probe-set/``
(``train/`` and ``val/``: C and the temperature are chosen on ``val``), with the bundled test
scans (``assets/test-scans/images/``) as its test split, so the checkpoint comes with its
report; the head-only checkpoint (kilobytes) is cached in
``~/.cache/mirage-demo/probes/<key>/<name>/``. Later calls return the cached one at once,
without a network. The key covers the backbone, the probe set's manifest and the test scans.

Fitting runs the trainer, so it needs this repository's ``train/`` (a staged Space has none:
there the head comes fitted, and the Space preloads only the backbone).

The probe set itself is built from the real scans with::

    python -m mirage_demo.bundled_probe --data DATA      # rewrites assets/probe-set/

from the *training* split of the bundled demo models (``train/configs/demo-model.yaml``'s
split settings: patient- and near-copy-disjoint from their test scans, examples excluded), one
image per patient or near-copy group, none a near-copy of a bundled test scan or example, the
same number per class (the rare classes as well represented as the common ones), downsized.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mirage_demo.cache import default_cache_dir
from mirage_demo.data import SplitSpec, load_dataset, patient_id
from mirage_demo.images import IMAGE_SUFFIXES, Sample
from mirage_demo.models import WeightsUnavailableError, hub_weights, registered_hub_weights

__all__ = [
    "PROBE_BACKBONES",
    "PROBE_SET",
    "ProbeUnavailableError",
    "bundled_probe",
    "probe_architecture",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE_SET = REPO_ROOT / "assets" / "probe-set"
TEST_SCANS = REPO_ROOT / "assets" / "test-scans" / "images"
EXAMPLES = REPO_ROOT / "assets" / "examples"
SPLIT_CONFIG = REPO_ROOT / "train" / "configs" / "demo-model.yaml"
MAX_WIDTH = 512  # the backbone's input side; B-scans are wider than tall
JPEG_QUALITY = 80
#: ``--probe`` names: (timm architecture, the checkpoint's name in the app's picker)
PROBE_BACKBONES = {
    "mirage_base": ("mirage_base_patch32_512", "MIRAGE-Base-probe"),
    "mirage_large": ("mirage_large_patch32_512", "MIRAGE-Large-probe"),
}
KEY_VERSION = 2  # 2: the uncertainty statistics gained image statistics (format 2)


class ProbeUnavailableError(RuntimeError):
    """The probe can be neither found in the cache nor fitted here; the message says why."""


def probe_architecture(name: str) -> tuple[str, str]:
    """``(architecture, picker name)`` for a ``--probe`` name (``mirage_base``,
    ``mirage_large``, or any timm architecture with Hub weights in timm's registry)."""
    if name in PROBE_BACKBONES:
        return PROBE_BACKBONES[name]
    try:
        registered_hub_weights(name)
    except ValueError as err:
        choices = ", ".join(PROBE_BACKBONES)
        raise ProbeUnavailableError(
            f"--probe {name}: {err}; use {choices} or a timm architecture with Hub weights"
        ) from err
    return name, f"{name}-probe"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def probe_key(architecture: str, probe_set: Path, test_set: Path) -> str:
    """What the cached probe depends on: the backbone, every image of the probe set and of
    the test scans (relative path and bytes)."""
    digest = hashlib.sha256(f"{KEY_VERSION}\0{architecture}\n".encode())
    for root in (probe_set, test_set):
        for path in _images(root):
            digest.update(f"{path.relative_to(root).as_posix()}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _link_tree(source: Path, target: Path) -> None:
    """``target`` as a copy of ``source``'s images (hard links where the file system allows)."""
    for path in _images(source):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)


def bundled_probe(
    name: str = "mirage_base",
    *,
    probe_set: Path = PROBE_SET,
    test_set: Path = TEST_SCANS,
    root: Path | None = None,
    train_args: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> Path:
    """The checkpoint directory of the app's probe on ``name``'s backbone: cached, or fitted
    now (downloading the backbone once). :class:`ProbeUnavailableError` when neither is
    possible (offline without the backbone, no ``train/``, a failed fit), in one line."""
    architecture, shown = probe_architecture(name)
    for folder, what in ((probe_set, "probe set"), (test_set, "test scans")):
        if not _images(folder / "train" if what == "probe set" else folder):
            raise ProbeUnavailableError(f"the bundled {what} is missing: {folder}")
    root = Path(root) if root is not None else default_cache_dir().parent / "probes"
    entry = root / probe_key(architecture, probe_set, test_set)
    final = entry / shown
    if (final / "metrics.json").is_file():
        return final
    try:
        hub_weights(architecture)  # into the Hugging Face cache now: one clear error if it fails
    except WeightsUnavailableError as err:
        raise ProbeUnavailableError(str(err)) from err
    if not (REPO_ROOT / "train" / "__main__.py").is_file():
        raise ProbeUnavailableError(
            "fitting the probe needs this repository's train/ (not staged on a Space): fit it "
            "where the repository is, e.g. with `python -m mirage_demo.space deploy --probe`"
        )
    data = entry / "data"
    shutil.rmtree(data, ignore_errors=True)
    for split in ("train", "val"):
        _link_tree(probe_set / split, data / split)
    _link_tree(test_set, data / "test")
    out = entry / f".fitting-{uuid.uuid4().hex[:8]}"
    count = len(_images(probe_set))
    command = [
        sys.executable, "-m", "train", "--mode", "probe", "--model", architecture,
        "--pretrained", "--data", str(data), "--out", str(out), "--no-progress",
        "--data-name", f"the app's bundled probe set ({count} Kermany et al. 2018 scans)",
        *map(str, train_args),
    ]  # fmt: skip
    log(f"Fitting a probe on {architecture}'s frozen features ({count} scans; once, then cached)")
    last = ""
    try:
        with subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                if line.strip():
                    last = line.strip()
                    log(line.rstrip())
        if process.returncode != 0:
            raise ProbeUnavailableError(f"fitting the probe failed: {last[:300]}")
        shutil.rmtree(final, ignore_errors=True)  # a stale copy without its report
        os.replace(out, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------
# Building the probe set (python -m mirage_demo.bundled_probe --data DATA)


def split_settings(config_file: Path = SPLIT_CONFIG) -> SplitSpec:
    """The split of a ``python -m train`` YAML config (its paths relative to the repository)."""
    import yaml

    options = yaml.safe_load(config_file.read_text()) or {}
    exclude = tuple(str(REPO_ROOT / e) for e in options.get("exclude", []))
    return SplitSpec(
        val_fraction=options.get("val_fraction", 0.15),
        test_fraction=options.get("test_fraction", 0.15),
        seed=options.get("split_seed", 0),
        exclude=exclude,
        near_copies=options.get("near_copies", 0.95) or None,
    )


def _near_references(
    candidates: list[Sample], references: list[Path], threshold: float
) -> set[int]:
    """Indices of ``candidates`` that are near-copies (mirrored or not) of a reference image."""
    from mirage_demo.nearcopies import near_copy_pairs, thumbnails

    rows = thumbnails([s.path for s in candidates] + references)
    pairs = near_copy_pairs(rows, threshold)
    n = len(candidates)
    return {i for i, j, _ in pairs if i < n <= j}


def build_probe_set(
    data: str | Path,
    out: Path = PROBE_SET,
    per_class: tuple[int, int] = (60, 15),
    seed: int = 0,
    split: SplitSpec | None = None,
) -> dict:
    """Write ``out/{train,val}/<CLASS>/*.jpg`` and ``out/manifest.json``; returns the manifest."""
    from mirage_demo.testscans import ATTRIBUTION, downsized

    split = split or split_settings()
    dataset = load_dataset(data, split)
    candidates = list(dataset.splits["train"])
    references = _images(TEST_SCANS) + _images(EXAMPLES)
    near = _near_references(candidates, references, split.near_copies or 0.95)
    patients = {patient_id(p) for p in references} - {None}  # bundled copies keep the names
    near |= {i for i, s in enumerate(candidates) if patient_id(s.path) in patients}
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[Sample]] = {"train": [], "val": []}
    for k in range(len(dataset.class_names)):
        groups: dict[str, Sample] = {}
        for i in rng.permutation(len(candidates)):
            sample = candidates[i]
            if sample.label == k and i not in near:
                groups.setdefault(sample.group, sample)  # one image per patient or group
        pool = list(groups.values())
        need = sum(per_class)
        if len(pool) < need:
            raise ValueError(f"{dataset.class_names[k]}: {len(pool)} usable groups, {need} needed")
        chosen["val"] += pool[: per_class[1]]
        chosen["train"] += pool[per_class[1] : need]
    shutil.rmtree(out, ignore_errors=True)
    entries = []
    for part, samples in chosen.items():
        for sample in sorted(samples, key=lambda s: str(s.path)):
            cls = dataset.class_names[sample.label]
            target = out / part / cls / f"{sample.path.stem}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            downsized(sample.path, MAX_WIDTH).save(target, quality=JPEG_QUALITY, optimize=True)
            source = hashlib.sha256(sample.path.read_bytes()).hexdigest()
            entries.append({"image": target.relative_to(out).as_posix(), "class": cls,
                            "split": part, "file": f"{cls}/{sample.path.name}",
                            "source_sha256": source})  # fmt: skip
    manifest = {
        "description": "Labelled scans the app fits its MIRAGE probe on (python app.py --probe)",
        "license": "CC BY 4.0",
        "attribution": ATTRIBUTION,
        "selection": {"split": split.to_dict(), "per_class": list(per_class), "seed": seed},
        "scans": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mirage_demo.bundled_probe",
        description="Rebuild assets/probe-set/ from the real scans (see the module's docstring).",
    )
    parser.add_argument("--data", required=True, help="the labelled scans (<CLASS>/*)")
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = build_probe_set(args.data, per_class=(args.train_per_class, args.val_per_class))
    size = sum(p.stat().st_size for p in PROBE_SET.rglob("*") if p.is_file())
    print(f"{len(manifest['scans'])} scans, {size / 2**20:.1f} MiB in {PROBE_SET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
