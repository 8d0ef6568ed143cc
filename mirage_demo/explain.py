"""Where the model looked: class-activation maps and attention maps, computed in one pass.

Methods (:data:`METHODS`):

- ``gradcam``, ``gradcam++``, ``hirescam``, ``layercam``: a target layer's activations
  weighted by the gradient of the explained class's logit (pytorch-grad-cam's formulas);
- ``eigencam``: the first principal component of the activations (no gradient, class-agnostic);
- ``gradcam-early`` (CNNs): Grad-CAM on the stage before the last (a ResNet's ``layer3``), on a
  grid twice as fine. On a CNN whose last block is followed by global average pooling the
  last block's gradient maps often coincide; this one draws what the block before it holds;
- ``attention`` (ViTs): the global token's attention to the patches in the last block, mean over
  heads (class-agnostic);
- ``rollout`` (ViTs): attention rollout (Abnar & Zuidema 2020): per block the head-mean
  attention plus the residual identity, row-normalised, multiplied through the blocks; read at
  the pooled output (the global token for ``global_pool="token"``, the mean of the patch tokens
  for MIRAGE's ``"avg"``). Class-agnostic.

**One pass.** :meth:`Explainer.trace` runs the model once (and keeps its penultimate features,
:func:`~mirage_demo.models.features_and_logits`, for the answer's uncertainty). A forward hook
on the target layer (ViTs: ``blocks[-1].norm1``; CNNs: the last feature stage) switches
autograd on for the rest of that forward and makes the layer's output a leaf that requires
grad: the trunk runs without recording anything, the tail (one block and the head, for a ViT)
records a small graph, and the logits come out of the same forward. The gradient is then taken
with respect to that leaf only (``torch.autograd.grad``), so no parameter gradient is ever
computed. A ``gradcam-early`` trace makes the earlier stage's output the leaf instead and keeps
the last stage's output in the graph, so one backward gives the gradients of both layers: that
trace serves every CAM (the Compare grid takes all of them from it). The CAM arithmetic itself
is a few lines per method here (:data:`CAM_METHODS`), the formulas of pytorch-grad-cam 1.5;
the tests check the maps equal the library's own (which is a test dependency only).

**Hooks and threads.** Hooks live inside a ``with`` block and are removed on exit, exceptions
included. They act only for the thread that registered them, and autograd's mode is
thread-local, so several threads can explain with one shared model at once.

Attention weights: timm's fused attention never materialises them, so a hook on each block's
``attn.qkv`` recomputes ``softmax(q k^T * scale)`` from the projection's output (after the
block's ``q_norm``/``k_norm``) without touching the model's own computation.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from mirage_demo.models import features_and_logits

__all__ = [
    "ATTENTION_METHODS",
    "CAM_METHODS",
    "EARLY_METHOD",
    "METHODS",
    "Explainer",
    "Trace",
    "ViTReshapeTransform",
    "canonical_method",
    "default_target_layer",
    "earlier_target_layer",
    "is_vit",
    "render_overlay",
]

# --------------------------------------------------------------------------------------------
# CAM arithmetic: activations A and gradients G, both (B, C, h, w) -> maps (B, h, w).
# The formulas of pytorch-grad-cam 1.5 (the tests check the maps equal the library's).


def _weighted(weights: np.ndarray, activations: np.ndarray) -> np.ndarray:
    return (weights[:, :, None, None] * activations).sum(axis=1)


def gradcam_map(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017): channels weighted by their mean gradient."""
    return _weighted(gradients.mean(axis=(2, 3)), activations)


def gradcam_plus_plus_map(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19): positive gradients weighted by
    ``alpha = G^2 / (2 G^2 + sum(A) G^3)``, summed over the positions."""
    squared = gradients**2
    alpha = squared / (
        2 * squared + activations.sum(axis=(2, 3), keepdims=True) * squared * gradients + 1e-6
    )
    alpha = np.where(gradients != 0, alpha, 0)
    return _weighted((np.maximum(gradients, 0) * alpha).sum(axis=(2, 3)), activations)


def hirescam_map(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """HiResCAM (Draelos & Carin 2020): gradient times activation, summed over channels."""
    return (gradients * activations).sum(axis=1)


def layercam_map(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """LayerCAM (Jiang et al. 2021): positive gradient times activation, summed."""
    return (np.maximum(gradients, 0) * activations).sum(axis=1)


def eigencam_map(activations: np.ndarray, gradients: np.ndarray | None = None) -> np.ndarray:
    """EigenCAM (Muhammad & Yeasin 2020): the activations projected on their first principal
    component (no gradient)."""
    maps = []
    for sample in np.nan_to_num(activations, nan=0.0):
        positions = sample.reshape(sample.shape[0], -1).T
        positions = positions - positions.mean(axis=0)
        _, _, vt = np.linalg.svd(positions, full_matrices=True)
        maps.append((positions @ vt[0]).reshape(sample.shape[1:]))
    return np.float32(maps)


CamFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]
CAM_METHODS: dict[str, CamFunction] = {
    "gradcam": gradcam_map,
    "gradcam++": gradcam_plus_plus_map,
    "hirescam": hirescam_map,
    "layercam": layercam_map,
    "eigencam": eigencam_map,
}


def normalise_maps(maps: np.ndarray, size_wh: tuple[int, int] | None = None) -> np.ndarray:
    """Each map min-maxed to [0, 1] (``/ (max + 1e-7)``), then bilinearly resized to
    ``size_wh`` (width, height) if given: float32 ``(B, H, W)``."""
    maps = np.asarray(maps, dtype=np.float32)
    maps = maps - maps.min(axis=(1, 2), keepdims=True)
    maps = maps / (1e-7 + maps.max(axis=(1, 2), keepdims=True))
    if size_wh is not None and maps.shape[1:] != (size_wh[1], size_wh[0]):
        resized = F.interpolate(
            torch.from_numpy(np.ascontiguousarray(maps))[:, None],
            size=(size_wh[1], size_wh[0]),
            mode="bilinear",
            align_corners=False,
        )
        maps = resized[:, 0].numpy()
    return np.float32(maps)


#: Grad-CAM on a CNN's stage before the last (:func:`earlier_target_layer`).
EARLY_METHOD = "gradcam-early"
ATTENTION_METHODS = ("attention", "rollout")
METHODS = (*CAM_METHODS, EARLY_METHOD, *ATTENTION_METHODS)
GRADIENT_METHODS = frozenset({"gradcam", "gradcam++", "hirescam", "layercam", EARLY_METHOD})
CLASS_AGNOSTIC_METHODS = frozenset({"eigencam", *ATTENTION_METHODS})
_ALIASES = {
    "gradcampp": "gradcam++",
    "gradcamplusplus": "gradcam++",
    "attn": "attention",
    "gradcamearly": EARLY_METHOD,
}


def canonical_method(name: str) -> str:
    """``"Grad-CAM++"``, ``"grad_cam"``, ``"HiResCAM"``... -> a name in :data:`METHODS`."""
    key = str(name).lower().replace("-", "").replace("_", "").replace(" ", "")
    key = _ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown explanation method {name!r}; choose from {', '.join(METHODS)}")
    return key


# --------------------------------------------------------------------------------------------
# Models: target layer, token grid


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a timm-style ViT: patch embedding, blocks and prefix tokens."""
    return all(hasattr(model, a) for a in ("patch_embed", "blocks", "num_prefix_tokens"))


class ViTReshapeTransform:
    """ViT tokens ``(B, N, C)`` -> a feature map ``(B, C, H, W)`` on the model's patch grid.

    The first ``num_prefix_tokens`` tokens (global/register tokens) are dropped; the grid comes
    from the model (MIRAGE at 512 with patch 32: 16x16), never assumed.
    """

    def __init__(self, num_prefix_tokens: int, grid_size: tuple[int, int]) -> None:
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))

    @classmethod
    def from_model(cls, model: nn.Module) -> ViTReshapeTransform:
        return cls(model.num_prefix_tokens, tuple(model.patch_embed.grid_size))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.num_prefix_tokens :, :]
        height, width = self.grid_size
        if patches.shape[1] != height * width:
            raise ValueError(
                f"{patches.shape[1]} patch tokens do not fill a {height}x{width} grid "
                f"(after {self.num_prefix_tokens} prefix tokens)"
            )
        return patches.reshape(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return f"ViTReshapeTransform(prefix={self.num_prefix_tokens}, grid={self.grid_size})"


def default_target_layer(model: nn.Module) -> nn.Module:
    """The layer CAMs are taken at: a ViT's ``blocks[-1].norm1`` (after the last block the
    maps are flat when pooling on the global token), a CNN's last feature stage."""
    if is_vit(model):
        return model.blocks[-1].norm1
    info = getattr(model, "feature_info", None)
    if isinstance(info, (list, tuple)) and info and "module" in info[-1]:
        return model.get_submodule(info[-1]["module"])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1]
    raise ValueError(f"cannot find a target layer in {type(model).__name__}: pass target_layer")


def earlier_target_layer(model: nn.Module) -> nn.Module | None:
    """A CNN's feature stage before the last (a ResNet's ``layer3``), where ``gradcam-early``
    is taken; None for a ViT (its tokens keep one grid at every depth) or a model without
    timm's ``feature_info`` of two stages or more."""
    info = getattr(model, "feature_info", None)
    if is_vit(model) or not isinstance(info, (list, tuple)) or len(info) < 2:
        return None
    name = info[-2].get("module") if isinstance(info[-2], dict) else None
    return model.get_submodule(name) if name else None


# --------------------------------------------------------------------------------------------
# Hooks that act only for their own thread


@contextlib.contextmanager
def _thread_hooks(hooks: Sequence[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Register forward hooks for the calling thread only; always removed on exit."""
    owner = threading.get_ident()
    handles = []

    def only_mine(hook: Callable) -> Callable:
        def wrapper(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if threading.get_ident() != owner:
                return None
            return hook(module, inputs, output)

        return wrapper

    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(only_mine(hook)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _attention_weights(attn: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """Head-mean attention ``(B, N, N)`` of a timm ``Attention`` from its qkv projection."""
    batch, tokens, _ = qkv.shape
    qkv = qkv.detach().reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)


# --------------------------------------------------------------------------------------------
# Explainer


@dataclass
class Trace:
    """One forward pass of :meth:`Explainer.trace`: the logits and what the method needs."""

    method: str
    logits: torch.Tensor  # (B, num_classes), detached
    input_size: tuple[int, int]
    features: torch.Tensor | None = None  # (B, D) penultimate features, detached
    activation: torch.Tensor | None = None  # target layer's output (a grad leaf for CAMs)
    earlier: torch.Tensor | None = None  # the earlier stage's output (gradcam-early's leaf)
    output: torch.Tensor | None = None  # logits still attached to the tail's graph
    attentions: list[torch.Tensor] = field(default_factory=list)  # (B, N, N) per block
    # gradients already taken, by (rows, targets): of the activation, then of ``earlier`` when
    # kept. The CAMs of one trace share them (e.g. Grad-CAM and HiResCAM of the same class)
    gradients: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[torch.Tensor, ...]] = field(
        default_factory=dict
    )


class Explainer:
    """Heatmaps for a classifier, the logits from the same forward pass.

    >>> explainer = Explainer(model)
    >>> logits, maps = explainer(x, "gradcam")          # maps: (B, H, W) in [0, 1]
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | None = None,
        reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        earlier_layer: nn.Module | None = None,
    ) -> None:
        self.model = model.eval()
        self.vit = is_vit(model)
        if target_layer is None:
            target_layer = default_target_layer(model)
        self.target_layer = target_layer
        if earlier_layer is None:
            earlier_layer = earlier_target_layer(model)
        self.earlier_layer = earlier_layer  # gradcam-early's layer (None: not offered)
        if reshape_transform is None and self.vit:
            reshape_transform = ViTReshapeTransform.from_model(model)
        self.reshape_transform = reshape_transform

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this model supports (``gradcam-early`` needs a CNN's earlier stage,
        attention maps a timm ViT), in :data:`METHODS`' order."""
        offered = set(CAM_METHODS)
        if self.earlier_layer is not None:
            offered.add(EARLY_METHOD)
        if self._has_attention():
            offered.update(ATTENTION_METHODS)
        return tuple(m for m in METHODS if m in offered)

    def _has_attention(self) -> bool:
        if not self.vit:
            return False
        attn = getattr(self.model.blocks[-1], "attn", None)
        return all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale", "q_norm"))

    def check_method(self, method: str) -> str:
        method = canonical_method(method)
        if method in ATTENTION_METHODS and not self._has_attention():
            raise ValueError(
                f"{method!r} needs a ViT with timm attention blocks; "
                f"{type(self.model).__name__} supports {', '.join(self.methods)}"
            )
        if method == EARLY_METHOD and self.earlier_layer is None:
            raise ValueError(
                f"{method!r} needs a CNN with an earlier feature stage; "
                f"{type(self.model).__name__} supports {', '.join(self.methods)}"
            )
        return method

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def trace(self, x: torch.Tensor, method: str = "gradcam") -> Trace:
        """Run the model once on ``x`` ``(B, C, H, W)``, keeping what ``method`` needs (a
        ``gradcam-early`` trace keeps both layers: it serves every CAM)."""
        method = self.check_method(method)
        x = x.to(self.device)
        trace = Trace(method, logits=torch.empty(0), input_size=(x.shape[-2], x.shape[-1]))
        wants_grad = method in GRADIENT_METHODS

        def grad_leaf(output: torch.Tensor) -> torch.Tensor:
            torch.set_grad_enabled(True)  # from here on (the tail) autograd records
            return output if output.requires_grad else output.detach().requires_grad_(True)

        def keep_earlier(module: nn.Module, inputs: tuple, output: torch.Tensor):
            trace.earlier = grad_leaf(output)
            return trace.earlier

        def keep_activation(module: nn.Module, inputs: tuple, output: torch.Tensor):
            trace.activation = grad_leaf(output) if wants_grad else output
            return trace.activation

        hooks: list[tuple[nn.Module, Callable]] = []
        if method == EARLY_METHOD:
            hooks.append((self.earlier_layer, keep_earlier))
        if method in CAM_METHODS or method == EARLY_METHOD:
            hooks.append((self.target_layer, keep_activation))
        else:
            blocks = list(self.model.blocks)
            for block in blocks[-1:] if method == "attention" else blocks:

                def keep_attention(module, inputs, output, attn=block.attn):
                    trace.attentions.append(_attention_weights(attn, output))

                hooks.append((block.attn.qkv, keep_attention))

        with torch.inference_mode(False), torch.no_grad(), _thread_hooks(hooks):
            features, output = features_and_logits(self.model, x)
        missed = trace.activation is None or (method == EARLY_METHOD and trace.earlier is None)
        if wants_grad and missed:
            raise RuntimeError("the target layer was not run by the model's forward")
        trace.output = output if output.requires_grad else None
        trace.logits = output.detach()
        trace.features = features.detach()
        return trace

    def heatmaps(
        self,
        trace: Trace,
        targets: Sequence[int] | None = None,
        rows: Sequence[int] | None = None,
        size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Heatmaps ``(len(rows), H, W)`` in [0, 1] for the classes ``targets`` of the batch
        items ``rows`` (default: all items, each its top class), at ``size`` (default: the
        model input's size). A trace may be asked several times (e.g. for each class)."""
        batch = trace.logits.shape[0]
        rows = list(range(batch)) if rows is None else [int(r) for r in rows]
        if targets is None:
            targets = trace.logits[rows].argmax(dim=-1).tolist()
        targets = [int(t) for t in targets]
        if len(targets) != len(rows):
            raise ValueError(f"{len(targets)} targets for {len(rows)} images")
        num_classes = trace.logits.shape[-1]
        if any(not 0 <= t < num_classes for t in targets):
            raise ValueError(f"target classes must be in 0..{num_classes - 1}, got {targets}")
        height, width = size or trace.input_size
        if trace.method in ATTENTION_METHODS:
            maps = self._attention_maps(trace)[rows]
            return normalise_maps(normalise_maps(maps, (width, height)))
        return self._cam(trace, targets, rows, (width, height))

    def __call__(
        self,
        x: torch.Tensor,
        method: str = "gradcam",
        targets: Sequence[int] | None = None,
        size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """``(logits, heatmaps)`` for a batch, from one forward pass."""
        trace = self.trace(x, method)
        return trace.logits, self.heatmaps(trace, targets, size=size)

    # ----------------------------------------------------------------------------------------

    def _to_map(self, tensor: torch.Tensor) -> np.ndarray:
        if self.reshape_transform is not None:
            tensor = self.reshape_transform(tensor)
        return tensor.detach().float().cpu().numpy()

    def _cam(
        self, trace: Trace, targets: list[int], rows: list[int], size_wh: tuple[int, int]
    ) -> np.ndarray:
        early = trace.method == EARLY_METHOD
        layer = trace.earlier if early else trace.activation
        if layer is None:
            raise RuntimeError("this trace holds no activations")
        activations = self._to_map(layer[rows])
        gradients = None
        if trace.method in GRADIENT_METHODS:
            key = (tuple(rows), tuple(targets))
            if key not in trace.gradients:
                trace.gradients[key] = _layer_gradients(trace, rows, targets)
            gradients = self._to_map(trace.gradients[key][1 if early else 0])
        formula = gradcam_map if early else CAM_METHODS[trace.method]
        cam = np.maximum(formula(activations, gradients), 0)
        # as pytorch-grad-cam: normalise and resize, then normalise again (one layer's mean)
        return normalise_maps(normalise_maps(cam, size_wh))

    def _attention_maps(self, trace: Trace) -> np.ndarray:
        prefix = self.model.num_prefix_tokens
        grid = ViTReshapeTransform.from_model(self.model).grid_size
        if trace.method == "attention":
            weights = trace.attentions[-1][:, 0, prefix:]  # the global token's row
        else:
            weights = _rollout(trace.attentions)
            if getattr(self.model, "global_pool", "token") == "token":
                weights = weights[:, 0, prefix:]
            else:  # the classifier averages the patch tokens
                weights = weights[:, prefix:, prefix:].mean(dim=1)
        return weights.reshape(-1, *grid).float().cpu().numpy()


def _layer_gradients(trace: Trace, rows: list[int], targets: list[int]) -> tuple[torch.Tensor, ...]:
    """The gradients of the ``targets``' logits (summed over ``rows``) with respect to the
    trace's activation and, when kept, its earlier layer: one backward for both."""
    if trace.output is None:
        raise RuntimeError("this trace holds no graph to take gradients from")
    layers = [t for t in (trace.activation, trace.earlier) if t is not None]
    with torch.inference_mode(False), torch.enable_grad():
        score = trace.output[rows, targets].sum()
        gradients = torch.autograd.grad(score, layers, retain_graph=True)
    return tuple(gradient[rows] for gradient in gradients)


def _rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout: product over blocks of ``normalise(0.5 * A + 0.5 * I)``."""
    result = None
    for weights in attentions:
        eye = torch.eye(weights.shape[-1], dtype=weights.dtype, device=weights.device)
        step = 0.5 * weights + 0.5 * eye
        step = step / step.sum(dim=-1, keepdim=True)
        result = step if result is None else step @ result
    if result is None:
        raise RuntimeError("no attention weights were recorded")
    return result


# --------------------------------------------------------------------------------------------
# Overlay


def render_overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    colormap: str = "jet",
    opacity: float = 0.5,
) -> Image.Image:
    """Blend a colour-mapped heatmap (``(H, W)`` in [0, 1]) over a grayscale ``(H, W)`` or RGB
    ``(H, W, 3)`` image in [0, 1]: ``(1 - opacity) * image + opacity * colormap(heatmap)``."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    if image.shape[:2] != heatmap.shape:
        raise ValueError(f"heatmap {heatmap.shape} does not match image {image.shape[:2]}")
    lut = _colormap_lut(colormap)
    colours = Image.fromarray(lut[np.clip(heatmap * 255.0 + 0.5, 0, 255).astype(np.uint8)])
    pixels = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    base = Image.fromarray(pixels if pixels.ndim == 2 else pixels[..., :3]).convert("RGB")
    return Image.blend(base, colours, opacity)


@functools.lru_cache(maxsize=16)
def _colormap_lut(name: str) -> np.ndarray:
    """A read-only ``(256, 3)`` uint8 lookup table of a matplotlib colormap."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError as err:
        raise ValueError(f"unknown matplotlib colormap {name!r}") from err
    lut = np.round(cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.uint8)
    lut.flags.writeable = False
    return lut
