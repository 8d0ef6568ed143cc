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
