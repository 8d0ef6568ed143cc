"""Put the app online as a Hugging Face Space: stage what a Space needs, create or update it.

    python -m mirage_demo.space deploy you/oct-demo                        # bundled models, ZeroGPU
    python -m mirage_demo.space deploy you/oct-demo --checkpoint runs/base --checkpoint you/model
    python -m mirage_demo.space deploy you/oct-demo --hardware cpu-basic --private
    python -m mirage_demo.space deploy you/oct-demo --dry-run out/         # stage only, no network

The staged folder holds ``app.py``, the library (``mirage_demo/``), ``assets/`` (example scans
and the bundled models, as they are when you run this), ``LICENSE``, a ``requirements.txt``
(this repository's, which includes ``spaces``, with torch and torchvision admitting the versions
ZeroGPU installs: :func:`space_requirements`) and a ``README.md`` whose front matter is the
Space's configuration, followed by a short card of the models served. Local checkpoints are
copied into ``checkpoints/NAME/`` with their weights, config and report only (never
``train_state.pt`` or logs); Hub checkpoints are listed in ``preload_from_hub`` (downloaded when
the Space is built) and in the Space variable ``MIRAGE_DEMO_CHECKPOINTS`` (what the app serves).

Every input is checked before anything is uploaded: the Space id, that each checkpoint exists
and loads, and a Hugging Face token (``hf auth login`` or ``$HF_TOKEN``). Then the Space is
created (or updated, mirroring the staged folder) with ``HfApi.upload_folder``, which stores the
binaries (weights, scans, figures) with Xet, as Spaces require.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirage_demo.checkpoint import (
    CONFIG_NAME,
    UNCERTAINTY_NAME,
    WEIGHTS_NAME,
    CheckpointConfig,
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint_dir,
)
from mirage_demo.metrics import REPORT_FILES
from mirage_demo.models import registered_hub_weights
from mirage_demo.pretraining import is_pretraining_checkpoint
from mirage_demo.reports import ReportError, load_report

__all__ = [
    "DEFAULT_HARDWARE",
    "DeployError",
    "ServedCheckpoint",
    "StagedSpace",
    "check_checkpoints",
    "check_space_id",
    "deploy",
    "main",
    "space_requirements",
    "stage",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
#: What a Space needs from this repository; nothing of train/, tests/ or benchmarks/.
STAGED_PATHS = ("app.py", "mirage_demo", "assets", "LICENSE")
UNSTAGED_PATHS = ("assets/probe-set",)  # what a probe is fitted on: never needed on a Space
REQUIREMENTS = "requirements.txt"  # staged through space_requirements()
#: The PyTorch versions ZeroGPU installs, each with its torchvision (the Hub's ZeroGPU page,
#: spaces-zerogpu.md, 2026-08-22). A Space whose requirements admit none is refused at build
#: ("No candidate PyTorch version found for ZeroGPU").
ZEROGPU_TORCH = {"2.8.0": "0.23.0", "2.9.1": "0.24.1", "2.10.0": "0.25.0", "2.11.0": "0.26.0"}
#: The files of a checkpoint directory the app reads (weights, config, uncertainty statistics,
#: report, card; the tiny MIRAGE's encoder, decoder and label-efficiency curve).
SERVED_FILES = frozenset(
    {CONFIG_NAME, WEIGHTS_NAME, UNCERTAINTY_NAME, *REPORT_FILES, "README.md"}
    | {"encoder.safetensors", "decoder.safetensors", "label_efficiency.json"}
)
ENV_CHECKPOINTS = "MIRAGE_DEMO_CHECKPOINTS"
DEFAULT_HARDWARE = "zero-a10g"  # ZeroGPU: the hardware free accounts may use for Gradio
_SPACE_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class DeployError(ValueError):
    """Input that cannot be deployed; the message says what to fix."""


@dataclass(frozen=True)
class ServedCheckpoint:
    """A checkpoint to serve: where it comes from and what the app is told to load."""

    source: str  # as given: a directory or owner/name[@revision]
    config: CheckpointConfig | None  # None: a Hub checkpoint not checked (dry run, not cached)
    directory: Path | None  # local files (a directory, or the Hub cache)
    local: bool  # True: copied into the Space

    @property
    def name(self) -> str:
        return Path(self.source).name if self.local else self.source

    def served_as(self) -> str:
        """The ``MIRAGE_DEMO_CHECKPOINTS`` entry: a path inside the Space, or the repo id."""
        if not self.local:
            return self.source
        assert self.directory is not None
        bundled = _inside(self.directory, REPO_ROOT / "assets")
        return bundled.as_posix() if bundled else f"checkpoints/{self.name}"


@dataclass
class StagedSpace:
    """A staged Space folder and the settings it needs on the Hub."""

    directory: Path
    front_matter: dict[str, Any]
    variables: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        return sorted(
            p.relative_to(self.directory).as_posix()
            for p in self.directory.rglob("*")
            if p.is_file()
        )

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# Checks: everything is refused before anything is staged or uploaded


def check_space_id(repo_id: str) -> str:
    """``owner/name`` as the Hub accepts it for a Space, or :class:`DeployError`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    problem = None
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        problem = str(err)
    if problem is None and not _SPACE_ID.match(repo_id):
        problem = "expected owner/name (letters, digits, '-', '_', '.')"
    if problem:
        raise DeployError(f"{repo_id!r} is not a valid Space id: {problem}")
    return repo_id


def check_checkpoints(sources: Sequence[str], offline: bool = False) -> list[ServedCheckpoint]:
    """Each source, checked: it exists and loads. ``offline`` (dry run): Hub checkpoints come
    from the local cache only; one that is not cached is listed unchecked, with a note."""
    checked: list[ServedCheckpoint] = []
    for source in sources:
        path = Path(source).expanduser()
        local = path.exists()
        try:
            if local and not path.is_dir():
                raise CheckpointError(f"{source} is a file, not a checkpoint directory")
            if not local and _looks_local(source):
                raise CheckpointError(f"no checkpoint directory at {source}")
            directory = resolve_checkpoint_dir(source, local_files_only=offline)
        except CheckpointError as err:
            if offline and _not_cached(err):
                checked.append(ServedCheckpoint(source, None, None, local=False))
                continue
            raise DeployError(f"checkpoint {source}: {err}") from err
        try:
            _, config = load_checkpoint(directory)
        except CheckpointError as err:
            raise DeployError(f"checkpoint {source} does not load: {err}") from err
        checked.append(ServedCheckpoint(source, config, directory, local=local))
    names = [c.name for c in checked if c.local]
    if duplicated := sorted({n for n in names if names.count(n) > 1}):
        raise DeployError(f"two local checkpoints are named {duplicated[0]!r}: rename one")
    return checked


def _not_cached(err: CheckpointError) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError

    return isinstance(err.__cause__, LocalEntryNotFoundError)


def _looks_local(source: str) -> bool:
    """``runs/x`` when ``runs/`` exists here: a missing directory, not a Hub repo id."""
    parent = Path(source).expanduser().parent
    return str(parent) not in ("", ".") and parent.is_dir()


def _inside(path: Path, root: Path) -> Path | None:
    path, root = path.resolve(), root.resolve()
    return path.relative_to(root.parent) if path.is_relative_to(root) else None


# --------------------------------------------------------------------------------------------
# Staging


def stage(
    directory: str | Path,
    checkpoints: Sequence[ServedCheckpoint] = (),
    hardware: str = DEFAULT_HARDWARE,
) -> StagedSpace:
    """Write the Space's files into ``directory`` (created; must be empty if it exists)."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise DeployError(f"{directory} is not empty: stage into a new or empty folder")
    directory.mkdir(parents=True, exist_ok=True)
    for name in STAGED_PATHS:
        _copy_tree(REPO_ROOT / name, directory / name)
    requirements = (REPO_ROOT / REQUIREMENTS).read_text(encoding="utf-8")
    (directory / REQUIREMENTS).write_text(space_requirements(requirements), encoding="utf-8")
    for name in UNSTAGED_PATHS:
        shutil.rmtree(directory / name, ignore_errors=True)
    for checkpoint in checkpoints:
        if checkpoint.local and checkpoint.served_as().startswith("checkpoints/"):
            assert checkpoint.directory is not None
            _copy_tree(checkpoint.directory, directory / checkpoint.served_as())
    meta = front_matter(checkpoints, hardware)
    readme = space_readme(meta, checkpoints, hardware)
    (directory / "README.md").write_text(readme, encoding="utf-8")
    staged = StagedSpace(directory, meta)
    if checkpoints:
        staged.variables[ENV_CHECKPOINTS] = ",".join(c.served_as() for c in checkpoints)
    staged.notes += [
        f"{c.source}: not in the local Hugging Face cache, so not checked (a dry run stays "
        "offline); the deploy itself downloads and checks it"
        for c in checkpoints
        if c.config is None
    ]
    return staged


def space_requirements(text: str) -> str:
    """``requirements.txt`` for a Space: ``text`` with its torch and torchvision pins (what these
    build machines install) widened to the range of :data:`ZEROGPU_TORCH`, so that ZeroGPU can
    install one of its versions and pip the torchvision that matches it."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import Version

    ranges = {}
    for name, versions in (("torch", list(ZEROGPU_TORCH)), ("torchvision", ZEROGPU_TORCH.values())):
        oldest, newest = min(versions, key=Version), Version(max(versions, key=Version))
        ranges[name] = f"{name}>={oldest},<{newest.major}.{newest.minor + 1}"
    lines, replaced = [], set()
    for line in text.splitlines():
        pinned = line.split("#")[0].strip()
        try:
            name = Requirement(pinned).name if pinned else None
        except InvalidRequirement:  # an option such as --extra-index-url
            name = None
        if name in ranges:
            line = f"{ranges[name]}  # what ZeroGPU installs (the repository pins {pinned})"
            replaced.add(name)
        lines.append(line)
    if missing := sorted(set(ranges) - replaced):
        raise DeployError(f"{REQUIREMENTS} does not name {', '.join(missing)}")
    return "\n".join(lines) + "\n"


def _copy_tree(source: Path, target: Path) -> None:
    """Copy a file or folder, leaving out caches, hidden files and, inside a checkpoint, all
    but :data:`SERVED_FILES` (no ``train_state.pt``, logs or TensorBoard events)."""
    if source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        return
    checkpoint = (source / CONFIG_NAME).is_file()
    for item in sorted(source.iterdir()):
        if item.name.startswith(".") or item.name == "__pycache__" or item.suffix == ".pyc":
            continue
        if checkpoint and item.name not in SERVED_FILES:
            continue
        _copy_tree(item, target / item.name)


def repository_front_matter() -> dict[str, Any]:
    """This repository's README front matter: the Space configuration it starts from."""
    from huggingface_hub.repocard import metadata_load

    return metadata_load(REPO_ROOT / "README.md") or {}


def front_matter(checkpoints: Sequence[ServedCheckpoint], hardware: str) -> dict[str, Any]:
    """The staged README's front matter: the repository's, plus hardware and models."""
    meta = repository_front_matter()
    # A hint for people who duplicate the Space (the hardware itself is set through the API);
    # written for the flavors the Spaces configuration reference lists, not for ZeroGPU.
    meta.pop("suggested_hardware", None)
    if hardware != DEFAULT_HARDWARE:
        meta["suggested_hardware"] = hardware
    hub = [c.source for c in checkpoints if not c.local]
    models = [s.partition("@")[0] for s in hub]
    models += [
        str(c.config.source_weights["hf_hub_id"])
        for c in checkpoints
        if c.config and c.config.source_weights.get("hf_hub_id")
    ]
    if models:
        meta["models"] = list(dict.fromkeys(models))
    # Built into the image: no download at start-up. Pinned revisions are left to the app
    # (the cache it fills at first start serves them afterwards).
    preload = [s for s in hub if "@" not in s]
    # a probe's frozen backbone: its repo (derived from the registry), file and commit
    backbones = [c.config.backbone for c in checkpoints if c.config and c.config.backbone]
    for ref in backbones:
        _, repo_id, filename = registered_hub_weights(ref.weights)
        preload.append(f"{repo_id} {filename} {ref.revision}")
    if preload:
        meta["preload_from_hub"] = list(dict.fromkeys(preload))
    if hub or backbones:
        meta["startup_duration_timeout"] = "1h"  # room for a first download of a large model
    licenses = {
        str(c.config.source_weights.get("license"))
        for c in checkpoints
        if c.config and c.config.source_weights.get("license")
    }
    if licenses - {meta.get("license")}:  # the served weights' license binds the Space too
        meta["license"] = licenses.pop() if len(licenses) == 1 else "other"
    return meta


def space_readme(
    meta: dict[str, Any],
    checkpoints: Sequence[ServedCheckpoint],
    hardware: str = DEFAULT_HARDWARE,
) -> str:
    """The Space's README: front matter, what it does, the models served (with the hardware
    each runs on), licenses."""
    from huggingface_hub import SpaceCardData

    given = {c.directory.resolve() for c in checkpoints if c.directory}
    served = [*checkpoints, *(b for b in _bundled() if b.directory.resolve() not in given)]
    rows = []
    for c in served:  # what the app serves: the checkpoints given, then the bundled models
        config = c.config
        if config is None:
            rows.append(f"| `{c.name}` | not checked before deploying | | | |")
            continue
        weights = config.source_weights or {}
        start = weights.get("name") or "none: trained from scratch"
        if weights.get("license"):
            start += f" (license {weights['license']})"
        try:
            report = load_report(c.directory) if c.directory else None
        except ReportError:
            report = None  # unreadable: said as "no report"
        figure = ((report or {}).get("overall", {}).get("balanced_accuracy") or {}).get("value")
        shown = f"{figure:.3f} on {report.get('num_images', '?')} scans" if report else "no report"
        runs_on = _runs_on(config, hardware)
        rows.append(f"| `{c.name}` | {config.architecture} | {start} | {shown} | {runs_on} |")
    yaml = SpaceCardData(**meta).to_yaml(original_order=list(meta))
    from mirage_demo.zerogpu import GPU_MIN_PARAMETERS

    return f"""---
{yaml}
---

# MIRAGE OCT demo

Classify a retinal OCT B-scan as CNV, DME, drusen or normal, and see where the model looked
(Grad-CAM and attention maps), its test report and confusion matrix. A teaching and research
tool, **not a medical device**: never use it to diagnose or treat.

## Models served

| model | architecture | starting weights | test balanced accuracy | runs on |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

The first is the default; the app's **Model** tab shows each one's full report. Models
fine-tuned from MIRAGE (Morano et al. 2025, arXiv:2506.08900) inherit its CC BY-NC-ND 4.0
license. Example scans: Kermany et al., *Cell* 2018, CC BY 4.0 (`assets/ATTRIBUTION.md`).
Code: Apache-2.0 (`LICENSE`).

On ZeroGPU, small models (under {GPU_MIN_PARAMETERS // 10**6} million parameters) run on the
Space's CPU and use no GPU quota; a MIRAGE-sized model borrows a GPU for each request, from the
visitor's daily ZeroGPU quota, and when that runs out the app runs it on the CPU and says so.

Deployed with `python -m mirage_demo.space deploy`; the models are set by the Space variable
`{ENV_CHECKPOINTS}` (comma separated: folders in this Space or Hub repo ids).
"""


def _runs_on(config: CheckpointConfig, hardware: str) -> str:
    """Where a model runs on a Space with ``hardware`` (the app's rule: mirage_demo.zerogpu)."""
    from mirage_demo.zerogpu import wants_gpu

    if hardware != DEFAULT_HARDWARE:
        return "CPU" if hardware.startswith("cpu") else "GPU"
    if wants_gpu(config):
        return "ZeroGPU (the visitor's GPU quota; the CPU once it is used up)"
    return "CPU (no GPU quota)"


def _bundled() -> list[ServedCheckpoint]:
    """The bundled demo models the app serves when no checkpoint is given (not the tiny
    MIRAGE, a pre-training checkpoint that "How it learned" reads)."""
    from mirage_demo.checkpoint import read_config

    found = []
    for directory in sorted((REPO_ROOT / "assets").iterdir()):
        if (directory / CONFIG_NAME).is_file() and not is_pretraining_checkpoint(directory):
            found.append(ServedCheckpoint(str(directory), read_config(directory), directory, True))
    found.sort(key=lambda c: c.directory.name != "demo-model")  # the app's default first
    return found


# --------------------------------------------------------------------------------------------
# Deploying


def deploy(
    repo_id: str,
    checkpoints: Sequence[str] = (),
    hardware: str = DEFAULT_HARDWARE,
    private: bool = False,
    token: str | None = None,
    api_factory: Callable[..., Any] | None = None,
    log: Callable[[str], None] = print,
    probe: str | None = None,
) -> str:
    """Check everything, stage, create or update the Space; returns its URL.

    ``api_factory(token=...)`` builds the client (default :class:`huggingface_hub.HfApi`);
    tests pass a recording stand-in. ``probe`` (e.g. ``"mirage_base"``): the app's probe on
    that backbone, fitted here if not cached, is served first; only its head is uploaded.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    check_space_id(repo_id)
    _check_hardware(hardware)
    served = check_checkpoints(with_probe(checkpoints, probe, log))
    token = token or get_token()
    if not token:
        raise DeployError(
            "no Hugging Face token: run `hf auth login` (a token with write access) or set "
            "HF_TOKEN, then deploy again"
        )
    api = (api_factory or HfApi)(token=token)
    try:
        user = api.whoami()
    except HfHubHTTPError as err:
        raise DeployError(f"the Hub refused the token: {_one_line(err)}") from err
    log(f"Signed in as {user.get('name', '?')}.")
    with tempfile.TemporaryDirectory(prefix="mirage-space-") as tmp:
        staged = stage(Path(tmp) / "space", served, hardware)
        log(f"Staged {len(staged.files)} files ({staged.size_bytes / 2**20:.1f} MiB).")
        try:
            url = _publish(api, repo_id, staged, hardware, private)
        except HfHubHTTPError as err:
            hint = ""
            if getattr(err.response, "status_code", None) == 402:
                hint = (
                    f" ({hardware} needs a paid plan; a free account can use "
                    f"--hardware {DEFAULT_HARDWARE})"
                )
            raise DeployError(
                f"the Hub refused the deployment of {repo_id}: {_one_line(err)}{hint}"
            ) from err
    return url


def with_probe(
    checkpoints: Sequence[str], probe: str | None, log: Callable[[str], None] = print
) -> list[str]:
    """``checkpoints`` with the app's probe on ``probe``'s backbone first (fitted on this
    machine if it is not cached; see :mod:`mirage_demo.bundled_probe`)."""
    if not probe:
        return list(checkpoints)
    from mirage_demo.bundled_probe import ProbeUnavailableError, bundled_probe

    try:
        return [str(bundled_probe(probe, log=log)), *checkpoints]
    except ProbeUnavailableError as err:
        raise DeployError(f"--probe {probe}: {err}") from err


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _publish(api: Any, repo_id: str, staged: StagedSpace, hardware: str, private: bool) -> str:
    """Create the Space with its hardware and variables, or set them on an existing one, and
    then upload the staged folder (mirrored: files not staged are deleted on the Space)."""
    variables = [{"key": k, "value": v} for k, v in staged.variables.items()]
    if api.repo_exists(repo_id, repo_type="space"):
        url = f"{api.endpoint}/spaces/{repo_id}"
        api.request_space_hardware(repo_id, hardware)
        for item in variables:
            api.add_space_variable(repo_id, item["key"], item["value"])
        if ENV_CHECKPOINTS not in staged.variables and ENV_CHECKPOINTS in api.get_space_variables(
            repo_id
        ):
            api.delete_space_variable(repo_id, ENV_CHECKPOINTS)
    else:
        url = api.create_repo(
            repo_id,
            repo_type="space",
            space_sdk="gradio",
            space_hardware=hardware,
            space_variables=variables or None,
            private=private,
        )
    api.upload_folder(
        repo_id=repo_id,
        repo_type="space",
        folder_path=str(staged.directory),
        commit_message="Deploy the MIRAGE OCT demo (python -m mirage_demo.space deploy)",
        delete_patterns="*",
    )
    return str(url)


def _check_hardware(hardware: str) -> None:
    from huggingface_hub import SpaceHardware

    flavors = [h.value for h in SpaceHardware]
    if hardware not in flavors:
        raise DeployError(f"unknown hardware {hardware!r}; one of: {', '.join(flavors)}")


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    """``python -m mirage_demo.space deploy REPO_ID [options]``; exit status 0, or 2 with one
    line saying what to fix."""
    parser = argparse.ArgumentParser(
        prog="python -m mirage_demo.space", description="Put the app on a Hugging Face Space."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("deploy", help="stage the app and create or update a Space")
    run.add_argument("repo_id", help="the Space: owner/name (created if it does not exist)")
    run.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="DIR_OR_HUB_ID",
        help="a checkpoint to serve, local or owner/name[@revision] (repeat; first is the "
        "default; none: the bundled demo models)",
    )
    run.add_argument(
        "--hardware",
        default=DEFAULT_HARDWARE,
        help=f"Space hardware (default {DEFAULT_HARDWARE}: ZeroGPU, free accounts; cpu-basic "
        "and the GPUs need a paid plan)",
    )
    run.add_argument(
        "--probe",
        metavar="BACKBONE",
        help="serve MIRAGE itself, first: a probe on mirage_base's (or mirage_large's) frozen "
        "features, fitted here on the app's bundled scans if not cached; the Space gets the "
        "head (kilobytes) and preloads the backbone from the Hub",
    )
    run.add_argument("--private", action="store_true", help="create the Space private")
    run.add_argument(
        "--dry-run", metavar="DIR", type=Path, help="only write the staged folder to DIR (offline)"
    )
    args = parser.parse_args(argv)
    try:
        if args.dry_run is None:
            url = deploy(
                args.repo_id, args.checkpoint, args.hardware, args.private, probe=args.probe
            )
            print(f"Space: {url} (it builds for a few minutes, then serves the app)")
            return 0
        check_space_id(args.repo_id)
        _check_hardware(args.hardware)
        served = check_checkpoints(with_probe(args.checkpoint, args.probe), offline=True)
        staged = stage(args.dry_run, served, args.hardware)
    except DeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = staged.size_bytes / 2**20
    print(f"Staged {len(staged.files)} files ({size:.1f} MiB) in {args.dry_run}")
    for key, value in staged.variables.items():
        print(f"Space variable to set: {key}={value}")
    for note in staged.notes:
        print(f"note: {note}")
    env = "".join(f"{k}={v} " for k, v in staged.variables.items())
    print(f"Try it: cd {args.dry_run} && {env}python app.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
