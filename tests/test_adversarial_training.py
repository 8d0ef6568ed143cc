"""Training runs never get stuck (issue 12): every interruption is resumable or restartable."""

from __future__ import annotations

from pathlib import Path

import pytest

import mirage_demo  # noqa: F401  (registers the mirage_* models)

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_args(tmp_path: Path, out: Path, *extra) -> list[str]:
    from tests.test_train import FAST, TINY, make_bands

    data = tmp_path / "data"
    if not data.exists():
        make_bands(data, counts=(4, 2, 2), size=(40, 32))
    return [
        "--data", data, "--out", out, "--cache-dir", tmp_path / "cache", "--epochs", 1,
        "--batch-size", 8, "--warmup-epochs", 0, "--no-tensorboard", *TINY, *FAST, *extra,
    ]  # fmt: skip


def _main(capsys, args) -> tuple[int, str]:
    from train.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_run_killed_during_its_first_save_restarts(tmp_path, capsys, monkeypatch):
    import train.loop

    out = tmp_path / "out"

    def killed(directory, state):  # SIGKILL between the model and the state: what it leaves
        (Path(directory) / ".train_state.pt.k1ll3d.tmp").write_bytes(b"")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train.loop, "save_state", killed)
        code, err = _main(capsys, _train_args(tmp_path, out))
    assert code == 130 and (out / "model.safetensors").exists()
    assert not (out / "train_state.pt").exists()

    code, err = _main(capsys, ["--out", out, "--resume"])
    assert code == 2
    assert "start it again with the same command without --resume" in err
    code, err = _main(capsys, _train_args(tmp_path, out))  # that command works
    assert code == 0, err
    assert (out / "train_state.pt").exists() and (out / "metrics.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    code, err = _main(capsys, _train_args(tmp_path, out))  # a finished run is never overwritten
    assert code == 2 and "already holds a training run" in err


@pytest.mark.parametrize("option", ["--out", "--cache-dir"])
def test_unwritable_folders_stop_before_any_work(tmp_path, capsys, monkeypatch, option):
    import train.setup

    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    monkeypatch.setattr(train.setup, "_load_data", lambda config: pytest.fail("data loaded"))
    args = _train_args(tmp_path, tmp_path / "out")
    args[args.index(option) + 1] = blocker / "sub"
    code, err = _main(capsys, args)
    assert code == 2
    assert err.startswith(f"error: {option} {blocker / 'sub'} is not writable (")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_full_disk_is_one_line_that_says_what_to_do(tmp_path, capsys, monkeypatch):
    import errno
    import shutil

    import train.loop

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    code, err = _main(capsys, _train_args(tmp_path, tmp_path / "early"))
    assert code == 2 and "not enough disk space in" in err and "MB free" in err
    monkeypatch.undo()

    def full(directory, state):  # the disk fills up while the state is written
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(train.loop, "save_state", full)
    code, err = _main(capsys, _train_args(tmp_path, tmp_path / "late"))
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: cannot write ") and "the disk is full" in err
    assert "run the same command again" in err
