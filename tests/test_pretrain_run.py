"""``python -m train --mode pretrain`` end to end on tiny synthetic scans, and ``--init``."""

import json

import pytest
import torch
from safetensors.torch import load_file

import train.pretrain as pretrain_module
from mirage_demo.checkpoint import load_checkpoint
from mirage_demo.pretraining import load_pretraining
from tests.test_train import FAST, TINY, make_bands, run_main
from train.state import load_state

pytestmark = pytest.mark.usefixtures("one_thread")
DECODER = ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2"]


def pretrain_args(data, out, cache, *extra, epochs=2):
    return [
        "--mode", "pretrain", "--data", data, "--out", out, "--cache-dir", cache,
        "--epochs", epochs, "--batch-size", 8, "--lr", 1e-3, "--warmup-epochs", 1,
        "--mask-ratio", 0.5, *TINY, *DECODER, *FAST, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One finished pre-training run (3 epochs) on the band scans."""
    root = tmp_path_factory.mktemp("pretrain")
    data = make_bands(root / "data")
    out, cache = root / "run", root / "cache"
    from train.cli import main

    code = main([str(a) for a in pretrain_args(data, out, cache, epochs=3)])
    assert code == 0
    return data, out, cache


def test_pretraining_learns_and_writes_a_loadable_checkpoint(pretrained):
    out = pretrained[1]
    rows = (out / "history.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("epoch,step,lr,train_loss,val_loss")
    losses = [float(r.split(",")[4]) for r in rows[1:]]
    assert losses[-1] < losses[0]  # the validation reconstruction improves
    model, config = load_pretraining(out)
    assert config["architecture"] == "mirage_tiny_patch32_512" and config["epoch"] == 3
    assert config["encoder_kwargs"] == {"img_size": 64, "depth": 2}
    assert config["split"]["val_fraction"] == 0.15 and config["license"] == "apache-2.0"
    assert config["training"]["derived"]["images"] == {"train": 36, "val": 15, "test": 15}
    assert config["training"]["derived"]["test_split_seen"] is False
    visible = torch.tensor([[True, False, False, True]])
    out_image = model.reconstruct(torch.rand(1, 1, 64, 64), visible)["bscan"]
    assert out_image.shape == (1, 1, 64, 64) and torch.isfinite(out_image).all()
    encoder = load_file(str(out / "encoder.safetensors"))
    assert "patch_embed.proj.weight" in encoder and not any(k.startswith("norm.") for k in encoder)


def test_a_stopped_pretraining_resumes_to_the_same_weights(
    pretrained, tmp_path, capsys, monkeypatch
):
    data, out, cache = pretrained
    stopped = tmp_path / "stopped"
    original = pretrain_module._epoch

    def stop_after_two(run, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        original(run, epoch)

    monkeypatch.setattr(pretrain_module, "_epoch", stop_after_two)
    code, _, err = run_main(capsys, *pretrain_args(data, stopped, cache, epochs=3))
    assert code == 130 and "--resume" in err
    assert load_state(stopped)["progress"]["epoch"] == 2
    monkeypatch.setattr(pretrain_module, "_epoch", original)
    code, stdout, _ = run_main(capsys, *pretrain_args(data, stopped, cache, epochs=3), "--resume")
    assert code == 0 and "resuming" in stdout
    for name in ("encoder.safetensors", "decoder.safetensors"):
        resumed, whole = load_file(str(stopped / name)), load_file(str(out / name))
        assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_pretraining_refuses_weights_and_non_mirage_models(pretrained, tmp_path, capsys):
    data, _, cache = pretrained
    code, _, err = run_main(capsys, *pretrain_args(data, tmp_path / "a", cache), "--pretrained")
    assert code == 2 and "random weights" in err
    args = pretrain_args(data, tmp_path / "b", cache)
    args[args.index("mirage_tiny_patch32_512")] = "resnet18"
    code, _, err = run_main(capsys, *args)
    assert code == 2 and "mirage_*" in err


def test_finetune_and_probe_start_from_the_pretrained_encoder(pretrained, tmp_path, capsys):
    data, pre, cache = pretrained
    out = tmp_path / "ft"
    code, _, _ = run_main(
        capsys, "--data", data, "--out", out, "--cache-dir", cache, "--epochs", 1,
        "--batch-size", 8, "--lr", 1e-4, "--mode", "linear", "--init", pre, *TINY, *FAST,
    )  # fmt: skip
    assert code == 0
    model, config = load_checkpoint(out)
    encoder = load_file(str(pre / "encoder.safetensors"))
    state = model.state_dict()
    # --mode linear trains the head only: the encoder is the pre-trained one, unchanged
    assert all(torch.equal(state[k], v) for k, v in encoder.items())
    assert config.source_weights["from_scratch"] is False
    assert "masked-autoencoder" in config.source_weights["name"]
    assert "pre-trained as a masked autoencoder" in config.description
    code, _, err = run_main(
        capsys, "--data", data, "--out", tmp_path / "bad", "--cache-dir", cache, "--init", pre,
        "--model", "mirage_base_patch32_512", *FAST,
    )  # fmt: skip
    assert code == 2 and "pre-trained mirage_tiny_patch32_512" in err
    code, _, err = run_main(
        capsys, "--data", data, "--out", tmp_path / "bad2", "--cache-dir", cache,
        "--init", tmp_path, *TINY, *FAST,
    )  # fmt: skip
    assert code == 2 and "--init" in err and "config.json" in err
    probe = tmp_path / "probe"
    code, _, _ = run_main(
        capsys, "--data", data, "--out", probe, "--cache-dir", cache, "--mode", "probe",
        "--init", pre, *TINY, *FAST,
    )  # fmt: skip
    assert code == 0
    assert (
        json.loads((probe / "config.json").read_text())["source_weights"]["from_scratch"] is False
    )
