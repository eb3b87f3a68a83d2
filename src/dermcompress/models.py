"""Backbones by name: a registry entry in config.yaml `models:` -> a classifier ready to finetune.

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

      python -c "from dermcompress.models import convert_simclr_checkpoint as c; \\
                 c('resnet50-1x.pth', 'models/simclr_r50.safetensors')"

  tonylins' checkpoint uses torchvision's ResNet names, which timm's ``resnet50`` shares, so the conversion only
  unwraps, strips prefixes, drops the supervised ``fc`` head and checks every key against timm's resnet50; other
  layouts (SimCLRv2's, lightly's ``backbone.N``) fail that check with the list of unmatched keys. The SimCLR TF
  models were trained on [0, 1] pixels without mean/std normalisation (tonylins' README and eval.py), hence
  ``mean: [0, 0, 0], std: [1, 1, 1]``.
- ``resnet18_scratch``: ResNet-18, random initialisation.
- ``tiny_vit`` / ``tiny_cnn``: small random-init models for the demo and the tests.

Offline clusters
----------------
Compute nodes often have no internet. When weights are not in the Hugging Face cache and the hub is unreachable
(``HF_HUB_OFFLINE=1``, or no connection within a few seconds), ``build_model`` raises ``WeightsUnavailableError``
saying how to fetch them once on a login node and where they are cached (``HF_HOME``); it never waits on retries.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pickle
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torch.nn import functional as F

from dermcompress.config import ConfigError

log = logging.getLogger(__name__)

SOURCE_KINDS = ("timm", "hf", "local")
ENTRY_KEYS = ("source", "arch", "pretrained", "pad_to_patch", "mean", "std", "description")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# Classifier / pooler weights of the pretraining task: the only keys a backbone load may leave unused.
HEAD_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.", "pooler.")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_CONNECT_TIMEOUT_S = 5.0

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


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable from here; the message says how to fetch them."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint that would need unpickling arbitrary objects: refused."""


class WeightsMismatchError(RuntimeError):
    """A checkpoint whose keys do not fit the architecture (beyond the pretraining head)."""


class LoraUnsupportedError(ValueError):
    """The backbone has no attention projections for LoRA to adapt (e.g. a ResNet)."""


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


def _split_source(value: Any, key: str, *, allowed: tuple[str, ...] = SOURCE_KINDS) -> tuple[str, str]:
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
    kind, ref = _split_source(entry["source"], f"{where}.source")
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
        _split_source(arch, f"{where}.arch", allowed=("timm",))
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


# --------------------------------------------------------------------------------------------------------------
# The classifier


def effective_input(resolution: int, patch: int | None, *, pad: bool) -> tuple[int, str]:
    """(pixels the backbone sees, "identity" | "crop" | "pad") for a square input of `resolution` px."""
    if not patch or resolution % patch == 0:
        return resolution, "identity"
    if pad:
        return -(-resolution // patch) * patch, "pad"
    if resolution < patch:
        raise ValueError(f"{resolution} px is smaller than one {patch} px patch; use pad_to_patch: true")
    return resolution // patch * patch, "crop"


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


# --------------------------------------------------------------------------------------------------------------
# Hub access: cached first, never waiting on an unreachable network


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once, at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the hub within `timeout` s? (DNS included, hence the thread.)"""
    from huggingface_hub import constants

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    address = (url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80))
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def _unavailable(what: str, fetch: str, reason: str) -> WeightsUnavailableError:
    cache = hub_cache_dir()
    return WeightsUnavailableError(
        f"{what}: not in the local cache, and not downloadable here ({reason}).\n"
        f"Fetch them once on a machine with internet access (e.g. a login node), with the same HF_HOME:\n"
        f"    HF_HOME={cache.parent} HF_HUB_OFFLINE=0 {fetch}\n"
        f"They are cached under {cache} (HF_HOME={cache.parent}); jobs then load them without network."
    )


def _require_hub(what: str, fetch: str) -> None:
    """Raise WeightsUnavailableError unless downloads can work (not offline, hub reachable)."""
    if hub_offline():
        raise _unavailable(what, fetch, "HF_HUB_OFFLINE is set")
    if not hub_reachable():
        raise _unavailable(
            what,
            fetch,
            f"cannot connect to the Hugging Face hub, gave up after <= {HUB_CONNECT_TIMEOUT_S:g} s",
        )


def _timm_fetch_command(name: str) -> str:
    return f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""


def timm_weights_file(name: str) -> Path:
    """The cached file of timm's pretrained weights for `name` (downloaded first if needed and possible)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise WeightsUnavailableError(
            f"timm has no Hugging Face hub weights for {name!r}; use a local: source with a safetensors file"
        )
    repo, _, revision = cfg.hf_hub_id.partition("@")
    revision = revision or None
    candidates = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    cache = hub_cache_dir()
    for filename in candidates:
        cached = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
    what = f"timm weights for {name} (hub repo {repo})"
    _require_hub(what, _timm_fetch_command(name))
    for filename in candidates:
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=cache, revision=revision))
        except EntryNotFoundError:
            continue
        except Exception as error:  # network or hub failure: say how to get the file, keep the cause
            raise _unavailable(what, _timm_fetch_command(name), f"download failed: {error}") from error
    raise WeightsUnavailableError(f"hub repo {repo} has none of {candidates}")


def hf_snapshot(repo_id: str, *, need_weights: bool) -> Path:
    """A local folder holding the hub repo's config (and weights): the cached snapshot, downloaded if needed."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    patterns = ["*.json", "*.safetensors"] if need_weights else ["*.json"]
    what = f"the {'weights' if need_weights else 'config'} of {repo_id}"
    fetch = f"hf download {repo_id}" + ("" if need_weights else " config.json")

    def complete(folder: Path) -> bool:
        has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
        return (folder / "config.json").is_file() and (has_weights or not need_weights)

    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
        if complete(folder):
            return folder
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        pass
    _require_hub(what, fetch)
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=patterns))
        if (
            not complete(folder) and need_weights
        ):  # repos without safetensors: pickled weights, read weights_only
            folder = Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=["pytorch_model*.bin"]))
    except Exception as error:
        raise _unavailable(what, fetch, f"download failed: {error}") from error
    if not complete(folder):
        raise WeightsUnavailableError(
            f"hub repo {repo_id} has no config.json and weights that transformers reads"
        )
    return folder


# --------------------------------------------------------------------------------------------------------------
# Checkpoint files: safetensors, or torch.load(weights_only=True); never a general unpickle


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from {'state_dict': ...} / {'model': ...} and 'module.' prefixes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        checkpoint: Any = load_file(str(path), device="cpu")
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError) as error:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it pickles objects other than tensors, and unpickling can run "
                "arbitrary code. Extract the tensors where you trust the file (a dict of tensors, saved with "
                "safetensors.torch.save_file) and point the config at the .safetensors file."
            ) from error
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise UnsafeCheckpointError(f"{path} does not hold a flat mapping of tensor names to tensors")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _is_head_key(key: str) -> bool:
    return key.startswith(HEAD_PREFIXES)


def _check_keys(what: str, missing: list[str], unexpected: list[str]) -> None:
    missing = [k for k in missing if not _is_head_key(k)]
    unexpected = [k for k in unexpected if not _is_head_key(k)]
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (f" ... ({len(keys)} in all)" if len(keys) > 12 else "")

        raise WeightsMismatchError(
            f"{what} does not fit the architecture: missing keys [{show(missing)}], "
            f"unexpected keys [{show(unexpected)}] (only pretraining-head keys may be left over)"
        )
    log.info("%s: all backbone keys loaded", what)


def load_timm_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Load into a timm model through timm's own checkpoint filter (resamples ViT position embeddings)."""
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm's convention: the model's module defines it for its pretrained weights
        state_dict = filter_fn(state_dict, model)
    state_dict = {k: v for k, v in state_dict.items() if not _is_head_key(k)}
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise WeightsMismatchError(f"{what} does not fit the architecture: {error}") from error
    _check_keys(what, result.missing_keys, result.unexpected_keys)


# --------------------------------------------------------------------------------------------------------------
# Backbones


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
        _check_keys(what, sorted(info["missing_keys"]), sorted(info["unexpected_keys"]))
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


def _build_backbone(spec: ModelSpec, *, resolution: int, weights: bool) -> _Backbone:
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


def _assemble(spec: ModelSpec, *, num_classes: int, resolution: int, weights: bool) -> Classifier:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    backbone = _build_backbone(spec, resolution=resolution, weights=weights)
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


def build_architecture(spec: ModelSpec, *, num_classes: int, resolution: int) -> Classifier:
    """The same classifier without loading any weights (random init): for counting FLOPs and parameters."""
    return _assemble(spec, num_classes=num_classes, resolution=resolution, weights=False)


# --------------------------------------------------------------------------------------------------------------
# SimCLR checkpoints -> safetensors with timm key names

SIMCLR_PREFIXES = ("module.", "encoder.", "backbone.", "model.", "resnet.", "net.")
SIMCLR_HEAD_PREFIXES = (
    "fc.",
    "head.",
    "projection",
    "proj_head",
    "projector",
    "g.",
    "linear_eval",
    "classifier",
)


def convert_simclr_checkpoint(src: str | Path, dst: str | Path, *, arch: str = "timm:resnet50") -> Path:
    """Convert a torchvision-style SimCLR ResNet checkpoint (e.g. tonylins/simclr-converter's resnet50-1x.pth)
    into a safetensors file with timm's key names, dropping heads; every backbone key is checked against `arch`."""
    import timm
    from safetensors.torch import save_file

    kind, name = _split_source(arch, "arch", allowed=("timm",))
    state = read_state_dict(src)
    cleaned: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for prefix in SIMCLR_PREFIXES:
            key = key.removeprefix(prefix)
        if not key.startswith(SIMCLR_HEAD_PREFIXES):
            cleaned[key] = tensor
    with torch.device("meta"):
        expected = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
    missing = sorted(set(expected) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(cleaned) if expected[k].shape != cleaned[k].shape)
    if missing or unexpected or wrong_shape:
        raise WeightsMismatchError(
            f"{src} does not map onto timm's {name}: missing {missing[:10]}, unexpected {unexpected[:10]}, "
            f"wrong shapes {wrong_shape[:10]} (expected torchvision ResNet names: conv1, bn1, layer1..4)"
        )
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in cleaned.items()},
        str(dst),
        metadata={"converted_from": Path(src).name, "arch": f"{kind}:{name}"},
    )
    log.info("wrote %s: %d tensors for timm %s", dst, len(cleaned), name)
    return dst
