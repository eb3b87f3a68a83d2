"""Training settings: the defaults every run starts from, and the checks that stop a bad value early.

The `training:` section of config.yaml (and an experiment's overrides, and the grid point) reach a job as one
mapping; `resolve_settings` lays it over DEFAULTS and checks it, so a job never starts with a value that would
fail hours later. The same settings serve the modes that train through the backbone (train.py), frozen features
(features.py) and the probes on them (probes.py).
"""

from __future__ import annotations

import copy
from typing import Any

from . import augment
from .runs import MODES

SCHEDULES = ("linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
# DINOv2's linear evaluation sweeps these 13 learning rates at once (eval/linear.py).
PROBE_LEARNING_RATES = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]

DEFAULTS: dict[str, Any] = {
    "mode": "finetune",
    "lr": 1e-5,
    "epochs": 3,
    "batch_size": 256,
    "micro_batch_size": None,  # None: the whole batch at once
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,  # the Hugging Face Trainer's default; None: no clipping
    "augment": [],  # any of augment.AUGMENTATIONS; the study used none
    "schedule": "linear",
    "warmup_ratio": 0.0,
    "min_lr_ratio": 0.0,  # cosine only: the floor, as a fraction of lr
    "seed": 0,
    "log_every": 1,
    "eval_every_epochs": 1,
    "checkpoint_every_steps": None,  # None: at each epoch end only
    "keep_weights": False,  # True: a run's weights outlive its evaluations
    "freeze_blocks": 0,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "targets": None},
    # Linear probes as DINOv2's: many heads at once on the same feature batches, chosen on val.
    "probe": {
        "learning_rates": PROBE_LEARNING_RATES,
        "iterations": 1000,
        "batch_size": 256,
        "momentum": 0.9,
        "weight_decay": 0.0,
    },
    # kNN as DINOv2's: several k at once, the one scoring best on val kept.
    "knn": {"k": [10, 20, 100, 200], "temperature": 0.07, "weighting": "exp"},
    "precision": "auto",
    "device": "auto",
    "n_bootstrap": 1000,
    "label_fraction": 1.0,  # share of the train split's labels used, as whole groups (subsample.py)
}


def resolve_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """DEFAULTS overlaid with `settings` (nested for lora, probe and knn), checked; unknown keys are errors."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    resolved = copy.deepcopy(DEFAULTS)
    for key, value in settings.items():
        if isinstance(DEFAULTS[key], dict):
            extra = sorted(set(value or {}) - set(DEFAULTS[key]))
            if extra:
                raise ValueError(f"unknown {key} setting(s) {extra}; known: {sorted(DEFAULTS[key])}")
            resolved[key].update(value or {})
        else:
            resolved[key] = value
    if isinstance(resolved["knn"]["k"], int):  # one k, as a list of one
        resolved["knn"]["k"] = [resolved["knn"]["k"]]
    for ok, problem in _checks(resolved):
        if not ok:
            raise ValueError(f"training settings: {problem}")
    try:
        resolved["augment"] = augment.check(resolved["augment"])
    except ValueError as err:
        raise ValueError(f"training settings: {err}") from None
    return resolved


def _checks(s: dict[str, Any]) -> list[tuple[bool, str]]:
    micro = s["micro_batch_size"] or s["batch_size"]
    probe, knn = s["probe"], s["knn"]
    return [
        (s["mode"] in MODES, f"mode must be one of {MODES}, got {s['mode']!r}"),
        (s["schedule"] in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {s['schedule']!r}"),
        (s["precision"] in PRECISIONS, f"precision must be one of {PRECISIONS}, got {s['precision']!r}"),
        (s["epochs"] >= 1, f"epochs must be >= 1, got {s['epochs']}"),
        (s["batch_size"] >= 1 and micro >= 1, "batch_size and micro_batch_size must be >= 1"),
        (
            s["batch_size"] % micro == 0,
            f"micro_batch_size {micro} must divide batch_size {s['batch_size']} (gradient accumulation)",
        ),
        (0 <= s["warmup_ratio"] < 1, f"warmup_ratio must be in [0, 1), got {s['warmup_ratio']}"),
        (0 <= s["min_lr_ratio"] <= 1, f"min_lr_ratio must be in [0, 1], got {s['min_lr_ratio']}"),
        (s["log_every"] >= 1 and s["eval_every_epochs"] >= 1, "log_every and eval_every_epochs must be >= 1"),
        (
            s["checkpoint_every_steps"] is None or s["checkpoint_every_steps"] >= 1,
            "checkpoint_every_steps must be >= 1 or null",
        ),
        (s["freeze_blocks"] >= 0, f"freeze_blocks must be >= 0, got {s['freeze_blocks']}"),
        (
            s["max_grad_norm"] is None or s["max_grad_norm"] > 0,
            f"max_grad_norm must be > 0 or null, got {s['max_grad_norm']}",
        ),
        (0 < s["label_fraction"] <= 1, f"label_fraction must be in (0, 1], got {s['label_fraction']}"),
        (
            len(probe["learning_rates"]) >= 1 and all(lr > 0 for lr in probe["learning_rates"]),
            f"probe.learning_rates must be positive numbers, got {probe['learning_rates']}",
        ),
        (
            probe["iterations"] >= 1 and probe["batch_size"] >= 1,
            "probe.iterations and probe.batch_size must be >= 1",
        ),
        (
            len(knn["k"]) >= 1 and all(k >= 1 for k in knn["k"]),
            f"knn.k must be one or more integers >= 1, got {knn['k']}",
        ),
    ]
