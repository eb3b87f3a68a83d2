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

import copy
import logging
from pathlib import Path
from typing import Any

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
from .registry import parse_spec

log = logging.getLogger(__name__)

METHODS = ("dino",)

# One `pretraining:` entry's defaults (the DINO paper's ViT recipe unless said otherwise). A key per line:
DEFAULT_SPEC: dict[str, Any] = {
    # init: a `models:` key (its registry entry is passed as init_entry), or "scratch" (random init of `arch`)
    "init": "scratch",
    # arch: only for init "scratch": the architecture, timm:NAME (a registry source), e.g. timm:vit_tiny_patch16_224
    "arch": None,
    # method: the self-supervised objective; dino only for now
    "method": "dino",
    # adaptation.kind: full | freeze_blocks (stem and first `blocks` blocks frozen) | lora (r, alpha, dropout,
    # targets: null = the model's attention projections); LoRA is merged into the saved weights
    "adaptation": {"kind": "full", "blocks": 0, "r": 4, "alpha": 16, "dropout": 0.1, "targets": None},
    # variants: cached variants to read (train split); the first is the teacher's; several: compression-aware
    "variants": ["clean"],
    # epochs: passes over the pretraining images; steps: if set, the run's length in optimiser steps instead
    "epochs": 100,
    "steps": None,
    # batch_size: the global batch (images per optimiser step); micro_batch_size: split for memory (null: whole)
    "batch_size": 64,
    "micro_batch_size": None,
    # lr: peak AdamW learning rate after warmup_epochs of linear warm-up, then cosine down to min_lr
    "lr": 5e-4,
    "min_lr": 1e-6,
    "warmup_epochs": 10,
    # weight_decay: AdamW's, on weight matrices only (as training); clip_grad: max gradient norm (null: none)
    "weight_decay": 0.04,
    "clip_grad": 3.0,
    # freeze_last_layer_epochs: the head's last layer stays fixed this many epochs (DINO: 1)
    "freeze_last_layer_epochs": 1,
    # out_dim, hidden_dim, bottleneck_dim: the DINO projection head (lightly DINOProjectionHead)
    "out_dim": 65536,
    "hidden_dim": 2048,
    "bottleneck_dim": 256,
    # teacher_temp: sharpening of the teacher, warmed up linearly from warmup_teacher_temp over
    # warmup_teacher_temp_epochs; student_temp: the student's
    "teacher_temp": 0.04,
    "warmup_teacher_temp": 0.04,
    "warmup_teacher_temp_epochs": 0,
    "student_temp": 0.1,
    # momentum: the teacher's EMA momentum at step 0, cosine up to 1.0 at the end
    "momentum": 0.996,
    # center_momentum: the centre's moving average, updated once per optimiser step
    "center_momentum": 0.9,
    # global_crops / local_crops: n views per image, size in px (null: what the model sees at the cached
    # resolution; locals: 3/7 of it, DINO's 96/224), area fraction range `scale`; sizes are patch multiples
    "global_crops": {"n": 2, "size": None, "scale": [0.4, 1.0]},
    "local_crops": {"n": 8, "size": None, "scale": [0.1, 0.4]},
    # flip: random horizontal flips; jitter: brightness/contrast/saturation factors 1 +- x with probability p,
    # then grayscale with probability `grayscale` (DINO's; null: no colour augmentation)
    "flip": True,
    "jitter": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "grayscale": 0.2},
    # knn_every: epochs between kNN monitor measurements (also at step 0 and at the end); knn_k: neighbours;
    # knn_holdout: fraction of the train groups held out of pretraining as kNN queries (0: no kNN monitor)
    "knn_every": 1,
    "knn_k": 20,
    "knn_holdout": 0.1,
    # stop_on_knn_drop: stop when the kNN accuracy falls more than this many points below step 0's (null: never)
    "stop_on_knn_drop": 10.0,
    # collapse: thresholds of the collapse monitors (collapse.py), fired after `patience` consecutive steps;
    # entropies as fractions of log(out_dim), std_l2 times sqrt(dim); stop: end the job when one fires
    "collapse": {
        "teacher_entropy_max": 0.95,
        "batch_entropy_min": 0.05,
        "std_l2_min": 0.02,
        "patience": 20,
        "stop": True,
    },
    # seed: model init, heads, crops, variant draws, batch order, held-out groups
    "seed": 0,
    # log_every: steps between progress lines; checkpoint_every_steps: besides each epoch end (null: none)
    "log_every": 10,
    "checkpoint_every_steps": None,
    # precision: auto (bf16 autocast on a GPU) | fp32 | bf16; device: auto | cpu | cuda
    "precision": "auto",
    "device": "auto",
}


def resolve_spec(spec: dict[str, Any], name: str = "?") -> dict[str, Any]:
    """DEFAULT_SPEC overlaid with `spec` (nested mappings key by key), checked; errors name the key."""
    where = f"pretraining.{name}"
    resolved = copy.deepcopy(DEFAULT_SPEC)
    for key, value in spec.items():
        if key not in DEFAULT_SPEC:
            raise ConfigError(f"{where}.{key}", f"unknown key; known: {', '.join(sorted(DEFAULT_SPEC))}")
        if isinstance(DEFAULT_SPEC[key], dict) and value is not None:
            extra = sorted(set(value) - set(DEFAULT_SPEC[key]))
            if extra:
                raise ConfigError(
                    f"{where}.{key}.{extra[0]}", f"unknown key; known: {sorted(DEFAULT_SPEC[key])}"
                )
            resolved[key].update(value)
        else:
            resolved[key] = value
    s = resolved
    micro = s["micro_batch_size"] or s["batch_size"]
    checks = [
        ("method", s["method"] in METHODS, f"must be one of {METHODS}"),
        (
            "adaptation.kind",
            s["adaptation"]["kind"] in ("full", "freeze_blocks", "lora"),
            "full|freeze_blocks|lora",
        ),
        (
            "arch",
            (s["init"] == "scratch") == (s["arch"] is not None),
            "required with init: scratch, else not",
        ),
        ("variants", isinstance(s["variants"], list) and len(s["variants"]) >= 1, "a list of >= 1 variants"),
        ("epochs", s["epochs"] >= 1, "must be >= 1"),
        ("steps", s["steps"] is None or s["steps"] >= 1, "must be >= 1 or null"),
        (
            "batch_size",
            s["batch_size"] >= 1 and micro >= 1 and s["batch_size"] % micro == 0,
            "batch_size >= 1, divisible by micro_batch_size",
        ),
        (
            "global_crops.n",
            s["global_crops"]["n"] >= 1 and s["global_crops"]["n"] + s["local_crops"]["n"] >= 2,
            "at least one global crop and two views in all",
        ),
        (
            "teacher_temp",
            s["teacher_temp"] > 0 and s["warmup_teacher_temp"] > 0 and s["student_temp"] > 0,
            "temperatures must be > 0",
        ),
        ("momentum", 0 <= s["momentum"] <= 1 and 0 <= s["center_momentum"] <= 1, "momenta in [0, 1]"),
        ("knn_holdout", 0 <= s["knn_holdout"] < 1, "must be in [0, 1)"),
        ("collapse.patience", s["collapse"]["patience"] >= 1, "must be >= 1"),
    ]
    for key, ok, problem in checks:
        if not ok:
            raise ConfigError(f"{where}.{key}", problem)
    return s


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
