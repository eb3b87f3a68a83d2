"""A `pretraining:` entry (its defaults, checks and outputs) and the models downstream runs build from it; no
torch, so the workflow and `dermcompress plan` read it at start-up (learn/pretrain.py runs the pretraining).

A pretraining's outputs live in results/pretrain/<name>/ (PRETRAIN_DIR). A `models:` entry whose source is
`pretrain:<name>` is that pretraining's teacher backbone: `pretrained_entry` resolves it to the registry entry
of a local weights file (`local:results/pretrain/<name>/backbone.safetensors`) with the init model's timm
architecture and normalisation, which every job loads like any local model.
"""

from __future__ import annotations

import copy
from typing import Any

from dermcompress.errors import ConfigError

from .registry import parse_spec

PRETRAIN_DIR = "results/pretrain/{name}"
# Outside the job's outputs, so Snakemake never deletes it when an attempt fails or is preempted.
PRETRAIN_CHECKPOINT_DIR = "results/checkpoints/pretrain/{name}"
PRETRAIN_FILES = ("backbone.safetensors", "heads.safetensors", "history.csv", "config.json", "pretrain.json")
PRETRAIN_SOURCE = "pretrain:"
# What a `pretraining:` entry holds besides the spec run_pretraining reads: the cached resolution it trains at.
WORKFLOW_KEYS = ("resolution",)

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


def spec_of(entry: dict[str, Any]) -> dict[str, Any]:
    """A `pretraining:` entry as run_pretraining reads it: without the workflow's keys (WORKFLOW_KEYS)."""
    return {k: v for k, v in entry.items() if k not in WORKFLOW_KEYS}


def backbone_file(name: str) -> str:
    """The teacher backbone a pretraining writes (what downstream runs load)."""
    return f"{PRETRAIN_DIR.format(name=name)}/backbone.safetensors"


def pretrained_from(entry: dict[str, Any]) -> str | None:
    """The pretraining a `models:` entry names (`source: pretrain:<name>`), None for any other source."""
    source = entry.get("source", "")
    return source.removeprefix(PRETRAIN_SOURCE) if source.startswith(PRETRAIN_SOURCE) else None


def init_arch(name: str, spec: dict[str, Any], models: dict[str, dict]) -> str:
    """The timm architecture (`timm:NAME`) a pretraining's backbone is saved as: its `arch` when it starts from
    scratch, else its init model's (a timm source, or a local weights file's `arch`)."""
    if spec.get("init", DEFAULT_SPEC["init"]) == "scratch":
        if not spec.get("arch"):
            raise ConfigError(f"pretraining.{name}.arch", "required with init: scratch (timm:NAME)")
        return spec["arch"]
    init = spec["init"]
    if init not in models:
        raise ConfigError(
            f"pretraining.{name}.init",
            f"{init!r} is not a `models:` key (nor scratch); known: {sorted(models)}",
        )
    if pretrained_from(models[init]) is not None:
        raise ConfigError(f"pretraining.{name}.init", f"{init!r} is itself a pretraining's backbone")
    model = parse_spec(init, models[init])
    if model.kind == "timm":
        return f"timm:{model.ref}"
    if model.is_weight_file and model.arch:
        return model.arch
    raise ConfigError(
        f"pretraining.{name}.init",
        f"{init!r} ({model.source}): pretraining starts from timm architectures only (a timm: source or a "
        "local weights file with a timm arch); for DINOv2 use timm:vit_base_patch14_dinov2.lvd142m",
    )


def pretrained_entry(model: str, models: dict[str, dict], pretraining: dict[str, dict]) -> dict[str, Any]:
    """The registry entry a job loads for `model`: its own, or for `source: pretrain:<name>` the pretraining's
    backbone file with the init model's architecture, normalisation and padding."""
    entry = models[model]
    name = pretrained_from(entry)
    if name is None:
        return entry
    if name not in pretraining:
        raise ConfigError(
            f"models.{model}.source", f"no pretraining named {name!r}; known: {sorted(pretraining)}"
        )
    spec = pretraining[name]
    init = models.get(spec.get("init", "scratch"), {})
    resolved = {"source": f"local:{backbone_file(name)}", "arch": init_arch(name, spec, models)}
    resolved |= {k: init[k] for k in ("pad_to_patch", "mean", "std") if k in init}
    resolved |= {k: entry[k] for k in ("pad_to_patch", "mean", "std", "description") if k in entry}
    return resolved
