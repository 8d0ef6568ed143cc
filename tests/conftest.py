"""Tests run offline, on CPU, and never touch the user's Hugging Face cache."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="mirage-demo-hf-"))
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are overhead-bound: one intra-op thread is faster, and far faster when
    another process keeps a 2-core machine busy (OpenMP threads then wait on each other).
    Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face Hub cache; returns a function that stores files as a cached repo."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def add_repo(repo_id: str, files: dict, revision: str = "0" * 40):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True)
        for name, source in files.items():
            (snapshot / name).write_bytes(source.read_bytes())
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
        return snapshot

    return add_repo


# --------------------------------------------------------------------------------------------
# The adversarial tests' fixtures (tests/test_adversarial_*.py; helpers in tests/adversarial.py)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A one-block ViT checkpoint at 64 px, 4 classes: seconds to load and run."""
    import timm

    import mirage_demo  # noqa: F401  (registers the mirage_* models)
    from mirage_demo.checkpoint import CheckpointConfig, save_checkpoint
    from mirage_demo.data import Preprocessing
    from tests.adversarial import CLASSES

    directory = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    kwargs = {"img_size": 64, "depth": 1}
    model = timm.create_model("mirage_tiny_patch32_512", num_classes=4, **kwargs).eval()
    config = CheckpointConfig(
        "mirage_tiny_patch32_512", CLASSES, Preprocessing.from_model(model), model_kwargs=kwargs
    )
    return save_checkpoint(directory, model, config)


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """An 8000x8000 grayscale PNG (64 megapixels, the limit) of a few hundred KB."""
    from PIL import Image

    path = tmp_path_factory.mktemp("huge") / "huge.png"
    image = Image.new("L", (8000, 8000), 0)
    image.paste(255, (0, 0, 4000, 8000))  # left half bright: orientation stays checkable
    image.save(path, compress_level=1)
    return path


@pytest.fixture(scope="module")
def app_server(tiny_ckpt):
    """The app on the tiny checkpoint, queued as ``python app.py`` queues it (one model
    call at a time, at most 2 waiting per session); yields (url, registry, demo)."""
    from mirage_demo.ui import ModelChoice, ModelRegistry, build_app, setup_queue
    from tests.test_app import serve

    registry = ModelRegistry([ModelChoice("tiny", str(tiny_ckpt))])
    demo = build_app(registry, max_batch=4)
    setup_queue(demo, concurrency=1, per_session=2, registry=registry)
    url = serve(demo)
    try:
        yield url, registry, demo
    finally:
        demo.close()
