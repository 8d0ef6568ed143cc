import os
import pickle

import numpy as np
import torch
from PIL import Image

from mirage_demo.cache import CachedImages, build_cache, cache_key
from mirage_demo.data import Preprocessing, discover_dataset


def make_images(root, n=6):
    rng = np.random.default_rng(0)
    for cls in ("A", "B"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            array = rng.integers(0, 256, size=(30 + i, 50), dtype=np.uint8)
            Image.fromarray(array).save(root / cls / f"{cls}-{i}.png")
    (root / "B" / "B-broken.png").write_bytes(b"definitely not a png")
    return discover_dataset(root).splits["all"]


def test_cache_matches_preprocessing_and_skips_unreadable(tmp_path):
    samples = make_images(tmp_path / "data")
    pre = Preprocessing(input_size=(24, 20))
    cache = build_cache(samples, pre, tmp_path / "cache")
    assert cache.images.shape == (len(samples), 24, 20) and cache.images.dtype == np.uint8
    broken = next(i for i, s in enumerate(samples) if s.path.name == "B-broken.png")
    assert list(cache.errors) == [broken]
    assert "B-broken.png: not a readable image" in cache.unreadable[0]
    assert broken not in cache.readable and len(cache.readable) == len(samples) - 1
    for i in cache.readable:
        expected = pre.read_resized(samples[i].path)[0].numpy()
        cached = cache.images[i].astype(np.float32) / 255
        assert np.abs(cached - expected).max() <= 0.5 / 255 + 1e-6
    dataset = CachedImages(cache)
    image, label, index = dataset[3]
    assert image.shape == (1, 24, 20) and image.dtype == torch.uint8
    assert label == samples[index].label and len(dataset) == len(samples) - 1


def test_cache_is_reused_and_rebuilt_when_files_change(tmp_path):
    samples = make_images(tmp_path / "data", n=3)
    pre = Preprocessing(input_size=(16, 16))
    first = build_cache(samples, pre, tmp_path / "cache")
    stamp = (first.directory / "images.npy").stat().st_mtime_ns
    again = build_cache(samples, pre, tmp_path / "cache")
    assert again.directory == first.directory
    assert (again.directory / "images.npy").stat().st_mtime_ns == stamp  # not rebuilt
    assert cache_key(samples, Preprocessing(input_size=(32, 32))) != cache_key(samples, pre)
    changed = samples[0].path
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))
    rebuilt = build_cache(samples, pre, tmp_path / "cache")
    assert rebuilt.directory != first.directory
    assert rebuilt.images[0].max() == 0  # a constant image min-maxes to zeros
    leftovers = [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers


def test_cache_built_by_workers_and_read_by_workers(tmp_path):
    samples = make_images(tmp_path / "data", n=4)
    pre = Preprocessing(input_size=(16, 16))
    serial = build_cache(samples, pre, tmp_path / "serial")
    parallel = build_cache(samples, pre, tmp_path / "parallel", workers=2)
    assert np.array_equal(serial.images, parallel.images)
    assert serial.errors == parallel.errors
    clone = pickle.loads(pickle.dumps(parallel))  # what a worker receives: no pixels
    assert clone._images is None and np.array_equal(clone.images, parallel.images)
    loader = torch.utils.data.DataLoader(CachedImages(parallel), batch_size=3, num_workers=2)
    indices = torch.cat([batch[2] for batch in loader]).tolist()
    assert sorted(indices) == parallel.readable
