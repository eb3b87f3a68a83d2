"""Domain self-supervised pretraining (DINO first): a registry model (or a random-init architecture) and the
train split of one or more cached variants in; a teacher backbone that loads like any other model out.

run_pretraining builds the student from the init model exactly as a training builds a model (models.py, at the
cached resolution), adapts it (adaptation.py: full, frozen blocks, or LoRA merged when saved), checks that every
image it will see is in a train group (pretrain_data.py), and runs the DINO loop (dino.py) with seeded on-device
multi-crop views (crops.py), collapse monitors and a kNN monitor on held-out train groups (collapse.py), resumable
checkpoints and DDP as training has them (checkpoints.py, distributed.py: each step the same global batch and
micro batches as one process, gradients summed over the ranks, rank 0 writes).

Compression-aware pretraining: with several `variants`, the teacher's global views come from the first variant
of an image and all the student's views from a variant drawn per image per step (seeded), with the same crop
boxes: the student learns to map what transmission did to an image onto what the clean image shows.

Outputs in out_dir (each written atomically with its sha256 sidecar, data/integrity.py):
    backbone.safetensors   the teacher backbone, LoRA merged, with the timm key names of the init architecture:
                           registry entry `{source: local:<out_dir>/backbone.safetensors, arch: timm:<arch>}`
                           (pretrain.json's `registry_entry`) loads it at any resolution
    heads.safetensors      student and teacher DINO heads and the centre (to continue later)
    history.csv            one row per step (HISTORY_COLUMNS); step 0 and every knn_every epochs a kNN accuracy
    config.json            the resolved spec, the init model, the data (caches, splits and their checksums)
    pretrain.json          cost and outcome: steps, images, image passes, seconds per phase, img/s, peak memory,
                           monitors fired, and why it stopped
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from dermcompress.data import integrity
from dermcompress.errors import ConfigError

from . import checkpoints, devices, distributed, models
from .checkpoints import CHECKPOINT
from .modes import count_m
from .phases import Phases
from .pretrain_spec import DEFAULT_SPEC, METHODS, resolve_spec  # noqa: F401  (re-exported)
from .registry import parse_spec

log = logging.getLogger(__name__)


def _init_entry(name: str, spec: dict, init_entry: dict | None) -> tuple[str, dict]:
    """The registry name and entry of the initial model (a random-init `arch` for scratch)."""
    if spec["init"] == "scratch":
        return f"pretraining.{name}.arch", {"source": spec["arch"], "pretrained": False}
    if init_entry is None:
        raise ConfigError(
            f"pretraining.{name}.init", f"{spec['init']!r} needs its registry entry (init_entry)"
        )
    return spec["init"], init_entry


def _arch(init_name: str, entry: dict) -> str:
    """The timm architecture the saved backbone is loaded as (its registry `arch`)."""
    spec = parse_spec(init_name, entry)
    if spec.kind == "timm":
        return f"timm:{spec.ref}"
    if spec.is_weight_file:
        return spec.arch
    config = Path(spec.ref) / "config.json"
    if config.is_file() and "architecture" in (cfg := integrity.read_json(config)):
        return f"timm:{cfg['architecture']}"
    raise ConfigError(
        f"models.{init_name}.source",
        "pretraining starts from timm architectures only for now (timm:, a local weights file with a timm arch, "
        "or a timm save_for_hf folder); for DINOv2 use timm:vit_base_patch14_dinov2.lvd142m",
    )


def _crop_sizes(s: dict, model: nn.Module, where: str) -> tuple[int, int]:
    from . import dino

    patch = dino.patch_size(model.backbone) or 1
    g = s["global_crops"]["size"] or model.effective_input_px
    loc = s["local_crops"]["size"] or max(patch, round(g * 3 / 7 / patch) * patch)
    for key, size in (("global_crops.size", g), ("local_crops.size", loc)):
        if size % patch:
            raise ConfigError(
                f"{where}.{key}", f"{size} px is not a multiple of the model's {patch} px patch"
            )
    return g, loc


def run_pretraining(
    *,
    name: str,
    spec: dict,
    init_entry: dict | None,
    caches: dict[str, str],
    splits: str,
    out_dir: str,
    checkpoint_dir: str,
    resolution: int,
) -> dict:
    """Pretrain per `spec` (one `pretraining:` entry; resolve_spec fills the defaults) on the train split of
    the caches of its variants ({variant: cache dir} at `resolution`); write out_dir's files (module
    docstring); return pretrain.json's summary. Raises LeakageError before any step if an image is not in a
    train group of `splits`, CollapseError when a monitor fires (collapse.stop), Preempted after
    checkpointing on SIGTERM/SIGINT/SIGUSR1. Under torchrun every rank calls this; rank 0 writes and returns
    the summary, the others return {}."""
    # lightly (and torchvision, peft): imported by a pretraining's work only, never at a job's start-up
    from . import adaptation, dino, pretrain_data
    from .collapse import CollapseError, Monitors
    from .pretrain_loop import HISTORY_COLUMNS, Pretraining

    phases = Phases.from_process_start()
    s = resolve_spec(spec, name)
    where = f"pretraining.{name}"
    missing = [v for v in s["variants"] if v not in caches]
    if missing:
        raise ConfigError(f"{where}.variants", f"no cache given for {missing} (caches: {sorted(caches)})")
    caches = {v: str(caches[v]) for v in s["variants"]}
    out_dir, ckpt_path = Path(out_dir), Path(checkpoint_dir) / CHECKPOINT
    device = distributed.local_device(devices.resolve_device(s["device"]))
    distributed.init(device)
    precision = devices.resolve_precision(s["precision"], device)
    autocast = devices.autocast_for(device, precision)
    init_name, entry = _init_entry(name, s, init_entry)
    arch = _arch(init_name, entry)
    with phases("setup"):
        data = pretrain_data.load(caches, splits, holdout=s["knn_holdout"], seed=s["seed"])
        student = models.build_seeded(init_name, entry, num_classes=1, resolution=resolution, seed=s["seed"])
        student.head = nn.Identity()  # DINO's head replaces the classifier's
        dino.allow_any_input_size(student.backbone)
        g_size, l_size = _crop_sizes(s, student, where)
        student = adaptation.adapt(student, s["adaptation"])
        torch.manual_seed(s["seed"])  # the heads' initial weights
        model = dino.DINO(student, s).to(device)
        distributed.broadcast_model(model)
        identity = checkpoints.identity(
            __name__,
            name=name,
            spec=s,
            init=entry,
            resolution=resolution,
            data=pretrain_data.cache_identity(caches),
            splits=pretrain_data.splits_identity(splits),
        )
        run = Pretraining(model, s, data, (g_size, l_size), ckpt_path, identity, device, autocast)
        run.resume()
    log.info(
        "pretraining %s: %s from %s (%s) on %s (%s), %d px views %d x %d + %d x %d, %.2fM of %.2fM parameters train",
        name,
        s["method"],
        init_name,
        s["adaptation"]["kind"],
        device,
        precision,
        resolution,
        s["global_crops"]["n"],
        g_size,
        s["local_crops"]["n"],
        l_size,
        count_m(model.student.parameters(), trainable_only=True),
        count_m(model.student.parameters()),
    )
    run.run(phases, Monitors(s["collapse"], run.state["monitors"]))
    if not distributed.is_main():
        return {}
    st = run.state
    config = {
        "name": name,
        "spec": s,
        "init": {"name": init_name, "entry": entry, "arch": arch},
        "resolution": resolution,
        "crop_sizes": {"global": g_size, "local": l_size},
        "data": {
            "caches": caches,
            "train_shards_sha256": pretrain_data.cache_identity(caches),
            "splits": str(splits),
            "splits_sha256": pretrain_data.splits_identity(splits),
            "pretrain_images": len(data.train[0]),
            "train_groups": data.n_groups,
            "knn_held_out_groups": data.held_out_groups,
            "knn_held_out_images": 0 if data.held_out is None else len(data.held_out),
        },
        "device": str(device),
        "precision": precision,
        "world_size": distributed.world_size(),
        "versions": _versions(),
    }
    backbone_path = out_dir / "backbone.safetensors"
    registry_entry = {
        "source": f"local:{backbone_path}",
        "arch": arch,
        "mean": list(model.teacher.mean),
        "std": list(model.teacher.std),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with phases("writing"):
        integrity.write_json(out_dir / "config.json", config, default=str)
        history = pd.DataFrame(st["history"], columns=list(HISTORY_COLUMNS))
        integrity.write_text(out_dir / "history.csv", history.to_csv(index=False))
        if not st["stopped"]:
            save_backbone(adaptation.merged(model.teacher).backbone, backbone_path, arch)
            save_heads(model, out_dir / "heads.safetensors")
    summary = _summary(run, s, data, registry_entry, config, phases)
    integrity.write_json(out_dir / "pretrain.json", summary)  # last: it holds the timings
    checkpoints.remove(ckpt_path)
    phases.log()
    if st["stopped"] and s["collapse"]["stop"]:
        raise CollapseError(f"pretraining {name} stopped: {st['stopped']} (see {out_dir / 'pretrain.json'})")
    return summary


def _versions() -> dict[str, str]:
    import lightly
    import timm

    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "lightly": lightly.__version__,
        "timm": timm.__version__,
    }


def save_backbone(backbone: nn.Module, path: Path, arch: str) -> None:
    """The backbone's state dict (timm key names) as safetensors, with its checksum."""
    import safetensors.torch

    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    integrity.write_bytes(path, safetensors.torch.save(tensors, metadata={"arch": arch, "format": "pt"}))


def save_heads(model: nn.Module, path: Path) -> None:
    """Student and teacher heads and the centre: what continuing the pretraining needs besides the backbone."""
    import safetensors.torch

    tensors = {
        **{f"student_head.{k}": v for k, v in model.student_head.state_dict().items()},
        **{f"teacher_head.{k}": v for k, v in model.teacher_head.state_dict().items()},
        "center": model.loss.center,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    integrity.write_bytes(path, safetensors.torch.save(tensors))


def _summary(run, s: dict, data, registry_entry: dict, config: dict, phases: Phases) -> dict:
    st = run.state
    n_views = s["global_crops"]["n"] * 2 + s["local_crops"]["n"]  # teacher globals + student globals + locals
    return {
        "steps": st["step"],
        "epochs": st["step"] / run.steps_per_epoch,
        "images_seen": st["images"],
        "image_passes": st["images"] * n_views,
        "passes_per_image": {
            "teacher_global": s["global_crops"]["n"],
            "student_global": s["global_crops"]["n"],
            "student_local": s["local_crops"]["n"],
        },
        "crop_sizes": config["crop_sizes"],
        "pretrain_images": len(data.train[0]),
        "train_seconds": st["seconds"],
        "img_per_s": st["images"] / st["seconds"] if st["seconds"] > 0 else None,
        "peak_mem_mb": st["peak_mem_mb"],
        "knn": st["knn"],
        "monitors_fired": st["monitors"]["fired"],
        "stopped": st["stopped"] or "completed",
        "registry_entry": None if st["stopped"] else registry_entry,
        "device": config["device"],
        "precision": config["precision"],
        "world_size": config["world_size"],
        "wall_seconds": phases.summary(),
    }
