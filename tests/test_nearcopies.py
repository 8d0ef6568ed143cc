"""Near-copies (renamed, mirrored, re-encoded or neighbouring scans) never straddle a split."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mirage_demo.data import DataError, SplitSpec, load_dataset
from mirage_demo.nearcopies import group_near_copies, near_copy_pairs, thumbnails

EXAMPLES = Path(__file__).parent.parent / "assets" / "examples"
SCANS = sorted(EXAMPLES.glob("*/*.jp*g"))


def _neighbour(path: Path) -> Image.Image:
    """A neighbouring slice's stand-in: shifted two pixels, speckled, re-encoded smaller."""
    array = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    array = np.roll(array, 2, axis=0) + np.random.default_rng(0).normal(0, 8, array.shape)
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    return image.resize((image.width // 2, image.height // 2))


@pytest.fixture
def twins(tmp_path):
    """A flat C8-style dataset: the ten real example scans under file names without a patient
    id, three of them with a near-copy (a mirror image, a neighbour, a resized mirror)."""
    root = tmp_path / "data"
    for i, scan in enumerate(SCANS):
        cls = scan.parent.name
        (root / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(scan, root / cls / f"{cls.lower()}_test_{i}.jpg")
    copies = {
        "mirror": Image.open(SCANS[0]).convert("L").transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "neighbour": _neighbour(SCANS[3]),
        "mirror_small": _neighbour(SCANS[5]).transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    }
    sources = {"mirror": SCANS[0], "neighbour": SCANS[3], "mirror_small": SCANS[5]}
    for name, image in copies.items():
        cls = sources[name].parent.name
        image.save(root / cls / f"{cls.lower()}_train_{name}.jpg", quality=80)
    return root, sources


def test_pairs_are_found_mirror_aware_and_distinct_scans_are_not(twins):
    root, sources = twins
    paths = sorted(root.glob("*/*.jpg"))
    pairs = near_copy_pairs(thumbnails(paths), 0.95)
    found = {(paths[i].name, paths[j].name): mirrored for i, j, mirrored in pairs}
    assert len(found) == 3, found  # the ten distinct real scans pair with nothing
    by_copy = {next(n for n in pair if "train" in n): m for pair, m in found.items()}
    assert by_copy["cnv_train_mirror.jpg"] is True
    assert by_copy["dme_train_neighbour.jpg"] is False
    assert by_copy[f"{sources['mirror_small'].parent.name.lower()}_train_mirror_small.jpg"]


def test_near_copies_never_straddle_a_split(twins):
    root, _ = twins
    for seed in range(3):
        data = load_dataset(root, SplitSpec(val_fraction=0.3, test_fraction=0.3, seed=seed))
        split_of = {s.path.name: name for name, samples in data.splits.items() for s in samples}
        for group in data.near_copies.groups:
            assert len({split_of[name.split("/")[1]] for name in group}) == 1, (seed, group)
    assert len(data.near_copies.groups) == 3
    assert data.near_copies.merged == 3
    assert data.near_copies.mirrored_pairs == 2
    assert any("near-copies" in note and "3 groups" in note for note in data.notes)


def test_without_grouping_the_twins_are_their_own_groups(twins):
    root, _ = twins
    data = load_dataset(root, SplitSpec(0.3, 0.3, near_copies=None))
    assert data.near_copies is None
    groups = [s.group for samples in data.splits.values() for s in samples]
    assert len(set(groups)) == len(groups) == 13


def test_grouping_merges_patient_groups_and_is_deterministic(twins):
    root, _ = twins
    samples = [
        s
        for ss in load_dataset(root, SplitSpec(0.3, 0.3, near_copies=None)).splits.values()
        for s in ss
    ]
    first, found = group_near_copies(samples, 0.95)
    again, _ = group_near_copies(list(reversed(samples)), 0.95)
    assert {s.path: s.group for s in first} == {s.path: s.group for s in again}
    assert found.to_dict()["pairs"] == 3


def test_split_records_without_the_setting_mean_no_grouping():
    old = SplitSpec.from_dict({"val_fraction": 0.15, "test_fraction": 0.15, "seed": 0})
    assert old.near_copies is None
    assert SplitSpec().near_copies == 0.95
    assert SplitSpec.from_dict(SplitSpec().to_dict()) == SplitSpec()
    with pytest.raises(DataError, match="near_copies"):
        SplitSpec(near_copies=1.5)
