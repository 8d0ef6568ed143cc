import argparse

import pytest
import timm
import torch
from safetensors.torch import save_file

import mirage_demo
from mirage_demo.models import (
    _InertGlobal,
    checkpoint_filter_fn,
    configure_finetuning,
    create_classifier,
    load_mirage_state_dict,
    optimizer_param_groups,
    pretrained_source,
    set_training_mode,
)
from tests import mirage_reference as ref

BASE = dict(dim=768, depth=12, heads=12)


@pytest.fixture(scope="module")
def base_release():
    return ref.release_checkpoint(BASE["dim"], BASE["depth"])


@pytest.fixture(scope="module")
def base_model():
    return timm.create_model("mirage_base_patch32_512", num_classes=4).eval()


@pytest.mark.parametrize(
    "name, dim, depth, heads",
    [
        ("mirage_base_patch32_512", 768, 12, 12),
        ("mirage_large_patch32_512", 1024, 24, 16),
        ("mirage_tiny_patch32_512", 192, 6, 3),
    ],
)
def test_registered_architecture(name, dim, depth, heads):
    model = timm.create_model(name, num_classes=4, device="meta")
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    assert model.patch_embed.proj.kernel_size == (32, 32)
    assert model.patch_embed.proj.in_channels == 1
    assert model.patch_embed.img_size == (512, 512)
    assert model.embed_dim == dim and len(model.blocks) == depth
    assert model.blocks[0].attn.num_heads == heads
    assert model.blocks[0].attn.qkv.bias is not None
    assert model.blocks[0].norm1.eps == 1e-6 and model.norm.eps == 1e-6
    assert model.no_embed_class and model.cls_token.shape == (1, 1, dim)
    assert model.pos_embed.shape == (1, 256, dim) and not model.pos_embed.requires_grad
    assert model.global_pool == "avg" and isinstance(model.fc_norm, torch.nn.Identity)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (1, 512, 512) and cfg["interpolation"] == "bilinear"
    if name == "mirage_tiny_patch32_512":  # trained from scratch: standardised input
        assert cfg["mean"] == (0.2,) and cfg["std"] == (0.2,)
    else:  # MIRAGE's own contract: min-max only
        assert cfg["mean"] == (0.0,) and cfg["std"] == (1.0,)


def test_pretrained_cfg_names_hub_weights_and_license():
    assert pretrained_source("mirage_base_patch32_512") == {
        "hf_hub_id": "j-morano/MIRAGE-Base",
        "license": "cc-by-nc-nd-4.0",
        "paper_ids": "arXiv:2506.08900",
    }
    assert pretrained_source("mirage_large_patch32_512")["hf_hub_id"] == "j-morano/MIRAGE-Large"


@pytest.mark.parametrize("fmt", ["release", "hub"])
def test_filter_maps_every_key(fmt, base_model):
    make = ref.release_checkpoint if fmt == "release" else ref.hub_checkpoint
    checkpoint = make(BASE["dim"], BASE["depth"])
    before = {k: id(v) for k, v in checkpoint.items()}
    out = checkpoint_filter_fn(checkpoint, base_model)
    assert {k: id(v) for k, v in checkpoint.items()} == before  # input untouched
    assert set(out) == set(base_model.state_dict())
    enc = ref.encoder_weights(BASE["dim"], BASE["depth"])
    assert torch.equal(out["patch_embed.proj.weight"], enc["input_adapters.bscan.proj.weight"])
    assert torch.equal(out["cls_token"], enc["global_tokens"])
    assert torch.equal(out["blocks.11.mlp.fc2.bias"], enc["encoder.11.mlp.fc2.bias"])
    pos = enc["input_adapters.bscan.pos_emb"]
    assert torch.equal(out["pos_embed"][0, 17], pos[0, :, 1, 1])  # row-major patch order
    # the new classifier keeps the model's own initialisation
    assert torch.equal(out["head.weight"], base_model.state_dict()["head.weight"])


def test_filter_accepts_converted_state_dict(base_model):
    converted = checkpoint_filter_fn(ref.hub_checkpoint(768, 12), base_model)
    again = checkpoint_filter_fn(converted, base_model)
    assert all(torch.equal(again[k], converted[k]) for k in converted)


def test_filter_rejects_wrong_size_and_incomplete(base_model):
    with pytest.raises(ValueError, match=r"wrong shapes.*checkpoint \(1, 1, 1024\)"):
        checkpoint_filter_fn(ref.hub_checkpoint(1024, 12), base_model)
    incomplete = ref.hub_checkpoint(768, 11)
    with pytest.raises(ValueError, match=r"missing 12 keys \(e.g. blocks\.11\."):
        checkpoint_filter_fn(incomplete, base_model)
    strange = {**ref.hub_checkpoint(768, 12), "model.decoder.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unknown keys decoder.weight"):
        checkpoint_filter_fn(strange, base_model)


@pytest.mark.slow  # MIRAGE-Base forward against the reference math
def test_encoder_and_classifier_match_mirage_math(base_release):
    """timm's model with filtered weights computes MIRAGE's documented forward (float64)."""
    model = timm.create_model("mirage_base_patch32_512", num_classes=4).double().eval()
    model.load_state_dict(checkpoint_filter_fn(base_release, model))
    torch.nn.init.normal_(model.norm.weight, 1.0, 0.1)
    torch.nn.init.normal_(model.head.weight, 0.0, 0.1)
    image = torch.rand(2, 1, 512, 512, dtype=torch.float64)
    with torch.no_grad():
        tokens = model.forward_features(image)  # timm: norm applied; cls token first
        raw = model.blocks(model._pos_embed(model.patch_embed(image)))
        logits = model(image)
    expected = ref.encoder_forward(base_release["model"], image, num_heads=12)
    # MIRAGE appends its global token after the patches; timm prepends it
    assert torch.allclose(raw[:, 1:], expected[:, :-1], atol=1e-5)
    assert torch.allclose(raw[:, 0], expected[:, -1], atol=1e-5)
    expected_logits = ref.classifier_forward(
        expected, model.norm.weight, model.norm.bias, model.head.weight, model.head.bias
    )
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    assert tokens.shape == (2, 257, 768)


@pytest.mark.slow  # MIRAGE-Base forward against the reference math
def test_float32_encoder_matches_to_1e4(base_release):
    model = timm.create_model("mirage_base_patch32_512", num_classes=0).eval()
    model.load_state_dict(checkpoint_filter_fn(base_release, model))
    image = torch.rand(1, 1, 512, 512)
    with torch.no_grad():
        raw = model.blocks(model._pos_embed(model.patch_embed(image)))
    expected = ref.encoder_forward(base_release["model"], image.double(), num_heads=12)
    assert torch.allclose(raw[:, 1:].double(), expected[:, :-1], atol=1e-4)


@pytest.mark.slow  # full-size MIRAGE-Base models
def test_pretrained_from_local_release_pth_and_hub_safetensors(tmp_path, base_release):
    pth = tmp_path / "MIRAGE-Base.pth"
    torch.save(base_release, pth)
    hub = tmp_path / "model.safetensors"
    save_file(ref.hub_checkpoint(768, 12), str(hub))
    models = [
        create_classifier("mirage_base_patch32_512", num_classes=4, weights=path)
        for path in (pth, hub)
    ]
    for name in ("blocks.5.attn.qkv.weight", "pos_embed", "cls_token"):
        assert torch.equal(models[0].state_dict()[name], models[1].state_dict()[name])
    assert models[0].head.weight.shape == (4, 768)


def test_release_pth_is_read_without_unpickling_other_objects(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    checkpoint = {"model": {"x": torch.zeros(1)}, "args": argparse.Namespace(a=Evil())}
    path = tmp_path / "evil.pth"
    torch.save(checkpoint, path)
    loaded = load_mirage_state_dict(path)  # print is not on torch's allow-list: left inert
    assert torch.equal(loaded["model"]["x"], torch.zeros(1))
    assert isinstance(loaded["args"].a, _InertGlobal)
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.slow  # full-size MIRAGE-Base models
def test_pretrained_true_downloads_through_timm_from_hub_cache(tmp_path, hub_cache):
    weights = tmp_path / "model.safetensors"
    save_file(ref.hub_checkpoint(768, 12, seed=3), str(weights))
    hub_cache("j-morano/MIRAGE-Base", {"model.safetensors": weights})
    model = timm.create_model("mirage_base_patch32_512", pretrained=True, num_classes=4)
    expected = ref.encoder_weights(768, 12, seed=3)["encoder.3.attn.proj.weight"]
    assert torch.equal(model.blocks[3].attn.proj.weight, expected)
    assert model.head.weight.shape == (4, 768)


def test_position_embedding_resampled_for_other_input_size():
    model = timm.create_model("mirage_base_patch32_512", num_classes=2, img_size=256)
    out = checkpoint_filter_fn(ref.hub_checkpoint(768, 12), model)
    assert out["pos_embed"].shape == (1, 64, 768)
    assert model.pretrained_cfg["input_size"] == (1, 256, 256)


def test_token_pooling_is_an_option():
    torch.manual_seed(0)
    avg = timm.create_model("mirage_tiny_patch32_512", num_classes=3, img_size=128).eval()
    tok = timm.create_model(
        "mirage_tiny_patch32_512", num_classes=3, img_size=128, global_pool="token"
    ).eval()
    tok.load_state_dict(avg.state_dict())
    x = torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        feats = avg.forward_features(x)
        assert torch.allclose(tok(x), avg.head(feats[:, 0]), atol=1e-6)
        assert torch.allclose(avg(x), avg.head(feats[:, 1:].mean(1)), atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        timm.create_model("mirage_tiny_patch32_512", global_pool="max")


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "vit_tiny_patch16_224"])
def test_baselines_take_one_channel(name):
    model = create_classifier(name, num_classes=4).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 224, 224)).shape == (1, 4)
    with pytest.raises(ValueError, match="unknown architecture"):
        create_classifier("not_a_model", num_classes=4)


def test_finetuning_modes_and_param_groups():
    model = timm.create_model("mirage_tiny_patch32_512", num_classes=4)
    configure_finetuning(model, "linear")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "norm.weight",
        "norm.bias",
        "head.weight",
        "head.bias",
    }
    configure_finetuning(model, "last-k", last_k=2)
    trainable = {
        n.split(".")[1]
        for n, p in model.named_parameters()
        if p.requires_grad and n.startswith("blocks.")
    }
    assert trainable == {"4", "5"}
    assert not model.patch_embed.proj.weight.requires_grad
    configure_finetuning(model, "full")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed"}  # MIRAGE's sin-cos table stays fixed

    groups = optimizer_param_groups(model, weight_decay=0.01, layer_decay=0.75)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ("cls_token", "norm.weight", "blocks.0.norm1.bias", "head.bias"):
        assert by_param[id(named[name])]["weight_decay"] == 0.0, name
    assert by_param[id(named["blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.01
    scales = [by_param[id(named[f"blocks.{i}.mlp.fc1.weight"])]["lr_scale"] for i in range(6)]
    assert scales == sorted(scales) and scales[0] < scales[-1] < 1.0
    assert by_param[id(named["head.weight"])]["lr_scale"] == 1.0
    assert id(named["pos_embed"]) not in by_param
    with pytest.raises(ValueError, match="fine-tuning mode"):
        configure_finetuning(model, "half")


def test_converter_writes_loadable_safetensors(tmp_path, base_release):
    from mirage_demo.convert import convert

    torch.save(base_release, tmp_path / "MIRAGE-Base.pth")
    count = convert(tmp_path / "MIRAGE-Base.pth", tmp_path / "MIRAGE-Base.safetensors")
    assert count == len(base_release["model"])
    model = create_classifier(
        "mirage_base_patch32_512", num_classes=2, weights=tmp_path / "MIRAGE-Base.safetensors"
    )
    expected = base_release["model"]["encoder.7.norm2.weight"]
    assert torch.equal(model.blocks[7].norm2.weight, expected)


def test_frozen_parts_train_in_eval_mode():
    model = timm.create_model("resnet18", num_classes=4, in_chans=1)
    configure_finetuning(model, "linear")
    set_training_mode(model)
    assert model.training and model.fc.training
    assert not model.bn1.training and not model.layer4[1].bn2.training
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 1, 64, 64)).sum().backward()
    assert torch.equal(model.bn1.running_mean, before)  # frozen statistics stay put
    configure_finetuning(model, "full")
    set_training_mode(model)
    assert all(m.training for m in model.modules())


def test_the_package_exports_what_the_readme_teaches():
    from mirage_demo.checkpoint import load_checkpoint
    from mirage_demo.inference import Predictor

    assert set(mirage_demo.__all__) - {"__version__"} == set(mirage_demo._EXPORTS)
    assert mirage_demo.Predictor is Predictor and mirage_demo.load_checkpoint is load_checkpoint
    for name in mirage_demo.__all__:
        assert getattr(mirage_demo, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'predictor'"):
        mirage_demo.predictor  # noqa: B018


def test_weights_of_a_one_channel_checkpoint_load_without_stem_warnings(tmp_path, caplog):
    """timm is told how many channels the file's stem holds (read from its header), so a
    one-channel checkpoint of this project loads as is, with no misleading warning."""
    source = create_classifier("resnet18", num_classes=4)
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    with caplog.at_level("WARNING"):
        loaded = create_classifier("resnet18", 4, weights=tmp_path / "model.safetensors")
    assert not [r for r in caplog.records if "conv1" in r.getMessage()]
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)
