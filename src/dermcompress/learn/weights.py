"""Weights: from the Hugging Face hub cache (never waiting on an unreachable network), from checkpoint files
(safetensors, or torch.load(weights_only=True); never a general unpickle), and SimCLR's converted to timm's
key names.

Offline clusters
----------------
Compute nodes often have no internet. When weights are not in the Hugging Face cache and the hub is unreachable
(``HF_HUB_OFFLINE=1``, or no connection within a few seconds), ``build_model`` raises ``WeightsUnavailableError``
saying how to fetch them once on a login node and where they are cached (``HF_HOME``); it never waits on retries.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from dermcompress.data import integrity

from .registry import split_source

log = logging.getLogger(__name__)

# Classifier / pooler weights of the pretraining task: the only keys a backbone load may leave unused.
HEAD_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.", "pooler.")
HUB_CONNECT_TIMEOUT_S = 5.0


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable from here; the message says how to fetch them."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint that would need unpickling arbitrary objects: refused."""


class WeightsMismatchError(RuntimeError):
    """A checkpoint whose keys do not fit the architecture (beyond the pretraining head)."""


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


def check_keys(what: str, missing: list[str], unexpected: list[str]) -> None:
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
    check_keys(what, result.missing_keys, result.unexpected_keys)


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

    kind, name = split_source(arch, "arch", allowed=("timm",))
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


def save_weights(model: nn.Module, path: str | Path) -> None:
    """The trained model's state dict as safetensors, with its checksum (integrity.py: written whole or not at
    all); evaluate.load_trained verifies it."""
    import safetensors.torch

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    integrity.write_bytes(path, safetensors.torch.save(tensors))
