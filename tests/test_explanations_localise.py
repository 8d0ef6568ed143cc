"""Do the heat maps point at the lesion, and do they depend on what the model learnt?

Models trained on :func:`tests.synthetic_oct.lesion_scan` (a bright blob above the retina is
class LESION) must, for scans with a lesion, put more heat near its centre than elsewhere: one
test per method family. Gradient CAMs are checked on a small CNN (on the tiny 2-block ViT they
do not reliably point at the lesion: its evidence moves between tokens in the last block's
attention); attention rollout on a ViT that classifies from its global token, whose attention
is then what the classifier reads. The last block's attention alone (``attention``) is not
asserted: on this 2-block ViT it points at the lesion for some initialisations only (seeds 0-2
on torch 2.8 and 2.14: positive margins for 50-92% of the scans, mean -0.01 to 0.26), while
rollout did for all six (83-100%, mean 0.17-0.26). The sanity check of Adebayo et al. (2018):
the maps change when the weights are randomised.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from torch import nn

import mirage_demo  # noqa: F401  (registers the mirage_* models)
from mirage_demo.data import Preprocessing
from mirage_demo.inference import Predictor
from tests.synthetic_oct import CLASSES, lesion_margin, lesion_scan, train_on_lesions

pytestmark = pytest.mark.usefixtures("one_thread")

GRADIENT_CAMS = ("gradcam", "gradcam++", "hirescam", "layercam")
SCANS = [lesion_scan(1, 7000 + seed) for seed in range(12)]


def small_cnn() -> nn.Module:
    """Three stride-2 convolutions (a 16x16 map at 128 px), global average pool, linear."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, 2, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 2),
    )


@pytest.fixture(scope="module")
def cnn() -> Predictor:
    preprocessing = Preprocessing(input_size=(128, 128))
    torch.manual_seed(0)
    model = train_on_lesions(small_cnn(), preprocessing, steps=80, lr=3e-3)
    return Predictor(model, CLASSES, preprocessing)


@pytest.fixture(scope="module")
def vit() -> Predictor:
    torch.manual_seed(0)
    model = timm.create_model(
        "mirage_tiny_patch32_512",
        num_classes=2,
        img_size=128,
        patch_size=16,  # an 8x8 grid
        depth=2,
        global_pool="token",
    )
    preprocessing = Preprocessing.from_model(model)
    # lr 1e-3, 240 steps: at 2e-3 and 160 steps seeds 0-3 learnt the lesion (>= 0.9) 2-4 times
    # depending on the machine's CPU kernels (seed 0: 0.65 on an AVX512 machine, torch 2.14.1);
    # at 1e-3 and 240 steps all four did there (0.95-1.0, rollout positive on 12 of 12 scans)
    model = train_on_lesions(model, preprocessing, steps=240, lr=1e-3)
    return Predictor(model, CLASSES, preprocessing)


def margins(predictor: Predictor, method: str) -> np.ndarray:
    return np.array(
        [
            lesion_margin(predictor.explain(scan, method, target="LESION").heatmap, centre)
            for scan, centre in SCANS
        ]
    )


def accuracy(predictor: Predictor) -> float:
    labels = [i % 2 for i in range(20)]
    images = [lesion_scan(label, 5000 + i)[0] for i, label in enumerate(labels)]
    predicted = [p.index for p in predictor.predict_batch(images)]
    return float(np.mean(np.array(predicted) == labels))


@pytest.mark.parametrize("method", GRADIENT_CAMS)
def test_gradient_cams_point_at_the_lesion(cnn, method):
    assert accuracy(cnn) >= 0.9
    found = margins(cnn, method)
    assert found.min() > 0.05 and found.mean() > 0.1, found.round(3)


@pytest.mark.parametrize("model", ["cnn", pytest.param("vit", marks=pytest.mark.slow)])
def test_eigencam_points_at_the_lesion(model, request):
    predictor = request.getfixturevalue(model)
    found = margins(predictor, "eigencam")
    assert (found > 0).mean() >= 0.75 and found.mean() > 0.1, found.round(3)


@pytest.mark.slow  # trains an 8x8-grid ViT (~30 s on an idle core)
def test_attention_rollout_points_at_the_lesion(vit):
    assert accuracy(vit) >= 0.9
    found = margins(vit, "rollout")
    assert (found > 0).mean() >= 2 / 3 and found.mean() > 0.05, found.round(3)


@pytest.mark.parametrize("method", GRADIENT_CAMS)
def test_gradient_maps_change_when_the_weights_are_randomised(cnn, method):
    """Adebayo et al. 2018: a map that survives randomising the model explains nothing."""
    random_model = copy.deepcopy(cnn.model)
    torch.manual_seed(1)
    for module in random_model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    randomised = Predictor(random_model, CLASSES, cnn.preprocessing)
    for scan, _ in SCANS[:4]:
        trained = cnn.explain(scan, method, target="LESION").heatmap
        random = randomised.explain(scan, method, target="LESION").heatmap
        correlation = np.corrcoef(trained.ravel(), random.ravel())[0, 1]
        assert correlation < 0.5 and np.abs(trained - random).mean() > 0.1, correlation
