"""The model registry: a `models:` entry of config.yaml, validated into a ModelSpec (backbones.py loads it,
models.py wraps it into a classifier).

A registry entry is a mapping::

    vit_b16:
      source: timm:vit_base_patch16_224.orig_in21k_ft_in1k   # or hf:<hub id>, or local:<path>
      arch: timm:resnet50        # only for a local weights file: the architecture to instantiate
      pretrained: true           # false: random initialisation (e.g. a from-scratch baseline)
      pad_to_patch: false        # ViTs: zero-pad up to the next patch multiple instead of centre-cropping
      mean: [0.5, 0.5, 0.5]      # optional: override the normalisation the weights expect
      std: [0.5, 0.5, 0.5]
      description: ...

Sources
-------
- ``timm:NAME[.TAG]``: ``timm.create_model``; timm resamples ViT position embeddings itself when the input size
  differs from the pretraining size.
- ``hf:OWNER/NAME``: ``transformers.AutoModel`` (never ``trust_remote_code``). The hub snapshot is resolved to a
  local folder first, so loading never waits on the network once the weights are cached.
- ``local:PATH``: a ``.safetensors`` file (with ``arch: timm:NAME``; ``.pt/.pth/.bin`` are read with
  ``torch.load(weights_only=True)`` and refused if they pickle anything but tensors), or a folder written by
  transformers ``save_pretrained`` (config.json with ``model_type``) or by timm ``save_for_hf`` (config.json with
  ``architecture``). Relative paths are relative to the working directory (the repository root under Snakemake).
- ``pretrain:NAME``: the teacher backbone of the ``pretraining:`` entry NAME (learn/pretrain.py). The workflow, not
  this module, resolves it (``pretrain_spec.pretrained_entry``, checked by ``config.check``) to
  ``local:results/pretrain/NAME/backbone.safetensors`` with the init model's ``arch: timm:...`` and its
  ``mean``/``std``/``pad_to_patch`` (an entry may override those three; ``arch`` and ``pretrained: false`` are
  refused), and gives every job that builds the model that file as an input; so jobs only ever see a ``local:``
  entry here. (This module's code is in every training's fingerprint: kept unchanged, adding the source reran
  nothing.)

Defaults (``DEFAULT_MODELS``, copied into config.yaml)
------------------------------------------------------
- ``vit_b16``: ViT-B/16 pretrained on ImageNet-21k and finetuned on ImageNet-1k. The study loaded
  ``google/vit-base-patch16-224`` through transformers; timm's ``orig_in21k_ft_in1k`` tag is a conversion of the
  same original JAX checkpoint (mean = std = 0.5, as there). ``hf:google/vit-base-patch16-224`` also works here.
- ``dinov2_b14``: ``facebook/dinov2-base`` through transformers.
- ``simclr_r50``: a real SimCLR ResNet-50 (the study's "SimCLR" was in fact a frozen ImageNet ResNet-50). Get the
  official TensorFlow checkpoints from https://github.com/google-research/simclr (v1: ``ResNet50_1x``;
  v2: ``r50_1x_sk0``), convert them to PyTorch with https://github.com/tonylins/simclr-converter (v1:
  ``python convert.py ResNet50_1x/model.ckpt-225206 resnet50-1x.pth``) or
  https://github.com/Separius/SimCLRv2-Pytorch (v2), then to safetensors with timm's key names::

      python -c "from dermcompress.learn.weights import convert_simclr_checkpoint as c; \\
                 c('resnet50-1x.pth', 'models/simclr_r50.safetensors')"

  tonylins' checkpoint uses torchvision's ResNet names, which timm's ``resnet50`` shares, so the conversion only
  unwraps, strips prefixes, drops the supervised ``fc`` head and checks every key against timm's resnet50; other
  layouts (SimCLRv2's, lightly's ``backbone.N``) fail that check with the list of unmatched keys. The SimCLR TF
  models were trained on [0, 1] pixels without mean/std normalisation (tonylins' README and eval.py), hence
  ``mean: [0, 0, 0], std: [1, 1, 1]``.
- ``resnet18_scratch``: ResNet-18, random initialisation.
- ``tiny_vit`` / ``tiny_cnn``: small random-init models for the demo and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dermcompress.errors import ConfigError

SOURCE_KINDS = ("timm", "hf", "local")
ENTRY_KEYS = ("source", "arch", "pretrained", "pad_to_patch", "mean", "std", "description")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


DEFAULT_MODELS: dict[str, dict[str, Any]] = {
    "vit_b16": {
        "source": "timm:vit_base_patch16_224.orig_in21k_ft_in1k",
        "pretrained": True,
        "description": "ViT-B/16, ImageNet-21k pretrained, ImageNet-1k finetuned: the original JAX weights, "
        "as google/vit-base-patch16-224 that the study used through transformers",
    },
    "dinov2_b14": {
        "source": "hf:facebook/dinov2-base",
        "pretrained": True,
        "description": "DINOv2 ViT-B/14 (self-distillation on LVD-142M); class token + mean patch token",
    },
    "simclr_r50": {
        "source": "local:models/simclr_r50.safetensors",
        "arch": "timm:resnet50",
        "pretrained": True,
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "description": "SimCLR v1 ResNet-50 (1x), converted with convert_simclr_checkpoint; unnormalised [0, 1] input",
    },
    "resnet18_scratch": {
        "source": "timm:resnet18",
        "pretrained": False,
        "description": "ResNet-18 from random initialisation: the no-pretraining baseline",
    },
    "tiny_vit": {
        "source": "timm:vit_tiny_patch16_224",
        "pretrained": False,
        "description": "ViT-Ti/16, random initialisation: demo and tests",
    },
    "tiny_cnn": {
        "source": "timm:resnet10t",
        "pretrained": False,
        "description": "ResNet-10-T, random initialisation: demo and tests",
    },
}


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry, validated. `kind` and `ref` split `source` ("timm", "vit_base_patch16_224")."""

    name: str
    source: str
    kind: str
    ref: str
    arch: str | None = None
    pretrained: bool = True
    pad_to_patch: bool = False
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    description: str = ""

    @property
    def is_weight_file(self) -> bool:
        return self.kind == "local" and self.ref.lower().endswith(WEIGHT_FILE_SUFFIXES)


def split_source(value: Any, key: str, *, allowed: tuple[str, ...] = SOURCE_KINDS) -> tuple[str, str]:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(key, f"expected '<{'|'.join(allowed)}>:<name>', got {value!r}")
    kind, ref = value.split(":", 1)
    if kind not in allowed:
        raise ConfigError(
            key, f"unknown source kind {kind!r} in {value!r}; expected one of {', '.join(allowed)}"
        )
    if not ref.strip():
        raise ConfigError(key, f"{value!r} names nothing after '{kind}:'")
    return kind, ref.strip()


def _rgb_triple(value: Any, key: str, *, positive: bool) -> tuple[float, float, float]:
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise ConfigError(key, f"expected 3 numbers (R, G, B), got {value!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise ConfigError(key, f"expected 3 numbers (R, G, B), got {value!r}")
    if positive and min(value) <= 0:
        raise ConfigError(key, f"standard deviations must be > 0, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def parse_spec(name: str, entry: dict) -> ModelSpec:
    """Validate a `models:` entry; every error names its key as `models.<name>.<key>`."""
    where = f"models.{name}"
    if not isinstance(entry, dict):
        raise ConfigError(where, f"expected a mapping with at least 'source', got {type(entry).__name__}")
    for key in entry:
        if key not in ENTRY_KEYS:
            raise ConfigError(f"{where}.{key}", f"unknown key; allowed: {', '.join(ENTRY_KEYS)}")
    if "source" not in entry:
        raise ConfigError(f"{where}.source", "required (timm:NAME, hf:OWNER/NAME or local:PATH)")
    kind, ref = split_source(entry["source"], f"{where}.source")
    for key in ("pretrained", "pad_to_patch"):
        if key in entry and not isinstance(entry[key], bool):
            raise ConfigError(f"{where}.{key}", f"expected true or false, got {entry[key]!r}")
    pretrained = entry.get("pretrained", True)
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{where}.description", f"expected a string, got {description!r}")

    arch = entry.get("arch")
    is_file = kind == "local" and ref.lower().endswith(WEIGHT_FILE_SUFFIXES)
    if arch is not None:
        if not is_file:
            raise ConfigError(
                f"{where}.arch",
                "only a local weights file needs an architecture (timm/hf sources and saved folders carry theirs)",
            )
        split_source(arch, f"{where}.arch", allowed=("timm",))
    elif is_file:
        raise ConfigError(f"{where}.arch", f"required for the weights file {ref!r}: e.g. 'timm:resnet50'")
    if kind == "local" and not pretrained:
        raise ConfigError(
            f"{where}.pretrained",
            "a local source is a set of weights; for random initialisation use its architecture as the source",
        )
    mean = _rgb_triple(entry["mean"], f"{where}.mean", positive=False) if "mean" in entry else None
    std = _rgb_triple(entry["std"], f"{where}.std", positive=True) if "std" in entry else None
    return ModelSpec(
        name=name,
        source=entry["source"],
        kind=kind,
        ref=ref,
        arch=arch,
        pretrained=pretrained,
        pad_to_patch=entry.get("pad_to_patch", False),
        mean=mean,
        std=std,
        description=description,
    )


def effective_input(resolution: int, patch: int | None, *, pad: bool) -> tuple[int, str]:
    """(pixels the backbone sees, "identity" | "crop" | "pad") for a square input of `resolution` px."""
    if not patch or resolution % patch == 0:
        return resolution, "identity"
    if pad:
        return -(-resolution // patch) * patch, "pad"
    if resolution < patch:
        raise ValueError(f"{resolution} px is smaller than one {patch} px patch; use pad_to_patch: true")
    return resolution // patch * patch, "crop"
