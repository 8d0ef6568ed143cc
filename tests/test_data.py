from collections import Counter

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mirage_demo  # noqa: F401
from mirage_demo.data import (
    DataError,
    FileImages,
    ImageReadError,
    Preprocessing,
    balanced_sampler,
    class_weights,
    collate_skip_unreadable,
    discover_dataset,
    load_dataset,
    patient_id,
    patient_split,
    read_image,
    train_augmentation,
)

CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]


def write_scan(path, value=128, size=(48, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    array = np.clip(rng.normal(value, 30, size[::-1]), 0, 255).astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


def make_kermany(root, patients=8, per_patient=2, splits=("train",)):
    for split in splits:
        for c, cls in enumerate(CLASSES):
            for p in range(patients):
                for n in range(per_patient):
                    pid = 1000 * (c + 1) + p
                    write_scan(root / split / cls / f"{cls}-{pid}-{n}.jpeg", 40 + 50 * c)
    return root


def test_patient_id_from_kermany_names():
    assert patient_id("CNV-1016042-1.jpeg") == "1016042"
    assert patient_id("/x/NORMAL-9709360-3.png") == "9709360"
    assert patient_id("cnv_train_1005.jpg") is None
    assert patient_id("CNV.jpeg") is None


def test_discover_split_layout(tmp_path):
    make_kermany(tmp_path, patients=2, per_patient=1, splits=("train", "test"))
    data = discover_dataset(tmp_path)
    assert data.class_names == CLASSES
    assert set(data.splits) == {"train", "test"}
    assert data.counts("train") == dict.fromkeys(CLASSES, 2)
    sample = data.splits["test"][0]
    assert sample.label == 0 and sample.group == "patient:1000"


def test_flat_layout_is_split_patient_disjoint_and_stratified(tmp_path):
    make_kermany(tmp_path / "flat", patients=10, per_patient=3, splits=("",))
    data = load_dataset(tmp_path / "flat", val_fraction=0.2, test_fraction=0.2, seed=1)
    assert set(data.splits) == {"train", "val", "test"}
    groups = {s: {x.group for x in v} for s, v in data.splits.items()}
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert sum(len(v) for v in data.splits.values()) == 120
    for split in ("val", "test"):
        assert all(n > 0 for n in data.counts(split).values()), split
    again = load_dataset(tmp_path / "flat", val_fraction=0.2, test_fraction=0.2, seed=1)
    assert again.splits == data.splits
    other = load_dataset(tmp_path / "flat", val_fraction=0.2, test_fraction=0.2, seed=2)
    assert other.splits["val"] != data.splits["val"]
    from mirage_demo.data import SplitSpec

    record = SplitSpec(val_fraction=0.2, test_fraction=0.2, seed=1)
    assert load_dataset(tmp_path / "flat", record).splits == data.splits  # the typed record
    assert load_dataset(tmp_path / "flat", record, seed=2).splits == other.splits  # overridden


def test_missing_val_is_carved_from_train(tmp_path):
    make_kermany(tmp_path, patients=10, per_patient=2, splits=("train", "test"))
    data = load_dataset(tmp_path, val_fraction=0.2)
    assert len(data.splits["test"]) == 80
    assert {s.group for s in data.splits["train"]}.isdisjoint(s.group for s in data.splits["val"])
    assert any("carved" in note for note in data.notes)


def test_files_without_patient_id_are_their_own_group(tmp_path):
    for i in range(12):
        write_scan(tmp_path / "CNV" / f"cnv_train_{i}.jpg")
        write_scan(tmp_path / "NORMAL" / f"normal_train_{i}.jpg")
    data = load_dataset(tmp_path, val_fraction=0.25, test_fraction=0.25)
    assert len({s.group for s in data.splits["train"]}) == len(data.splits["train"])


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "has no class folders"),
        (lambda root: (root / "CNV").mkdir(parents=True), "class 'CNV' has no images"),
        (lambda root: (root / "val" / "CNV").mkdir(parents=True), "no train/ folder"),
    ],
)
def test_bad_dataset_folders(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        discover_dataset(root)


def test_class_mismatch_names_the_difference(tmp_path):
    make_kermany(tmp_path, patients=1, per_patient=1, splits=("train", "val"))
    for f in (tmp_path / "val" / "DME").iterdir():
        f.unlink()
    (tmp_path / "val" / "DME").rmdir()
    write_scan(tmp_path / "val" / "GA" / "GA-1-1.png")
    expected = r"val/ has \[CNV, DRUSEN, GA, NORMAL\].*missing DME; extra GA"
    with pytest.raises(DataError, match=expected):
        discover_dataset(tmp_path)


def test_read_image_modes(tmp_path):
    sixteen = (np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 30).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "16bit.png")
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "rgb.png")
    Image.new("RGBA", (20, 10), (0, 255, 0, 128)).save(tmp_path / "rgba.png")
    Image.new("L", (20, 10), 7).convert("P").save(tmp_path / "palette.png")
    frames = [Image.new("L", (8, 8), v) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    big = read_image(tmp_path / "16bit.png")
    assert big.shape == (32, 64) and big.max() == sixteen.max()  # full 16-bit range kept
    assert read_image(tmp_path / "rgb.png")[0, 0] == pytest.approx(76, abs=1)
    assert read_image(tmp_path / "rgba.png").shape == (10, 20)
    assert read_image(tmp_path / "palette.png")[0, 0] == 7
    assert read_image(tmp_path / "anim.gif")[0, 0] == 10
    assert read_image(np.zeros((5, 6, 3), np.uint8)).shape == (5, 6)
    pre = Preprocessing(input_size=(16, 24))
    tensor = pre(tmp_path / "16bit.png")
    assert tensor.shape == (1, 16, 24) and tensor.min() == 0 and tensor.max() == 1
    assert torch.count_nonzero(pre(np.full((4, 4), 9.0))) == 0  # constant image -> zeros


@pytest.mark.parametrize(
    "content, message",
    [
        (b"hello, I am text", "not a readable image"),
        (b"", "not a readable image"),
        ("truncated", "corrupt or truncated"),
    ],
)
def test_unreadable_images_raise_with_name(tmp_path, content, message):
    path = tmp_path / "scan.jpeg"
    if content == "truncated":
        write_scan(path, size=(256, 256))
        path.write_bytes(path.read_bytes()[:600])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match=f"scan.jpeg: {message}"):
        read_image(path)


def test_huge_image_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(path)
    with pytest.raises(ImageReadError, match="huge.png: image is too large"):
        read_image(path)
    Image.new("1", (9000, 9000)).save(path)  # under PIL's bomb limit, over ours
    with pytest.raises(ImageReadError, match="9000x9000 pixels is too large"):
        read_image(path)


def test_dataset_skips_unreadable_files(tmp_path, caplog):
    make_kermany(tmp_path, patients=1, per_patient=2)
    bad = tmp_path / "train" / "DME" / "DME-2000-9.jpeg"
    bad.write_bytes(b"not a jpeg")
    data = discover_dataset(tmp_path)
    dataset = FileImages(data.splits["train"], Preprocessing(input_size=(32, 32)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_skip_unreadable)
    seen = sum(len(labels) for images, labels, indices in loader)
    assert seen == len(dataset) - 1
    assert "DME-2000-9.jpeg" in caplog.text
    assert collate_skip_unreadable([None, None]) is None


def test_augmentation_keeps_shape_and_range():
    torch.manual_seed(0)
    augment = train_augmentation(fill=1.0)
    image = torch.rand(1, 64, 64)
    out = augment(image)
    assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, image)


def test_preprocessing_from_model_and_round_trip():
    model = timm.create_model("mirage_tiny_patch32_512", img_size=128)
    pre = Preprocessing.from_model(model)
    assert pre.input_size == (128, 128) and pre.in_chans == 1 and pre.std == (0.2,)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    cnn = timm.create_model("resnet18", in_chans=1)
    cnn_pre = Preprocessing.from_model(cnn, input_size=96)
    assert cnn_pre.input_size == (96, 96) and len(cnn_pre.mean) == 1
    assert cnn_pre.mean[0] == pytest.approx(np.mean([0.485, 0.456, 0.406]))


def imbalanced_samples(root):
    """30 images of class A, 3 of class B."""
    for i in range(30):
        write_scan(root / "A" / f"a{i}.png")
    for i in range(3):
        write_scan(root / "B" / f"b{i}.png")
    return discover_dataset(root).splits["all"]


def test_class_weights_and_balanced_sampler(tmp_path):
    samples = imbalanced_samples(tmp_path)
    weights = class_weights(samples, 2)
    assert weights[1] / weights[0] == pytest.approx(10.0)
    assert (weights[torch.tensor([s.label for s in samples])]).mean() == pytest.approx(1.0)
    drawn = Counter(samples[i].label for i in balanced_sampler(samples, 2, num_samples=3000))
    assert abs(drawn[0] - drawn[1]) < 300


def test_square_root_sampling_draws_classes_in_proportion_to_sqrt_count(tmp_path):
    samples = imbalanced_samples(tmp_path)
    weights = class_weights(samples, 2, power=0.5)
    assert weights[1] / weights[0] == pytest.approx(10**0.5)
    drawn = Counter(
        samples[i].label for i in balanced_sampler(samples, 2, num_samples=4000, power=0.5)
    )
    expected_b = 4000 * 3**0.5 / (30**0.5 + 3**0.5)  # 961: sqrt(3) / (sqrt(30) + sqrt(3))
    assert abs(drawn[1] - expected_b) < 100  # ~3.5 binomial standard deviations


def test_patient_split_refuses_too_few_patients(tmp_path):
    for i in range(3):
        write_scan(tmp_path / "A" / f"A-1-{i}.png")
        write_scan(tmp_path / "B" / f"B-2-{i}.png")
    with pytest.raises(DataError, match="too few patients"):
        patient_split(discover_dataset(tmp_path).splits["all"], {"val": 0.2})


def test_exclude_removes_copies_and_their_patients(tmp_path):
    make_kermany(tmp_path / "data", patients=6, per_patient=2, splits=("train", "test"))
    reference = tmp_path / "examples"
    reference.mkdir()
    source = tmp_path / "data" / "train" / "DME" / "DME-2003-0.jpeg"
    (reference / "renamed.jpeg").write_bytes(source.read_bytes())  # a copy, under another name
    (reference / "NORMAL-4001-7.jpeg").write_bytes(b"x")  # a patient id, other content
    data = load_dataset(tmp_path / "data", val_fraction=0.2, exclude=[reference])
    names = {s.path.name for samples in data.splits.values() for s in samples}
    assert "DME-2003-0.jpeg" not in names and "DME-2003-1.jpeg" in names
    assert not {"NORMAL-4001-0.jpeg", "NORMAL-4001-1.jpeg"} & names
    # the copy is in train and test (same name, same pixels), the patient twice in each
    assert any("excluded 6 images" in note for note in data.notes)
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(tmp_path / "data", exclude=[tmp_path / "missing"])


def test_image_read_error_carries_name_and_reason(tmp_path):
    import pickle

    (tmp_path / "scan.png").write_bytes(b"plain text")
    with pytest.raises(ImageReadError) as raised:
        read_image(tmp_path / "scan.png")
    err = raised.value
    assert (err.name, err.reason) == ("scan.png", "not a readable image (unknown format)")
    copy = pickle.loads(pickle.dumps(err))  # crosses DataLoader worker processes intact
    assert (copy.name, copy.reason, str(copy)) == (err.name, err.reason, str(err))
    Image.fromarray(np.full((4, 6), 7, np.uint8)).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    assert read_image(data).shape == (4, 6)  # a file's bytes read like the file


def test_denormalize_inverts_normalize_and_the_recipe_is_written_once():
    from mirage_demo.augment import BatchAugmentation

    image = torch.rand(2, 1, 8, 8)
    for pre in (Preprocessing(mean=(0.2,), std=(0.2,), in_chans=3), Preprocessing()):
        torch.testing.assert_close(pre.denormalize(pre.normalize(image)), image)
    recipe = BatchAugmentation()
    _, affine, jitter = train_augmentation().transforms
    assert affine.degrees == [-recipe.degrees, recipe.degrees]
    assert affine.scale == recipe.scale and jitter.brightness == (0.8, 1.2)
