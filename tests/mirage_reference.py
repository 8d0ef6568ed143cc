"""MIRAGE's documented math, written out independently of timm, for equivalence tests.

Synthetic checkpoints with MIRAGE's key names and shapes (random weights), in the two published
formats, and a reference forward: patch convolution, fixed sin-cos position embedding on the
patches only, the global token appended after the patches, pre-norm transformer blocks
(LayerNorm eps 1e-6), then MIRAGE's classifier (LayerNorm on every token, mean over the patch
tokens, linear).
"""

from __future__ import annotations

import argparse
import math
import pathlib

import torch
import torch.nn.functional as F


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """A (1, dim, grid, grid) MoCo-v3 style sin-cos table, as MIRAGE stores it."""
    coords = torch.arange(grid, dtype=torch.float64)
    gh, gw = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    out_h, out_w = gh.reshape(-1, 1) * omega, gw.reshape(-1, 1) * omega
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return table.T.reshape(1, dim, grid, grid).float().contiguous()


def encoder_weights(dim: int, depth: int, grid: int = 16, patch: int = 32, seed: int = 0) -> dict:
    """MIRAGE encoder tensors (unprefixed names), random but well scaled."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "input_adapters.bscan.proj.weight": rnd(dim, 1, patch, patch),
        "input_adapters.bscan.proj.bias": rnd(dim),
        "input_adapters.bscan.pos_emb": sincos_2d(dim, grid),
        "global_tokens": rnd(1, 1, dim, std=0.5),
    }
    for i in range(depth):
        p = f"encoder.{i}."
        sd.update(
            {
                p + "norm1.weight": 1 + rnd(dim, std=0.1),
                p + "norm1.bias": rnd(dim),
                p + "attn.qkv.weight": rnd(3 * dim, dim, std=dim**-0.5),
                p + "attn.qkv.bias": rnd(3 * dim),
                p + "attn.proj.weight": rnd(dim, dim, std=dim**-0.5),
                p + "attn.proj.bias": rnd(dim),
                p + "norm2.weight": 1 + rnd(dim, std=0.1),
                p + "norm2.bias": rnd(dim),
                p + "mlp.fc1.weight": rnd(4 * dim, dim, std=dim**-0.5),
                p + "mlp.fc1.bias": rnd(4 * dim),
                p + "mlp.fc2.weight": rnd(dim, 4 * dim, std=(4 * dim) ** -0.5),
                p + "mlp.fc2.bias": rnd(dim),
            }
        )
    return sd


def release_checkpoint(dim: int, depth: int, grid: int = 16, seed: int = 0) -> dict:
    """The GitHub release ``.pth`` layout: ``{"model": ..., "args": Namespace}`` with the
    ``bscan``/``slo``/``bscanlayermap`` input adapters and the pre-training decoders."""
    sd = encoder_weights(dim, depth, grid, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name in ("slo",):
        sd[f"input_adapters.{name}.proj.weight"] = torch.randn(dim, 1, 32, 32, generator=g)
        sd[f"input_adapters.{name}.proj.bias"] = torch.randn(dim, generator=g)
        sd[f"input_adapters.{name}.pos_emb"] = sincos_2d(dim, grid)
    sd["input_adapters.bscanlayermap.pos_emb"] = sincos_2d(dim, grid)
    sd["input_adapters.bscanlayermap.class_emb.weight"] = torch.randn(13, 64, generator=g)
    sd["input_adapters.bscanlayermap.proj.weight"] = torch.randn(dim, 64, 8, 8, generator=g)
    sd["input_adapters.bscanlayermap.proj.bias"] = torch.randn(dim, generator=g)
    for task in ("bscan", "slo", "bscanlayermap"):
        sd[f"output_adapters.{task}.task_embeddings.{task}"] = torch.randn(1, 1, 256, generator=g)
        sd[f"output_adapters.{task}.proj_context.weight"] = torch.randn(256, dim, generator=g)
        sd[f"output_adapters.{task}.decoder.0.attn.qkv.weight"] = torch.randn(768, 256, generator=g)
    args = argparse.Namespace(
        model="pretrain_mirage_base",
        input_size=512,
        patch_size=32,
        num_global_tokens=1,
        in_domains=["bscan", "slo", "bscanlayermap"],
        output_dir=pathlib.PurePosixPath("/runs/x"),
    )
    return {"model": sd, "args": args, "epoch": 1599}


def hub_checkpoint(dim: int, depth: int, grid: int = 16, seed: int = 0) -> dict:
    """The Hub safetensors layout: every key prefixed ``model.``, ``bscan`` and ``slo`` adapters."""
    sd = encoder_weights(dim, depth, grid, seed=seed)
    g = torch.Generator().manual_seed(seed + 2)
    sd["input_adapters.slo.proj.weight"] = torch.randn(dim, 1, 32, 32, generator=g)
    sd["input_adapters.slo.proj.bias"] = torch.randn(dim, generator=g)
    sd["input_adapters.slo.pos_emb"] = sincos_2d(dim, grid)
    return {"model." + k: v for k, v in sd.items()}


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * w + b


def encoder_forward(sd: dict, image: torch.Tensor, num_heads: int) -> torch.Tensor:
    """MIRAGE's encoder tokens: ``(B, patches + 1, D)`` with the global token last."""
    w = {k: v.to(image.dtype) for k, v in sd.items()}
    patch = w["input_adapters.bscan.proj.weight"].shape[-1]
    x = F.conv2d(
        image,
        w["input_adapters.bscan.proj.weight"],
        w["input_adapters.bscan.proj.bias"],
        stride=patch,
    )
    batch, dim = x.shape[:2]
    tokens = x.flatten(2).transpose(1, 2)
    tokens = tokens + w["input_adapters.bscan.pos_emb"].flatten(2).transpose(1, 2)
    tokens = torch.cat([tokens, w["global_tokens"].expand(batch, -1, -1)], dim=1)
    head_dim = dim // num_heads
    depth = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("encoder."))
    for i in range(depth):
        p = f"encoder.{i}."
        h = _layer_norm(tokens, w[p + "norm1.weight"], w[p + "norm1.bias"])
        qkv = h @ w[p + "attn.qkv.weight"].T + w[p + "attn.qkv.bias"]
        q, k, v = qkv.reshape(batch, -1, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(batch, -1, dim)
        tokens = tokens + h @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        h = _layer_norm(tokens, w[p + "norm2.weight"], w[p + "norm2.bias"])
        h = F.gelu(h @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"])
        tokens = tokens + h @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
    return tokens


def classifier_forward(tokens: torch.Tensor, norm_w, norm_b, head_w, head_b) -> torch.Tensor:
    """MIRAGE's classifier: LayerNorm on every token, mean over patch tokens, linear."""
    tokens = _layer_norm(tokens, norm_w.to(tokens.dtype), norm_b.to(tokens.dtype))
    return tokens[:, :-1].mean(1) @ head_w.to(tokens.dtype).T + head_b.to(tokens.dtype)
