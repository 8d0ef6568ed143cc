"""ZeroGPU on a Space, exercised on the CPU: ``spaces.GPU`` wrapping, a refused call falling back
to the CPU, the GPU time each handler reserves, and which models ask for a GPU at all.

:class:`StandInZeroGPU` does what ``spaces.GPU`` does minus the GPU (also used by
``benchmarks/zerogpu_cost.py``); the staged Space's boot under ZeroGPU's variables is in
test_space.py.
"""

from __future__ import annotations

import pickle
import zipfile

import gradio as gr
import pytest
import spaces
from gradio_client import Client, handle_file
from spaces.zero.gradio import error as zerogpu_error

from mirage_demo import space, zerogpu
from mirage_demo.inference import Predictor
from mirage_demo.ui import LAUNCH_OPTIONS, ModelChoice, ModelRegistry, available_models, build_app
from mirage_demo.ui import app as ui_app
from mirage_demo.ui.batch import batch_gpu_seconds
from mirage_demo.ui.context import PREDICTED
from mirage_demo.ui.evaluate import evaluate_gpu_seconds
from tests.test_app import CLASSES, free_port, tiny_checkpoint
from tests.test_space import ROOT, SCAN


def test_spaces_gpu_is_the_identity_off_zerogpu():
    def work(x):
        return x

    assert not zerogpu.ZERO_GPU
    assert spaces.GPU(duration=30)(work) is work  # the real package, as installed
    assert zerogpu.gpu_task(duration=30)(work) is work
    assert zerogpu.resolve_device("auto") == "cpu"  # no CUDA here
    assert zerogpu.resolve_device("cuda") == "cuda"


class StandInZeroGPU:
    """What ``spaces.GPU`` does on ZeroGPU, minus the GPU: arguments and results are pickled
    across (the real one runs the function in a forked worker), ``duration`` is evaluated with
    the call's arguments; ``refuse`` raises the error ``spaces`` raises when quota runs out."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.calls: list[tuple[str, int]] = []

    def __call__(self, duration):
        def decorate(fn):
            def on_gpu(*args, **kwargs):
                seconds = duration(*args, **kwargs) if callable(duration) else duration
                self.calls.append((fn.__name__, seconds))
                if self.refuse:
                    raise zerogpu_error(
                        "ZeroGPU quota exceeded", "You have exceeded your free GPU quota"
                    )
                args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
                return pickle.loads(pickle.dumps(fn(*args, **kwargs)))

            return on_gpu

        return decorate


def test_refused_gpu_call_runs_on_the_cpu_and_says_so():
    gpu = StandInZeroGPU(refuse=True)

    @zerogpu.gpu_task(duration=30, gpu=gpu)
    def where(device):
        return zerogpu.serving_device(device)

    with pytest.warns(UserWarning, match="used up"):
        assert where("cuda") == "cpu"
    assert gpu.calls == [("where", 30)]
    assert where.__name__ == "where"

    @zerogpu.gpu_task(duration=30, gpu=StandInZeroGPU())
    def granted(device):
        return zerogpu.serving_device(device)

    assert granted("cuda") == "cuda"


def test_errors_of_the_task_itself_are_not_retried_on_cpu():
    runs = []

    @zerogpu.gpu_task(duration=30, gpu=StandInZeroGPU())
    def broken():
        runs.append(1)
        raise gr.Error("Could not read scan.png")

    with pytest.raises(gr.Error, match="Could not read"):
        broken()
    assert runs == [1]
    assert not zerogpu.is_zerogpu_refusal(gr.Error("x", title="ZeroGPU worker error"))


def test_batch_reserves_gpu_time_by_size(tmp_path):
    archive = tmp_path / "scans.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(40):
            zf.writestr(f"scan{i}.png", b"x")
    assert batch_gpu_seconds([str(ROOT / SCAN)]) == 10
    assert batch_gpu_seconds([str(archive), str(ROOT / SCAN)]) == 20  # 10 + 0.25 x 41
    assert batch_gpu_seconds([str(archive)] * 20) == 120  # capped
    assert evaluate_gpu_seconds([str(archive)]) == 30  # 10 + 0.25 x 40 + 10 for the report


@pytest.mark.parametrize("zero_gpu", [True, False], ids=["zerogpu", "elsewhere"])
def test_models_are_placed_at_start_up_on_zerogpu(tmp_path, monkeypatch, zero_gpu):
    """On ZeroGPU every model is loaded (onto emulated CUDA) before the app is built; elsewhere
    each loads on first use."""
    loads: list[str] = []
    real = Predictor.from_pretrained.__func__

    def counting(cls, source, device="cpu", **kwargs):
        loads.append(str(source))
        return real(cls, source, device=device, **kwargs)

    def stop_before_serving(registry, **options):
        raise SystemExit(len(loads))

    monkeypatch.setattr(Predictor, "from_pretrained", classmethod(counting))
    monkeypatch.setattr(ui_app, "build_app", stop_before_serving)
    monkeypatch.setattr(ui_app, "ZERO_GPU", zero_gpu)
    a, b = tiny_checkpoint(tmp_path / "a", report=False), tiny_checkpoint(tmp_path / "b", 1, False)
    with pytest.raises(SystemExit) as stopped:
        ui_app.main(["--checkpoint", str(a), "--checkpoint", str(b)])
    every = len(available_models([str(a), str(b)]))  # with the bundled ones
    assert every >= 2
    assert stopped.value.code == (every if zero_gpu else 0)


@pytest.mark.parametrize("refuse", [False, True], ids=["gpu-granted", "quota-exhausted"])
def test_app_handlers_run_through_zerogpu(tmp_path, monkeypatch, refuse):
    """The app's model-running endpoints go through spaces.GPU with picklable arguments, and
    still answer when ZeroGPU refuses (then on the CPU)."""
    gpu = StandInZeroGPU(refuse=refuse)
    monkeypatch.setattr(spaces, "GPU", gpu)
    registry = ModelRegistry([ModelChoice("tiny", str(tiny_checkpoint(tmp_path / "m")))])
    demo = build_app(registry)
    demo.queue()
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_OPTIONS)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        label, info = client.predict(handle_file(str(ROOT / SCAN)), api_name="/predict")
        table, _, _ = client.predict([handle_file(str(ROOT / SCAN))], api_name="/batch")
    finally:
        demo.close()
    assert label["label"] in CLASSES and "on CPU" in info
    assert table["data"][0][0] == SCAN.name
    assert [name for name, _ in gpu.calls] == ["on_predict", "on_batch"]
    assert gpu.calls[0][1] == 10 and gpu.calls[1][1] == 10  # one scan; a batch of one


@pytest.mark.parametrize(
    ("architecture", "kwargs", "gpu"),
    [
        ("assets/demo-model", None, False),  # the bundled ResNet-18: 11.2 M parameters
        ("assets/demo-vit", None, False),  # the bundled tiny ViT: 2.9 M
        ("mirage_base_patch32_512", {}, True),  # 86 M
        ("mirage_large_patch32_512", {}, True),  # 303 M
        # a linear probe over MIRAGE-Base: its config declares the whole architecture
        (
            "mirage_base_patch32_512",
            {"source_weights": {"hf_hub_id": "j-morano/MIRAGE-Base"}},
            True,
        ),
        ("resnet50", {}, False),  # 23.5 M: small enough for the CPU
        ("vit_base_patch16_224", {}, True),  # 86 M, not MIRAGE: its size decides
    ],
)
def test_models_use_zerogpu_by_the_size_their_config_declares(architecture, kwargs, gpu):
    from mirage_demo.checkpoint import CheckpointConfig, read_config

    if kwargs is None:
        config = read_config(ROOT / architecture)
    else:
        config = CheckpointConfig(architecture, list(CLASSES), **kwargs)
    assert zerogpu.wants_gpu(config) is gpu
    # the Space's card says so
    assert space._runs_on(config, "zero-a10g").startswith("ZeroGPU") is gpu
    assert space._runs_on(config, "cpu-upgrade") == "CPU"
    assert (zerogpu.parameter_count(config) >= 30_000_000) is gpu


@pytest.mark.parametrize("refuse", [False, True], ids=["gpu-granted", "quota-exhausted"])
def test_small_models_never_ask_zerogpu(tmp_path, monkeypatch, refuse):
    """On ZeroGPU (``small_on_cpu``) a small model's calls run here on the CPU: no spaces.GPU
    call, no quota reserved; a MIRAGE-sized one (here: above a lowered threshold)
    still goes through ZeroGPU."""
    gpu = StandInZeroGPU(refuse=refuse)
    monkeypatch.setattr(spaces, "GPU", gpu)
    monkeypatch.setattr(zerogpu, "GPU_MIN_PARAMETERS", 5_000_000)  # the ResNet-18 counts as big
    tiny = str(tiny_checkpoint(tmp_path / "m"))
    big = str(ROOT / "assets" / "demo-model")
    registry = ModelRegistry(
        [ModelChoice("tiny", tiny), ModelChoice("big", big)], small_on_cpu=True
    )
    demo = build_app(registry)
    demo.queue()
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_OPTIONS)
    scan = handle_file(str(ROOT / SCAN))
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        small = client.predict(scan, "tiny", api_name="/predict")
        client.predict(scan, "tiny", "gradcam", PREDICTED, 0.5, api_name="/explain")
        client.predict([scan], "tiny", api_name="/batch")
        assert gpu.calls == []  # the small model never reached spaces.GPU
        large = client.predict(scan, "big", api_name="/predict")
    finally:
        demo.close()
    assert "on CPU" in small[1] and small[0]["label"] in CLASSES
    assert gpu.calls == [("on_predict", 10)]
    assert large[0]["label"] in CLASSES
    assert not registry.on_cpu("big") and registry.on_cpu("tiny")
