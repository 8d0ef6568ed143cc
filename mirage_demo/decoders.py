"""Masked reconstruction with MIRAGE's decoders: the encoder on the visible patches, then one
light cross-attention decoder per output.

MIRAGE was pre-trained as a multimodal masked autoencoder (MultiMAE): most 32x32 patches of a
B-scan are hidden, the ViT encoder sees only the visible ones (plus its global token), and a
small decoder per output rebuilds the whole image from them. Each decoder
(:class:`PatchDecoder`, MIRAGE's "spatial output adapter") works like this:

1. the encoder's tokens are projected to the decoder's width (``proj_context``);
2. every position of every input modality gets a token: the projected encoder token where the
   patch was visible, a learned ``mask_token`` where it was hidden; each gets its modality's
   learned embedding (``task_embeddings``) plus a fixed 2-D sin-cos position embedding;
3. the queries are the tokens of the decoder's own modality; they cross-attend (``decoder``:
   no residual) to the visible tokens and the projected global token, then an MLP (residual),
   then ``depth`` ordinary transformer blocks (``decoder_transformer``);
4. ``out_proj`` turns each query into its patch's pixels (or class logits), laid out as an
   image.

The parameter names are MIRAGE's (``output_adapters.<task>.*`` in its release files), so its
weights load unchanged (:func:`mirage_demo.pretraining.load_release`); our own single-modality
pre-training (``python -m train --mode pretrain``) uses the same decoder. This is our own
implementation of the published math, checked against MIRAGE's code by the tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

__all__ = [
    "CrossAttention",
    "MaskedReconstructor",
    "PatchDecoder",
    "masked_mse",
    "patch_mask_image",
    "visible_patches",
]

_LayerNorm = partial(nn.LayerNorm, eps=1e-6)

#: One input modality of the token sequence: its name and its (rows, columns) of patches.
Segment = tuple[str, tuple[int, int]]


def visible_patches(
    batch: int,
    ratio: float,
    seed: int | None = None,
    patches: int = 256,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A ``(batch, patches)`` boolean mask, ``True`` where a patch stays visible.

    ``ratio`` is the share hidden: every row keeps exactly ``round(patches * (1 - ratio))``
    patches, drawn at random (from ``seed``, or ``generator``; the same seed, the same mask).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"the mask ratio must be in [0, 1], not {ratio}")
    if generator is None:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
    keep = round(patches * (1.0 - ratio))
    order = torch.rand(batch, patches, generator=generator).argsort(dim=1)
    visible = torch.zeros(batch, patches, dtype=torch.bool)
    visible.scatter_(1, order[:, :keep], True)
    return visible


def _check_visible(visible: torch.Tensor, batch: int, patches: int) -> int:
    """The number of visible patches per image (the same in every row)."""
    if visible.dtype != torch.bool or visible.shape != (batch, patches):
        raise ValueError(
            f"visible must be a boolean tensor of shape ({batch}, {patches}), "
            f"not {visible.dtype} {tuple(visible.shape)}"
        )
    counts = visible.sum(dim=1)
    if batch and not bool((counts == counts[0]).all()):
        raise ValueError("every image must keep the same number of visible patches")
    return int(counts[0]) if batch else 0


def sincos_table(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """A fixed 2-D sin-cos position table stored as MIRAGE stores it: ``(1, dim, rows, cols)``."""
    table = build_sincos2d_pos_embed(list(grid), dim=dim)  # (rows * cols, dim)
    return table.T.reshape(1, dim, *grid).contiguous()


class CrossAttention(nn.Module):
    """Multi-head attention of queries to a separate context (``q`` and ``kv`` projections)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q(x).reshape(batch, n, heads, head_dim).transpose(1, 2)
        kv = self.kv(context).reshape(batch, context.shape[1], 2, heads, head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, n, dim))


class PatchDecoder(nn.Module):
    """MIRAGE's spatial output adapter: rebuilds one modality from the visible tokens.

    ``encoder_dim``: the encoder's width; ``dim``/``depth``/``num_heads``: the decoder's (MIRAGE:
    256, 2, 8); ``channels`` and ``patch``: what each query becomes (1 x 32 x 32 pixels for a
    B-scan, 13 x 8 x 8 class logits for the 128x128 layer map); ``grid``: the output's patch
    grid; ``context_tasks``: the input modalities that get a learned embedding.
    """

    def __init__(
        self,
        encoder_dim: int,
        dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        channels: int = 1,
        patch: int = 32,
        grid: tuple[int, int] = (16, 16),
        context_tasks: Sequence[str] = ("bscan",),
    ) -> None:
        super().__init__()
        self.channels, self.patch, self.grid = channels, patch, tuple(grid)
        self.task_embeddings = nn.ParameterDict(
            {task: nn.Parameter(torch.zeros(1, 1, dim)) for task in context_tasks}
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_emb = nn.Parameter(sincos_table(dim, self.grid), requires_grad=False)
        self.decoder = CrossAttention(dim, num_heads)
        self.context_norm = _LayerNorm(dim)
        self.query_norm = _LayerNorm(dim)
        self.out_norm = _LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.decoder_transformer = nn.Sequential(
            *[Block(dim, num_heads, qkv_bias=True, norm_layer=_LayerNorm) for _ in range(depth)]
        )
        self.out_proj = nn.Linear(dim, channels * patch * patch)
        self.proj_context = nn.Linear(encoder_dim, dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for param in [*self.task_embeddings.values(), self.mask_token]:
            nn.init.trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(
        self,
        encoded: torch.Tensor,
        visible: torch.Tensor,
        segments: Sequence[Segment],
        task: str,
        num_global: int = 1,
    ) -> torch.Tensor:
        """``(B, channels, rows * patch, cols * patch)`` for the ``task`` segment.

        ``encoded``: the encoder's visible tokens in sequence order, then ``num_global`` global
        tokens; ``visible``: ``(B, all positions)`` over the concatenated ``segments``.
        """
        context = self.proj_context(encoded)
        tokens, global_tokens = context[:, :-num_global], context[:, -num_global:]
        batch, dim = context.shape[0], context.shape[-1]
        mask_token = self.mask_token.to(context.dtype)
        if tokens.shape[1]:
            slot = (visible.cumsum(dim=1) - 1).clamp(min=0)
            placed = tokens.gather(1, slot.unsqueeze(-1).expand(-1, -1, dim))
            full = torch.where(visible.unsqueeze(-1), placed, mask_token)
        else:
            full = mask_token.expand(batch, visible.shape[1], dim)
        full = full + self._embeddings(segments).to(full.dtype)
        start = 0
        for name, (rows, cols) in segments:
            if name == task:
                break
            start += rows * cols
        queries = full[:, start : start + self.grid[0] * self.grid[1]]
        kept = full[visible].reshape(batch, -1, dim)
        context = torch.cat([kept, global_tokens], dim=1)
        x = self.decoder(self.query_norm(queries), self.context_norm(context))
        x = x + self.mlp(self.out_norm(x))
        x = self.out_proj(self.decoder_transformer(x))
        rows, cols = self.grid
        x = x.reshape(batch, rows, cols, self.channels, self.patch, self.patch)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(
            batch, self.channels, rows * self.patch, cols * self.patch
        )

    def _embeddings(self, segments: Sequence[Segment]) -> torch.Tensor:
        """Each segment's learned modality embedding plus the position table."""
        positions = self.pos_emb.flatten(2).transpose(1, 2)
        parts = []
        for name, grid in segments:
            if tuple(grid) != self.grid:
                raise ValueError(f"segment {name} has a {grid} grid; this decoder's is {self.grid}")
            embedding = self.task_embeddings.get(name)
            parts.append(positions if embedding is None else positions + embedding)
        return torch.cat(parts, dim=1)


class MaskedReconstructor(nn.Module):
    """A MIRAGE-style encoder (a timm ViT, used without its final norm) and its decoders.

    ``segments`` are the input modalities in sequence order (MIRAGE: ``bscan``, ``slo``,
    ``bscanlayermap``, each 16x16 positions); only B-scan patches are ever given to the
    encoder, the other modalities are fully hidden, as MIRAGE's own wrapper does when only a
    B-scan is at hand. ``mean``/``std`` are the encoder's input standardisation.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        decoders: Mapping[str, PatchDecoder],
        segments: Sequence[Segment] = (("bscan", (16, 16)),),
        mean: float = 0.0,
        std: float = 1.0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoders = nn.ModuleDict(dict(decoders))
        self.segments = [(name, tuple(grid)) for name, grid in segments]
        self.mean, self.std = float(mean), float(std)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.encoder.patch_embed.grid_size)

    @property
    def patch(self) -> int:
        return int(self.encoder.patch_embed.patch_size[0])

    def no_weight_decay(self) -> set[str]:
        """Position tables, tokens and modality embeddings: no weight decay."""
        names = {"encoder.pos_embed", "encoder.cls_token"}
        for task, decoder in self.decoders.items():
            names |= {f"decoders.{task}.mask_token", f"decoders.{task}.pos_emb"}
            names |= {f"decoders.{task}.task_embeddings.{t}" for t in decoder.task_embeddings}
        return names

    def encode(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Encoder tokens of the visible patches of a standardised ``x``, global token last."""
        vit, patch = self.encoder, self.patch
        batch, chans = x.shape[:2]
        rows, cols = self.grid
        _check_visible(visible, batch, rows * cols)
        visible = visible.to(x.device)
        # only the visible patches are embedded: the patch convolution as a matrix product
        pixels = x.reshape(batch, chans, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
        pixels = pixels[visible.reshape(batch, rows, cols)].reshape(batch, -1, chans * patch**2)
        proj = vit.patch_embed.proj
        tokens = F.linear(pixels, proj.weight.flatten(1), proj.bias)
        positions = vit.pos_embed.expand(batch, -1, -1)[visible].reshape(batch, -1, vit.embed_dim)
        tokens = tokens + positions.to(tokens.dtype)
        tokens = torch.cat([tokens, vit.cls_token.expand(batch, -1, -1).to(tokens.dtype)], 1)
        return vit.blocks(vit.norm_pre(tokens))

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every decoder's output for a standardised ``x`` and its ``visible`` patches."""
        encoded = self.encode(x, visible)
        visible = visible.to(x.device)
        hidden = [
            torch.zeros(len(x), rows * cols, dtype=torch.bool, device=x.device)
            for _, (rows, cols) in self.segments[1:]
        ]
        everywhere = torch.cat([visible, *hidden], dim=1)
        num_global = self.encoder.cls_token.shape[1]
        return {
            task: decoder(encoded, everywhere, self.segments, task, num_global)
            for task, decoder in self.decoders.items()
        }

    @torch.no_grad()
    def reconstruct(self, bscan: torch.Tensor, visible: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rebuild ``bscan`` (``(B, 1, H, W)`` in [0, 1]) from its ``visible`` patches.

        Returns ``"bscan"`` (the rebuilt B-scan, in the input's [0, 1] scale) and, for MIRAGE's
        release weights, ``"slo"`` (the SLO image predicted from the B-scan alone) and
        ``"bscanlayermap"`` (13-class layer-map logits at 128x128)."""
        self.eval()
        device = next(self.parameters()).device
        x = (bscan.to(device, torch.float32) - self.mean) / self.std
        return {k: v.float() for k, v in self(x, visible).items()}


def masked_mse(
    prediction: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, patch: int
) -> torch.Tensor:
    """MIRAGE's reconstruction loss: squared error on the hidden patches only, averaged per
    image over its hidden pixels, then over the images that hide any patch."""
    hidden = patch_mask_image(~visible, prediction.shape[-2:], patch).to(prediction.device)
    error = (prediction.float() - target.float()).pow(2).mean(dim=1) * hidden
    per_image = error.flatten(1).sum(1) / hidden.flatten(1).sum(1)
    return per_image.nanmean()


def patch_mask_image(mask: torch.Tensor, size: Sequence[int], patch: int) -> torch.Tensor:
    """A ``(B, rows * cols)`` patch mask as a ``(B, H, W)`` float image of 0s and 1s."""
    rows, cols = size[0] // patch, size[1] // patch
    grid = mask.reshape(len(mask), rows, cols).float()
    return grid.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
