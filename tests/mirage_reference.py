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


def encoder_forward(
    sd: dict, image: torch.Tensor, num_heads: int, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """MIRAGE's encoder tokens: ``(B, patches + 1, D)`` with the global token last (``keep``:
    the indices of the patches given to the encoder, all by default)."""
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
    if keep is not None:
        tokens = tokens[:, keep]
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


# ---------------------------------------------------------------------------------------------
# The pre-training model: MIRAGE's release layout with its three decoders, and their math

RELEASE_TASKS = {"bscan": (1, 32), "slo": (1, 32), "bscanlayermap": (13, 8)}  # channels, patch


def _decoder_weights(g, enc_dim: int, dim: int, depth: int, channels: int, patch: int) -> dict:
    """One output adapter's tensors (unprefixed), random but well scaled."""

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd = {f"task_embeddings.{t}": rnd(1, 1, dim, std=0.3) for t in RELEASE_TASKS}
    sd["mask_token"] = rnd(1, 1, dim, std=0.3)
    sd["pos_emb"] = sincos_2d(dim, 16)
    for name, rows, cols in (("decoder.q", dim, dim), ("decoder.kv", 2 * dim, dim)):
        sd[name + ".weight"], sd[name + ".bias"] = rnd(rows, cols, std=cols**-0.5), rnd(rows)
    sd["decoder.proj.weight"], sd["decoder.proj.bias"] = rnd(dim, dim, std=dim**-0.5), rnd(dim)
    for norm in ("context_norm", "query_norm", "out_norm"):
        sd[norm + ".weight"], sd[norm + ".bias"] = 1 + rnd(dim, std=0.1), rnd(dim)
    sd["mlp.fc1.weight"], sd["mlp.fc1.bias"] = rnd(4 * dim, dim, std=dim**-0.5), rnd(4 * dim)
    sd["mlp.fc2.weight"], sd["mlp.fc2.bias"] = rnd(dim, 4 * dim, std=(4 * dim) ** -0.5), rnd(dim)
    for i in range(depth):
        block = encoder_weights(dim, 1, seed=int(torch.randint(0, 10**6, (1,), generator=g)))
        sd.update(
            {
                f"decoder_transformer.{i}." + k[len("encoder.0.") :]: v
                for k, v in block.items()
                if k.startswith("encoder.0.")
            }
        )
    sd["out_proj.weight"] = rnd(channels * patch * patch, dim, std=dim**-0.5)
    sd["out_proj.bias"] = rnd(channels * patch * patch)
    sd["proj_context.weight"], sd["proj_context.bias"] = (
        rnd(dim, enc_dim, std=enc_dim**-0.5),
        rnd(dim),
    )
    return sd


def full_release_checkpoint(
    dim: int, depth: int, decoder_dim: int = 256, decoder_depth: int = 2, seed: int = 0
) -> dict:
    """A complete release ``.pth`` dictionary as ``run_pretraining.py`` writes it (all input
    adapters, the three output adapters, ``args`` of plain values), random weights."""
    sd = encoder_weights(dim, depth, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    sd["input_adapters.slo.proj.weight"] = torch.randn(dim, 1, 32, 32, generator=g) * 0.02
    sd["input_adapters.slo.proj.bias"] = torch.randn(dim, generator=g) * 0.02
    sd["input_adapters.slo.pos_emb"] = sincos_2d(dim, 16)
    sd["input_adapters.bscanlayermap.pos_emb"] = sincos_2d(dim, 16)
    sd["input_adapters.bscanlayermap.class_emb.weight"] = torch.randn(13, 64, generator=g) * 0.02
    sd["input_adapters.bscanlayermap.proj.weight"] = torch.randn(dim, 64, 8, 8, generator=g) * 0.02
    sd["input_adapters.bscanlayermap.proj.bias"] = torch.randn(dim, generator=g) * 0.02
    for task, (channels, patch) in RELEASE_TASKS.items():
        tensors = _decoder_weights(g, dim, decoder_dim, decoder_depth, channels, patch)
        sd.update({f"output_adapters.{task}.{k}": v for k, v in tensors.items()})
    size = {"bscan": [512, 512], "slo": [512, 512], "bscanlayermap": [128, 128]}
    patch = {"bscan": [32, 32], "slo": [32, 32], "bscanlayermap": [8, 8]}
    args = argparse.Namespace(
        model="miragepre_large" if dim == 1024 else "miragepre_base",
        in_domains=list(RELEASE_TASKS),
        out_domains=list(RELEASE_TASKS),
        input_size=size,
        patch_size=patch,
        grid_sizes={k: [16, 16] for k in RELEASE_TASKS},
        num_global_tokens=1,
        decoder_dim=decoder_dim,
        decoder_depth=decoder_depth,
        decoder_num_heads=8,
        decoder_use_task_queries=True,
        decoder_use_xattn=True,
        drop_path=0.0,
        output_dir="/runs/MIRAGEBaseFM",
    )
    return {"model": sd, "args": args, "epoch": 1599}


def masked_encoder_forward(sd: dict, image: torch.Tensor, visible: torch.Tensor, heads: int):
    """The encoder on the visible patches only (boolean ``visible`` of one image, (256,)),
    global token last: MIRAGE's ``ids_keep`` gather written out."""
    return encoder_forward(sd, image, heads, keep=torch.nonzero(visible).flatten())


def _attention(q, k, v, heads):
    batch, n, dim = q.shape
    split = lambda t: t.reshape(batch, t.shape[1], heads, dim // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // heads), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(batch, n, dim)


def decoder_forward(
    w: dict,
    encoded: torch.Tensor,
    visible_all: torch.Tensor,
    task: str,
    tasks: list[str],
    heads: int = 8,
) -> torch.Tensor:
    """One output adapter, as MIRAGE's code does it: project, append mask tokens, unshuffle
    with ``ids_restore``, add task and position embeddings, take the task's queries, keep the
    visible context (``ids_keep``) plus the global token, cross-attention, MLP, blocks, pixels."""
    w = {k: v.to(encoded.dtype) for k, v in w.items()}
    lin = lambda x, name: x @ w[name + ".weight"].T + w[name + ".bias"]  # noqa: E731
    ln = lambda x, name: _layer_norm(x, w[name + ".weight"], w[name + ".bias"])  # noqa: E731
    context = lin(encoded, "proj_context")
    batch, dim = context.shape[0], context.shape[-1]
    tokens, global_token = context[:, :-1], context[:, -1:]
    ids_shuffle = torch.argsort((~visible_all).long(), stable=True)
    ids_restore, ids_keep = torch.argsort(ids_shuffle), ids_shuffle[: int(visible_all.sum())]
    masks = w["mask_token"].expand(batch, len(visible_all) - tokens.shape[1], dim)
    full = torch.cat([tokens, masks], 1)[:, ids_restore]
    pos = w["pos_emb"].flatten(2).transpose(1, 2)
    full = full + torch.cat([w[f"task_embeddings.{t}"] + pos for t in tasks], 1)
    start = 256 * tasks.index(task)
    queries = full[:, start : start + 256]
    context = torch.cat([full[:, ids_keep], global_token], 1)
    q, c = ln(queries, "query_norm"), ln(context, "context_norm")
    kv = lin(c, "decoder.kv")
    x = lin(_attention(lin(q, "decoder.q"), kv[..., :dim], kv[..., dim:], heads), "decoder.proj")
    x = x + lin(F.gelu(lin(ln(x, "out_norm"), "mlp.fc1")), "mlp.fc2")
    depth = len({k.split(".")[1] for k in w if k.startswith("decoder_transformer.")})
    for i in range(depth):
        p = f"decoder_transformer.{i}."
        h = ln(x, p + "norm1")
        qkv = lin(h, p + "attn.qkv")
        x = x + lin(
            _attention(qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :], heads),
            p + "attn.proj",
        )
        x = x + lin(F.gelu(lin(ln(x, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
    x = lin(x, "out_proj")
    channels, patch = RELEASE_TASKS[task]
    x = x.reshape(batch, 16, 16, channels, patch, patch)
    return torch.einsum("bhwcpq->bchpwq", x).reshape(batch, channels, 16 * patch, 16 * patch)


def release_reconstruct(sd: dict, image: torch.Tensor, visible: torch.Tensor, heads: int) -> dict:
    """MIRAGE's pre-training model on one B-scan ``(1, 1, 512, 512)`` with its ``visible``
    patches, the SLO and layer map fully hidden: every decoder's output."""
    tasks = list(RELEASE_TASKS)
    encoded = masked_encoder_forward(sd, image, visible, heads)
    visible_all = torch.cat([visible, torch.zeros(512, dtype=torch.bool)])
    out = {}
    for task in tasks:
        prefix = f"output_adapters.{task}."
        w = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        out[task] = decoder_forward(w, encoded, visible_all, task, tasks)
    return out
