"""The benchmarks still call today's code: each runs one small round (its figures unchecked).

A benchmark calls the app's handlers and the library directly, so a changed signature breaks
it without breaking any other test (``zerogpu_cost.py`` went a session calling ``/predict``
one argument short).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import spaces

ROOT = Path(__file__).resolve().parent.parent


def benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # builds the app four times (~20 s)
def test_zerogpu_cost_runs_each_call_both_ways(monkeypatch, capsys):
    zerogpu_cost = benchmark("zerogpu_cost")
    monkeypatch.setattr(spaces, "GPU", spaces.GPU)  # small_models swaps in the stand-in
    monkeypatch.setattr(zerogpu_cost, "BUNDLED", {"demo-model": ROOT / "assets/demo-model"})
    zerogpu_cost.small_models(rounds=1)
    zerogpu_cost.mirage_calls(["tiny"], batch=2)  # MIRAGE's calls, on its tiny variant
    table = capsys.readouterr().out
    for row in ("| demo-model | /predict |", "| demo-model | /explain |"):
        assert row in table
    for endpoint in ("/predict", "/explain", "/compare", "/batch of 2"):
        assert f"| tiny | 3 M | {endpoint} |" in table
    assert "Stand-in calls recorded: 4" in table  # 2 endpoints x (warm-up + 1 round)


@pytest.mark.slow  # the Compare grid on a few real scans (~30 s)
def test_faithfulness_and_grid_timing_run_on_bundled_scans(capsys):
    faithfulness = benchmark("faithfulness")
    [result] = faithfulness.main([str(ROOT / "assets/demo-vit"), "--per-class", "1"])
    assert len(result["scans"]) == 4 and "best - worst distinct method" in capsys.readouterr().out
    inference = benchmark("inference")
    predictor = inference.Predictor.from_pretrained(ROOT / "assets/demo-vit")
    timed = inference.grid_times(predictor, ROOT / "assets/demo-vit", 2)
    assert len(timed["grid_s"]) == 2 and "Compare grid on 2 bundled test scans" in (
        capsys.readouterr().out
    )
