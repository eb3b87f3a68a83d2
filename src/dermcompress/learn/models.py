"""The classifier: a backbone (backbones.py) giving pooled features and a linear head, for a registry entry
(registry.py) at one cached resolution.

Features and input size
-----------------------
Images arrive at the cached resolution (56/112/224 px ...) and are normalised by the caller with the model's
``mean``/``std`` (``Classifier.normalize`` does it). A patch-based ViT at a resolution that is not a multiple of its
patch sees a centre crop floored to the patch multiple (ViT-B/16 at 56 px sees 48x48, as transformers' ViT did in
the study: its patch convolution drops the remainder) or, with ``pad_to_patch: true``, a zero-padded image (64x64;
zero after normalisation is the mean colour). ``Classifier.forward`` does this itself; ``effective_input_px``
records what the model really sees. ResNets see the full resolution.

Pooled features: timm models use their own pooling (class token for ViTs, global average for ResNets). transformers
ViTs use the final-norm class token, as ``ViTForImageClassification`` does; DINOv2 concatenates the class token
with the mean of the patch tokens (register tokens excluded), exactly as ``Dinov2ForImageClassification`` and the
DINOv2 linear evaluation do, so its feature_dim is 2 x hidden size.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .backbones import build_backbone
from .registry import DEFAULT_MODELS, ModelSpec, parse_spec

__all__ = [
    "DEFAULT_MODELS",
    "Classifier",
    "ModelSpec",
    "build_architecture",
    "build_model",
    "build_seeded",
    "parse_spec",
]

log = logging.getLogger(__name__)


class LoraUnsupportedError(ValueError):
    """The backbone has no attention projections for LoRA to adapt (e.g. a ResNet)."""


class InputAdapter(nn.Module):
    """Centre-crops or zero-pads a normalised (B, C, R, R) batch to what the backbone accepts."""

    def __init__(self, resolution: int, size: int, mode: str) -> None:
        super().__init__()
        self.resolution, self.size, self.mode = resolution, size, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h != self.resolution or w != self.resolution:
            raise ValueError(
                f"this model was built for {self.resolution}x{self.resolution} input, got {h}x{w}; "
                "build one per cached resolution"
            )
        if self.mode == "crop":
            top = (self.resolution - self.size) // 2
            return x[..., top : top + self.size, top : top + self.size]
        if self.mode == "pad":
            before = (self.size - self.resolution) // 2
            after = self.size - self.resolution - before
            return F.pad(x, (before, after, before, after))
        return x

    def extra_repr(self) -> str:
        return f"{self.resolution} -> {self.size} ({self.mode})"


class Classifier(nn.Module):
    """A backbone giving pooled features (B, D) and a linear head; built by `build_model`.

    Attributes: `mean`, `std` (normalisation the weights expect), `feature_dim`, `resolution` (the input size it
    takes), `effective_input_px` (what the backbone sees), `blocks` (transformer blocks / ResNet stages in order,
    a plain list so nothing is registered twice), `lora_targets` (peft target module names; raises
    LoraUnsupportedError for backbones without attention projections), `pooling`, `spec`.
    """

    def __init__(
        self,
        *,
        spec: ModelSpec,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        resolution: int,
        effective_input_px: int,
        input_mode: str,
        blocks: list[nn.Module],
        lora_targets: list[str] | None,
        pooling: str,
    ) -> None:
        super().__init__()
        self.input_adapter = InputAdapter(resolution, effective_input_px, input_mode)
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.spec = spec
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.resolution = resolution
        self.effective_input_px = effective_input_px
        self.input_mode = input_mode
        self.pooling = pooling
        self.blocks = list(blocks)
        self._lora_targets = lora_targets

    @property
    def lora_targets(self) -> list[str]:
        if not self._lora_targets:
            raise LoraUnsupportedError(
                f"LoRA is not supported for model '{self.spec.name}' ({self.spec.source}): it has no attention "
                "projections (LoRA here adapts attention; convolutions are not targets). Finetune it fully or "
                "train a linear head on frozen features instead."
            )
        return list(self._lora_targets)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 scaled to [0, 1] and normalised with this model's mean/std."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float (B, 3, R, R) at the cached resolution -> pooled features (B, feature_dim)."""
        return self.backbone(self.input_adapter(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def freeze(self, n_blocks: int | None = None) -> int:
        """Freeze the backbone (n_blocks=None), or its stem and first `n_blocks` blocks; return the frozen count.

        The stem (patch/position embeddings, ResNet stem) is whatever the backbone registers before its first
        block; layers after the last block (final norm) stay trainable unless the whole backbone is frozen.
        """
        self.requires_grad_(True)
        params = list(self.backbone.named_parameters())
        if n_blocks is None or not self.blocks:
            frozen = [p for _, p in params]
        else:
            if not 0 <= n_blocks <= len(self.blocks):
                raise ValueError(f"n_blocks must be in 0..{len(self.blocks)}, got {n_blocks}")
            in_blocks = {id(p) for block in self.blocks for p in block.parameters()}
            first_block = next(i for i, (_, p) in enumerate(params) if id(p) in in_blocks)
            stem = [p for _, p in params[:first_block] if id(p) not in in_blocks]
            frozen = stem + [p for block in self.blocks[:n_blocks] for p in block.parameters()]
        for p in frozen:
            p.requires_grad_(False)
        return sum(p.numel() for p in frozen)

    def describe(self) -> dict[str, Any]:
        """What a run records about its model."""
        return {
            "name": self.spec.name,
            "source": self.spec.source,
            "pretrained": self.spec.pretrained,
            "feature_dim": self.feature_dim,
            "pooling": self.pooling,
            "resolution": self.resolution,
            "effective_input_px": self.effective_input_px,
            "input_mode": self.input_mode,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def _assemble(spec: ModelSpec, *, num_classes: int, resolution: int, weights: bool) -> Classifier:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    backbone = build_backbone(spec, resolution=resolution, weights=weights)
    model = Classifier(
        spec=spec,
        backbone=backbone.module,
        feature_dim=backbone.feature_dim,
        num_classes=num_classes,
        mean=spec.mean or backbone.mean,
        std=spec.std or backbone.std,
        resolution=resolution,
        effective_input_px=backbone.effective_input_px,
        input_mode=backbone.input_mode,
        blocks=backbone.blocks,
        lora_targets=backbone.lora_targets,
        pooling=backbone.pooling,
    )
    log.info(
        "model %s (%s%s): %d px input -> %d px seen (%s), %d-d features (%s), %.1fM parameters",
        spec.name,
        spec.source,
        "" if spec.pretrained else ", random init",
        resolution,
        model.effective_input_px,
        model.input_mode,
        model.feature_dim,
        model.pooling,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model


def build_model(spec: ModelSpec, *, num_classes: int, resolution: int) -> Classifier:
    """The classifier for `spec`, taking (B, 3, resolution, resolution) normalised input, weights loaded.

    Raises WeightsUnavailableError (offline, not cached), WeightsMismatchError, UnsafeCheckpointError.
    """
    return _assemble(spec, num_classes=num_classes, resolution=resolution, weights=True)


def build_seeded(name: str, entry: dict, *, num_classes: int, resolution: int, seed: int) -> Classifier:
    """build_model for a registry entry after seeding every RNG with `seed`: a new head's initial weights (and
    a random-init backbone's) follow from it, so a run's model is its seed's."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds the global RNG, for any third-party code drawing from it
    torch.manual_seed(seed)
    return build_model(parse_spec(name, entry), num_classes=num_classes, resolution=resolution)


def build_architecture(spec: ModelSpec, *, num_classes: int, resolution: int) -> Classifier:
    """The same classifier without loading any weights (random init): for counting FLOPs and parameters."""
    return _assemble(spec, num_classes=num_classes, resolution=resolution, weights=False)
