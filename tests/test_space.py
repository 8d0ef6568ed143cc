"""Hugging Face Spaces: the staged folder, its boot, the deploy calls (ZeroGPU: test_zerogpu.py).

Upload is tested at the ``HfApi`` boundary, without a network: :class:`RecordingHfApi`, a
subclass of the real ``huggingface_hub.HfApi``, records every call the deploy makes (each one
bound against the real method's signature, so a wrong argument fails here), and answers like
the Hub would; a network guard refuses any other connection. The staged folder is booted with
``python app.py`` in a subprocess using this interpreter (Python 3.11 here; the Space runs 3.12):
the staged ``requirements.txt`` is this repository's, already installed here, and every other
package installed here (pytest, grad-cam, playwright, ...) is made unimportable in that process,
as it would be on the Space.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import ClassVar

import gradio as gr
import httpx
import pytest
import yaml
from gradio_client import Client, handle_file
from huggingface_hub import HfApi, SpaceHardware
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoUrl

from mirage_demo import space
from mirage_demo.inference import Predictor
from mirage_demo.ui.context import PREDICTED
from tests.test_app import CLASSES, NetworkGuard, free_port, tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SCAN = Path("assets/examples/CNV/CNV-451136-1.jpeg")
GRADIO_COLOURS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A local checkpoint as ``python -m train`` leaves it: with resume state and logs."""
    directory = tiny_checkpoint(tmp_path_factory.mktemp("runs") / "my-model")
    (directory / "train_state.pt").write_bytes(b"resume state: never published")
    (directory / "uncertainty.safetensors").write_bytes(b"served: staged by name")
    (directory / "history.csv").write_text("epoch,loss\n1,1.0\n")
    (directory / "train_config.yaml").write_text("epochs: 1\n")
    (directory / "tensorboard").mkdir()
    (directory / "tensorboard" / "events.out.tfevents.1").write_bytes(b"\0")
    return directory


def read_front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def check_space_front_matter(meta: dict, app_dir: Path) -> None:
    """The Spaces configuration reference, for a Gradio Space on ZeroGPU or CPU."""
    assert isinstance(meta["title"], str) and meta["title"]
    assert meta["sdk"] == "gradio"
    assert str(meta["sdk_version"]) == gr.__version__  # the version the tests ran against
    requirements = (app_dir / "requirements.txt").read_text()
    assert f"gradio=={meta['sdk_version']}" in requirements
    assert isinstance(meta["python_version"], str)  # a YAML float would turn 3.10 into 3.1
    assert meta["python_version"] in ("3.10", "3.12")  # what ZeroGPU offers
    assert (app_dir / meta["app_file"]).is_file()
    assert meta["colorFrom"] in GRADIO_COLOURS and meta["colorTo"] in GRADIO_COLOURS
    assert len(meta["short_description"]) <= 60
    assert meta.get("suggested_hardware", "cpu-basic") in {h.value for h in SpaceHardware}


def test_repository_readme_is_a_valid_space_config():
    check_space_front_matter(read_front_matter(ROOT / "README.md"), ROOT)


# --------------------------------------------------------------------------------------------
# Staging (dry run)


def test_dry_run_stages_the_app_and_nothing_of_training(tmp_path, trained, capsys):
    out = tmp_path / "out"
    code = space.main(
        ["deploy", "you/oct-demo", "--checkpoint", str(trained), "--dry-run", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "MIRAGE_DEMO_CHECKPOINTS=checkpoints/my-model" in printed

    meta = read_front_matter(out / "README.md")
    check_space_front_matter(meta, out)
    assert "suggested_hardware" not in meta  # ZeroGPU is set through the API
    assert "spaces" in (out / "requirements.txt").read_text()

    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"app.py", "LICENSE", "mirage_demo/ui/app.py", "mirage_demo/zerogpu.py"} <= files
    assert {f"assets/examples/{SCAN.parent.name}/{SCAN.name}"} <= files
    # whatever assets/ holds now is staged: every bundled checkpoint's served files
    for checkpoint in (ROOT / "assets").glob("*/config.json"):
        name = checkpoint.parent.name
        weights = ("encoder", "decoder") if name == "tiny-mirage" else ("model",)  # pre-training
        served = {f"assets/{name}/{w}.safetensors" for w in weights}
        assert {f"assets/{name}/config.json", *served} <= files
    assert {
        "checkpoints/my-model/model.safetensors",
        "checkpoints/my-model/config.json",
        "checkpoints/my-model/metrics.json",
        "checkpoints/my-model/confusion_matrix.png",
        "checkpoints/my-model/uncertainty.safetensors",
    } <= files
    training = [
        f
        for f in files
        if f.split("/")[0] in ("train", "tests", "benchmarks", ".ci", ".git")
        or Path(f).name in ("train_state.pt", "history.csv", "train_config.yaml")
        or "tensorboard" in f
        or "__pycache__" in f
        or f.endswith(".pyc")
    ]
    assert training == []
    # the card names the served model, with its report's figure
    card = (out / "README.md").read_text()
    assert "`my-model` | mirage_tiny_patch32_512" in card
    # ... and the hardware each model runs on: all small, so the Space's CPU
    rows = [line for line in card.splitlines() if line.startswith("| `")]
    assert len(rows) == 3 and all(row.endswith("| CPU (no GPU quota) |") for row in rows)


def test_hub_checkpoint_is_preloaded_and_served(tmp_path, trained, hub_cache):
    hub_cache("someone/oct-model", {p.name: p for p in trained.iterdir() if p.is_file()})
    served = space.check_checkpoints(["someone/oct-model"], offline=True)
    staged = space.stage(tmp_path / "out", served, hardware="cpu-basic")
    meta = read_front_matter(tmp_path / "out" / "README.md")
    assert meta["preload_from_hub"] == ["someone/oct-model"]
    assert meta["models"] == ["someone/oct-model"]
    assert meta["suggested_hardware"] == "cpu-basic"
    assert staged.variables == {"MIRAGE_DEMO_CHECKPOINTS": "someone/oct-model"}
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing copied: built in instead


def test_dry_run_lists_an_uncached_hub_checkpoint_unchecked(tmp_path, hub_cache):
    served = space.check_checkpoints(["someone/not-cached"], offline=True)
    staged = space.stage(tmp_path / "out", served)
    assert served[0].config is None
    assert "not checked" in staged.notes[0]


#: The PyTorch versions ZeroGPU installs and their torchvision (the Hub's ZeroGPU page,
#: spaces-zerogpu.md, 2026-08-22), written out here independently of mirage_demo.space.
ZEROGPU_LISTED = {"2.8.0": "0.23.0", "2.9.1": "0.24.1", "2.10.0": "0.25.0", "2.11.0": "0.26.0"}


def requirement_specs(requirements: Path) -> dict[str, str]:
    from packaging.requirements import Requirement

    lines = [line.split("#")[0].strip() for line in requirements.read_text().splitlines()]
    return {r.name: str(r.specifier) for r in map(Requirement, filter(None, lines))}


def test_staged_requirements_admit_the_pytorch_zerogpu_installs(tmp_path):
    """ZeroGPU refuses a Space whose torch requirement admits none of its versions; pip then
    needs the torchvision that goes with the one ZeroGPU chose."""
    from packaging.specifiers import SpecifierSet

    space.stage(tmp_path / "out")
    staged = requirement_specs(tmp_path / "out" / "requirements.txt")
    ours = requirement_specs(ROOT / "requirements.txt")
    torch_spec, vision_spec = SpecifierSet(staged["torch"]), SpecifierSet(staged["torchvision"])
    assert [v for v in ZEROGPU_LISTED if v in torch_spec] == list(ZEROGPU_LISTED)
    assert [v for v in ZEROGPU_LISTED.values() if v in vision_spec] == list(ZEROGPU_LISTED.values())
    for unlisted in ("2.7.1", "2.12.0", ours["torch"].lstrip("=")):
        assert unlisted not in torch_spec
    # every other requirement as this repository's, which still pins what is installed here
    assert {k: v for k, v in staged.items() if not k.startswith("torch")} == {
        k: v for k, v in ours.items() if not k.startswith("torch")
    }
    assert ours["torch"].startswith("==") and ours["torchvision"].startswith("==")
    with pytest.raises(space.DeployError, match="does not name torch"):
        space.space_requirements("gradio==6.31.0\ntorchvision==0.29.1\n")


# --------------------------------------------------------------------------------------------
# The staged folder boots on its own and classifies a real scan


def outside_requirements(requirements: Path) -> set[str]:
    """Top-level modules installed here whose distributions the staged requirements do not
    pull in (test and lint tools, ...): a Space built from those requirements lacks them."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = [line.split("#")[0].strip() for line in requirements.read_text().splitlines()]
    todo = [Requirement(line).name for line in lines if line]
    needed: set[str] = set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in needed:
            continue
        needed.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in map(Requirement, requires):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return {
        module
        for module, dists in metadata.packages_distributions().items()
        if not any(canonicalize_name(d) in needed for d in dists) and module != "pip"
    }


def requirements_only(folder: Path, requirements: Path) -> Path:
    """A ``sitecustomize`` (put on ``PYTHONPATH``) that makes importing anything outside the
    staged requirements fail, as it would on the Space."""
    blocked = sorted(outside_requirements(requirements))
    assert "pytest" in blocked and "spaces" not in blocked and "gradio" not in blocked
    folder.mkdir()
    # None in sys.modules: `import x` fails, importlib.util.find_spec("x") says absent
    (folder / "sitecustomize.py").write_text(
        f"import sys\nsys.modules.update(dict.fromkeys({blocked!r}))\n"
    )
    return folder


#: ``spaces`` as a ZeroGPU Space has it, minus the GPU: CUDA is emulated outside GPU calls
#: (``torch.cuda.is_available()`` is true, as there), and each ``spaces.GPU`` decoration and call
#: is logged; a call pickles its arguments and results, as the real worker does. Gradio, on a
#: Space, passes every event handler through ``gradio_auto_wrap`` (``spaces.GPU`` unless
#: disabled, as in the real package).
SPACES_STAND_IN = """
import os, pickle
import torch

torch.cuda.is_available = lambda: True


def _log(event, fn):
    with open(os.environ["SPACES_STAND_IN_LOG"], "a") as log:
        log.write(f"{event} {fn.__name__}\\n")


def GPU(task=None, *, duration=None, size=None):
    def decorate(fn):
        _log("decorated", fn)

        def on_gpu(*args, **kwargs):
            _log("called", fn)
            args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
            return pickle.loads(pickle.dumps(fn(*args, **kwargs)))

        return on_gpu

    return decorate(task) if callable(task) else decorate


_auto_wrap = os.environ.get("SPACES_GRADIO_AUTO_WRAP") == "true"


def disable_gradio_auto_wrap():
    global _auto_wrap
    _auto_wrap = False


def gradio_auto_wrap(task):  # what Gradio calls on every event handler on a Space
    return GPU(task) if _auto_wrap and callable(task) else task
"""


def zerogpu_variables(site: Path, log: Path) -> dict[str, str]:
    """The stand-in ``spaces`` put on the path ``site``, and the variables a ZeroGPU Space sets
    (the stand-in logs to ``log``)."""
    (site / "spaces").mkdir()
    (site / "spaces" / "__init__.py").write_text(SPACES_STAND_IN)
    log.touch()
    return {
        "SPACES_ZERO_GPU": "true",  # what the spaces package and the app read
        "SPACES_GRADIO_AUTO_WRAP": "true",  # Gradio would wrap every handler: the app stops it
        "SPACE_ID": "you/oct-demo",
        "SYSTEM": "spaces",
        "SPACES_STAND_IN_LOG": str(log),
    }


@contextlib.contextmanager
def booted(folder: Path, env: dict[str, str], app_log: Path) -> Iterator[Client]:
    """``python app.py`` run in ``folder`` with ``env`` (output in ``app_log``): a client once
    it answers (within 240 s), the process stopped afterwards."""
    port = free_port()
    with app_log.open("w") as stream:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(port)],
            cwd=folder,
            env=env,
            stdout=stream,
            stderr=subprocess.STDOUT,
        )
    try:
        client = None
        deadline = time.monotonic() + 240
        while client is None:
            assert process.poll() is None, app_log.read_text()
            assert time.monotonic() < deadline, "did not start:\n" + app_log.read_text()
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:  # not listening yet
                time.sleep(0.5)
        yield client
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize("zero_gpu", [False, True], ids=["cpu", "zerogpu"])
def test_staged_folder_boots_and_answers_predict(tmp_path, trained, zero_gpu):
    """The staged Space boots with only its requirements and answers; under ZeroGPU's
    variables (with the stand-in ``spaces``: CUDA emulated, so a model placed on it would fail
    here) it serves the small models on the CPU without a single GPU call."""
    out = tmp_path / "space"
    staged = space.stage(out, space.check_checkpoints([str(trained)]))
    site = requirements_only(tmp_path / "site", out / "requirements.txt")
    log = tmp_path / "spaces.log"
    env = {
        **os.environ,
        **staged.variables,
        **(zerogpu_variables(site, log) if zero_gpu else {}),
        "GRADIO_ANALYTICS_ENABLED": "False",
        # the staged library, not this checkout's; only what its requirements install
        "PYTHONPATH": str(site),
    }
    with booted(out, env, tmp_path / "app.log") as client:
        scan = handle_file(str(out / SCAN))
        label, info = client.predict(scan, api_name="/predict")
        bundled, bundled_info = client.predict(scan, "demo-model (bundled)", api_name="/predict")
        if zero_gpu:
            _, _, explained = client.predict(
                scan, "demo-vit (bundled)", "attention", PREDICTED, 0.5, api_name="/explain"
            )
    # the default model is the deployed checkpoint (the first in MIRAGE_DEMO_CHECKPOINTS) ...
    expected = Predictor.from_pretrained(trained).predict(out / SCAN).probabilities
    got = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(got) == set(CLASSES)
    assert got == pytest.approx(expected, abs=1e-4)
    assert "on CPU" in info and "on CPU" in bundled_info
    # ... and the bundled demo model, staged from assets/, answers as it does here
    expected = Predictor.from_pretrained(ROOT / "assets" / "demo-model").predict(ROOT / SCAN)
    got = {c["label"]: c["confidence"] for c in bundled["confidences"]}
    assert bundled["label"] == expected.label
    assert got == pytest.approx(expected.probabilities, abs=1e-4)
    if zero_gpu:
        assert "on CPU" in explained
        events = log.read_text().splitlines()
        # the model handlers are ZeroGPU functions (a ZeroGPU Space needs some) ...
        assert {"decorated on_predict", "decorated on_explain", "decorated on_batch"} <= set(events)
        # ... but the small models never called one: no quota reserved
        assert [e for e in events if e.startswith("called")] == []


# --------------------------------------------------------------------------------------------
# Deploying: the exact calls at the HfApi boundary


def http_error(api: HfApi, status: int, reason: str) -> HfHubHTTPError:
    response = httpx.Response(status, request=httpx.Request("POST", api.endpoint))
    return HfHubHTTPError(f"{status} Client Error: {reason}", response=response)


class RecordingHfApi(HfApi):
    """The real HfApi with its network methods replaced by recorders answering like the Hub."""

    paid = False  # a free account
    existing: ClassVar[set[str]] = set()
    variables: ClassVar[dict[str, dict]] = {}
    log: ClassVar[list[tuple[str, dict]]] = []

    def _record(self, name: str, *args, **kwargs) -> dict:
        bound = inspect.signature(getattr(HfApi, name)).bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        self.log.append((name, arguments))
        return arguments

    def whoami(self, *args, **kwargs):
        self._record("whoami", *args, **kwargs)
        if self.token != "hf_valid":
            raise http_error(self, 401, "Unauthorized")
        return {"name": "you"}

    def repo_exists(self, *args, **kwargs):
        return self._record("repo_exists", *args, **kwargs)["repo_id"] in self.existing

    def create_repo(self, *args, **kwargs):
        arguments = self._record("create_repo", *args, **kwargs)
        if arguments["space_hardware"] == "cpu-basic" and not self.paid:
            raise http_error(self, 402, "Payment Required:\nGradio Spaces on CPU need a plan")
        return RepoUrl(f"https://huggingface.co/spaces/{arguments['repo_id']}")

    def upload_folder(self, *args, **kwargs):
        arguments = self._record("upload_folder", *args, **kwargs)
        folder = Path(arguments["folder_path"])
        arguments["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
        arguments["front_matter"] = read_front_matter(folder / "README.md")

    def request_space_hardware(self, *args, **kwargs):
        self._record("request_space_hardware", *args, **kwargs)

    def add_space_variable(self, *args, **kwargs):
        self._record("add_space_variable", *args, **kwargs)

    def get_space_variables(self, *args, **kwargs):
        return self.variables.get(self._record("get_space_variables", *args, **kwargs)["repo_id"])

    def delete_space_variable(self, *args, **kwargs):
        self._record("delete_space_variable", *args, **kwargs)


@pytest.fixture
def hub(monkeypatch):
    """A recording Hub, a valid token in the environment, and no network at all."""
    NetworkGuard(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_valid")
    monkeypatch.setattr(RecordingHfApi, "log", [])
    monkeypatch.setattr(RecordingHfApi, "existing", set())
    monkeypatch.setattr(RecordingHfApi, "variables", {})
    return RecordingHfApi


def test_deploy_creates_a_zerogpu_space(hub, trained, capsys):
    url = space.deploy("you/oct-demo", [str(trained)], api_factory=hub, log=lambda _: None)
    assert url == "https://huggingface.co/spaces/you/oct-demo"
    names = [name for name, _ in hub.log]
    assert names == ["whoami", "repo_exists", "create_repo", "upload_folder"]
    create, upload = hub.log[2][1], hub.log[3][1]
    assert create == {
        "repo_id": "you/oct-demo",
        "repo_type": "space",
        "space_sdk": "gradio",
        "space_hardware": "zero-a10g",
        "space_variables": [{"key": "MIRAGE_DEMO_CHECKPOINTS", "value": "checkpoints/my-model"}],
        "private": False,
    }
    assert upload["repo_id"] == "you/oct-demo" and upload["repo_type"] == "space"
    assert upload["delete_patterns"] == "*"  # the Space mirrors the staged folder
    assert "checkpoints/my-model/model.safetensors" in upload["files"]
    assert not any("train_state" in f or f.startswith("tests") for f in upload["files"])
    assert upload["front_matter"]["python_version"] == "3.12"
    assert not Path(upload["folder_path"]).exists()  # the staging folder is cleaned up


def test_deploy_serves_a_hub_checkpoint(hub, trained, hub_cache):
    """The Hub checkpoint is checked through the real download code (from the local cache:
    HF_HUB_OFFLINE=1), preloaded at build time and named in the Space variable."""
    hub_cache("someone/oct-model", {p.name: p for p in trained.iterdir() if p.is_file()})
    hub.existing.add("you/oct-demo")
    space.deploy("you/oct-demo", ["someone/oct-model"], api_factory=hub, log=lambda _: None)
    calls = dict(hub.log)
    assert calls["add_space_variable"] == {
        "repo_id": "you/oct-demo",
        "key": "MIRAGE_DEMO_CHECKPOINTS",
        "value": "someone/oct-model",
    }
    assert calls["upload_folder"]["front_matter"]["preload_from_hub"] == ["someone/oct-model"]
    assert not any(f.startswith("checkpoints/") for f in calls["upload_folder"]["files"])
    assert "get_space_variables" not in calls  # the variable is set, nothing to remove


def test_deploy_updates_an_existing_space(hub, monkeypatch):
    hub.existing.add("you/oct-demo")
    hub.variables["you/oct-demo"] = {"MIRAGE_DEMO_CHECKPOINTS": "old/model"}
    monkeypatch.setattr(space, "deploy", _with_api(space.deploy, hub))
    code = space.main(["deploy", "you/oct-demo", "--hardware", "cpu-basic"])
    assert code == 0
    calls = [(name, args) for name, args in hub.log if name != "whoami"]
    assert [name for name, _ in calls] == [
        "repo_exists",
        "request_space_hardware",
        "get_space_variables",
        "delete_space_variable",
        "upload_folder",
    ]
    assert calls[1][1] == {"repo_id": "you/oct-demo", "hardware": "cpu-basic"}
    assert calls[3][1] == {"repo_id": "you/oct-demo", "key": "MIRAGE_DEMO_CHECKPOINTS"}


def test_cpu_space_on_a_free_account_says_what_to_do(hub, capsys, monkeypatch):
    monkeypatch.setattr(space, "deploy", _with_api(space.deploy, hub))
    assert space.main(["deploy", "you/oct-demo", "--hardware", "cpu-basic"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "402" in err and "--hardware zero-a10g" in err
    assert "upload_folder" not in [name for name, _ in hub.log]


def corrupt_checkpoint(directory: Path, trained: Path) -> Path:
    directory.mkdir()
    (directory / "config.json").write_bytes((trained / "config.json").read_bytes())
    (directory / "model.safetensors").write_bytes(b"not safetensors at all")
    return directory


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no checkpoint directory"),
        ("corrupt", "does not load"),
        ("repo-id", "not a valid Space id"),
        ("no-token", "no Hugging Face token"),
        ("bad-token", "refused the token"),
        ("hardware", "unknown hardware"),
    ],
)
def test_bad_input_is_refused_before_any_upload(
    case, message, hub, trained, tmp_path, monkeypatch, capsys
):
    repo, checkpoints = "you/oct-demo", [str(trained)]
    argv_extra: list[str] = []
    if case == "missing":  # runs/nope with runs/ here: a typo, not a Hub repo id
        (tmp_path / "runs").mkdir()
        monkeypatch.chdir(tmp_path)
        checkpoints = ["runs/nope"]
    elif case == "corrupt":
        checkpoints = [str(corrupt_checkpoint(tmp_path / "bad", trained))]
    elif case == "repo-id":
        repo = "you/oct--demo"
    elif case == "no-token":
        monkeypatch.delenv("HF_TOKEN")
    elif case == "bad-token":
        monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    elif case == "hardware":
        argv_extra = ["--hardware", "a-big-gpu"]
    argv = ["deploy", repo, *argv_extra]
    for checkpoint in checkpoints:
        argv += ["--checkpoint", checkpoint]
    monkeypatch.setattr(space, "deploy", _with_api(space.deploy, hub))
    assert space.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert [name for name, _ in hub.log if name not in ("whoami",)] == []
    # the dry run refuses the same input (the token is not needed to stage)
    if case not in ("no-token", "bad-token"):
        dry = ["deploy", repo, *argv_extra, "--dry-run", str(tmp_path / "dry")]
        for checkpoint in checkpoints:
            dry += ["--checkpoint", checkpoint]
        assert space.main(dry) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "dry").exists()


def _with_api(deploy, api):
    def call(*args, **kwargs):
        return deploy(*args, api_factory=api, **kwargs)

    return call
