"""Backbones by source: timm, transformers (hf:) and local files or folders, each built at the cached
resolution, with its pooled feature size, normalisation, blocks and LoRA targets (models.py wraps them).
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dermcompress.errors import ConfigError

from .registry import ModelSpec, effective_input
from .weights import (
    WeightsMismatchError,
    check_keys,
    hf_snapshot,
    load_timm_state_dict,
    read_state_dict,
    timm_weights_file,
)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class _Backbone:
    module: nn.Module
    feature_dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    effective_input_px: int
    input_mode: str
    blocks: list[nn.Module]
    lora_targets: list[str] | None
    pooling: str


def _find_lora_targets(module: nn.Module, candidates: tuple[tuple[str, ...], ...]) -> list[str] | None:
    names = {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    for group in candidates:
        if all(target in names for target in group):
            return list(group)
    return None


def _timm_pool_type(model: nn.Module) -> str:
    pool = getattr(model, "global_pool", None)  # "token"/"avg" on ViTs, a pooling module on ResNets
    return pool if isinstance(pool, str) else str(getattr(pool, "pool_type", "avg"))


def _timm_backbone(
    spec: ModelSpec, name: str, *, resolution: int, weights: str | Path | None, hub_file: Path | None = None
) -> _Backbone:
    """timm model `name` with num_classes=0 (it returns pooled features). `weights`: a local file to load strictly;
    `hub_file`: timm's own pretrained file (loaded by timm, which drops the head and resamples embeddings)."""
    import timm
    from timm.layers import PatchEmbed

    if not timm.is_model(name):
        raise ConfigError(
            f"models.{spec.name}.{'arch' if spec.arch else 'source'}", f"timm has no model {name!r}"
        )
    with torch.device("meta"):  # a free look at the architecture: patch size, before building it for real
        probe = timm.create_model(name, pretrained=False, num_classes=0)
    kwargs: dict[str, Any] = {}
    patch_embed = getattr(probe, "patch_embed", None)
    patch = patch_embed.patch_size[0] if isinstance(patch_embed, PatchEmbed) else None
    effective, mode = effective_input(resolution, patch, pad=spec.pad_to_patch)
    if patch:
        kwargs["img_size"] = effective
    if hub_file is not None:
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(hub_file)}, num_classes=0, **kwargs
        )
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if weights is not None:
        load_timm_state_dict(model, read_state_dict(weights), f"{spec.source} (models.{spec.name})")
    cfg = dict(model.pretrained_cfg)
    for stage in ("blocks", "stages"):
        blocks = list(getattr(model, stage, []))
        if blocks:
            break
    else:
        blocks = [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
    return _Backbone(
        module=model,
        feature_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
        mean=tuple(cfg.get("mean") or IMAGENET_MEAN),
        std=tuple(cfg.get("std") or IMAGENET_STD),
        effective_input_px=effective,
        input_mode=mode,
        blocks=blocks,
        lora_targets=_find_lora_targets(model, (("qkv",), ("q_proj", "v_proj"), ("query", "value"))),
        pooling=f"timm {_timm_pool_type(model)}",
    )


class HFBackbone(nn.Module):
    """A transformers vision model -> pooled features: class token, class + mean patch token, or its pooler."""

    def __init__(self, model: nn.Module, pooling: str, n_prefix_tokens: int) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.n_prefix_tokens = n_prefix_tokens
        # transformers ViTs refuse other sizes unless asked to interpolate; DINOv2 always interpolates
        accepts = inspect.signature(model.forward).parameters
        self._forward_kwargs = (
            {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in accepts else {}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x, **self._forward_kwargs)
        if self.pooling == "pooler":
            return out.pooler_output.flatten(1)
        tokens = out.last_hidden_state
        if self.pooling == "cls+mean_patch":
            return torch.cat([tokens[:, 0], tokens[:, self.n_prefix_tokens :].mean(dim=1)], dim=1)
        return tokens[:, 0]


def _read_norm_from_folder(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """image_mean / image_std of a saved image processor (read as config: the processor never runs)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    if "image_mean" in cfg and "image_std" in cfg:
        return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return None


def _hf_backbone(spec: ModelSpec, folder: Path, *, resolution: int, weights: bool) -> _Backbone:
    from transformers import AutoConfig, AutoModel

    what = f"{spec.source} (models.{spec.name})"
    if weights:
        # float32 whatever the checkpoint was saved in (transformers 5 loads dtype="auto"): bf16 master weights
        # would train badly, and fail on a CPU; autocast gives the speed of bf16 where there is a GPU.
        model, info = AutoModel.from_pretrained(
            folder,
            local_files_only=True,
            trust_remote_code=False,
            output_loading_info=True,
            dtype=torch.float32,
        )
        check_keys(what, sorted(info["missing_keys"]), sorted(info["unexpected_keys"]))
        if info.get("mismatched_keys"):
            raise WeightsMismatchError(
                f"{what}: keys with mismatched shapes {sorted(info['mismatched_keys'])}"
            )
    else:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        model = AutoModel.from_config(config, dtype=torch.float32)
    config = model.config
    patch = getattr(config, "patch_size", None)
    patch = patch[0] if isinstance(patch, list | tuple) else patch
    if patch:  # a ViT: tokens out
        pooling = "cls+mean_patch" if config.model_type.startswith("dinov2") else "cls"
        feature_dim = config.hidden_size * (2 if pooling == "cls+mean_patch" else 1)
    elif hasattr(config, "hidden_sizes"):  # a convnet with a pooler (ResNet, ConvNeXt ...)
        pooling, feature_dim = "pooler", config.hidden_sizes[-1]
    else:
        raise ValueError(f"{what}: unsupported transformers model type {config.model_type!r}")
    effective, mode = effective_input(resolution, patch, pad=spec.pad_to_patch)
    norm = _read_norm_from_folder(folder)
    if norm is None and (spec.mean is None or spec.std is None):
        log.warning("%s: no preprocessor_config.json with image_mean/std; using ImageNet's", what)
    mean, std = norm or (IMAGENET_MEAN, IMAGENET_STD)
    encoder = getattr(model, "encoder", None)
    blocks: list[nn.Module] = []
    for attr in ("layer", "layers", "stages"):
        if encoder is not None and hasattr(encoder, attr):
            blocks = list(getattr(encoder, attr))
            break
    return _Backbone(
        module=HFBackbone(model, pooling, 1 + int(getattr(config, "num_register_tokens", 0) or 0)),
        feature_dim=int(feature_dim),
        mean=tuple(mean),
        std=tuple(std),
        effective_input_px=effective,
        input_mode=mode,
        blocks=blocks,
        lora_targets=_find_lora_targets(model, (("q_proj", "v_proj"), ("query", "value"), ("qkv",))),
        pooling=pooling,
    )


def _local_folder_kind(folder: Path) -> str:
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json (expected a save_pretrained / timm save_for_hf folder)"
        )
    cfg = json.loads(config.read_text())
    if "architecture" in cfg:
        return "timm"
    if "model_type" in cfg:
        return "hf"
    raise ValueError(f"{config} names neither a timm 'architecture' nor a transformers 'model_type'")


def _timm_folder_weights(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin")


def build_backbone(spec: ModelSpec, *, resolution: int, weights: bool) -> _Backbone:
    """The backbone of `spec` at `resolution`; `weights=False` builds the bare architecture (for FLOPs)."""
    load = weights and spec.pretrained
    if spec.kind == "timm":
        hub_file = timm_weights_file(spec.ref) if load else None
        return _timm_backbone(spec, spec.ref, resolution=resolution, weights=None, hub_file=hub_file)
    if spec.kind == "hf":
        return _hf_backbone(
            spec, hf_snapshot(spec.ref, need_weights=load), resolution=resolution, weights=load
        )
    path = Path(spec.ref)
    if spec.is_weight_file:
        arch = spec.arch.split(":", 1)[1]  # parse_spec guarantees timm:NAME
        if load and not path.is_file():
            raise FileNotFoundError(f"models.{spec.name}.source: no weights file at {path.resolve()}")
        return _timm_backbone(spec, arch, resolution=resolution, weights=path if load else None)
    if not path.is_dir():
        raise FileNotFoundError(f"models.{spec.name}.source: no such folder {path.resolve()}")
    if _local_folder_kind(path) == "hf":
        return _hf_backbone(spec, path, resolution=resolution, weights=load)
    arch = json.loads((path / "config.json").read_text())["architecture"]
    backbone = _timm_backbone(
        spec, arch, resolution=resolution, weights=_timm_folder_weights(path) if load else None
    )
    saved = json.loads((path / "config.json").read_text()).get("pretrained_cfg", {})
    if saved.get("mean") and saved.get("std"):
        backbone.mean, backbone.std = tuple(saved["mean"]), tuple(saved["std"])
    return backbone
