"""One training run through the backbone (finetune, freeze_blocks, lora): a model and a cache in; weights,
history, config and training costs out. Evaluation is its own job (evaluate.py); linear probes and kNN train on
frozen features (probes.py).

run_training builds what the loop (loop.py) runs on: the seeded model prepared for its mode, the train loader
(a label fraction takes whole lesion groups, subsample.py), the validation loader of the training variant, and
the run's identity, which a checkpoint must match to be resumed (checkpoints.py). Then it runs the loop and
writes the weights (safetensors), config.json, history.csv and train.json (cost figures and where the job's wall
time went: setup, train, validate, writing), and deletes the run's checkpoint.

On N GPUs the job runs this under torchrun, one process per GPU (distributed.py): every step takes the same
global batch and micro batches as one process would, dealt to the ranks, with the gradients summed over them;
rank 0 writes the checkpoint and the outputs. Without torchrun it is one process, on one GPU or the CPU.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from dermcompress.data import cache, integrity, subsample
from dermcompress.data.loader import make_loader

from . import checkpoints, devices, distributed, flops, models, weights
from .checkpoints import CHECKPOINT
from .loop import Loop, train
from .modes import count_m, prepare_mode
from .phases import Phases
from .runs import HISTORY_COLUMNS
from .settings import resolve_settings

log = logging.getLogger(__name__)


def run_training(
    *,
    model_name: str,
    model_entry: dict,
    train_cache: str,
    run_dir: str,
    checkpoint_dir: str,
    settings: dict,
    resolution: int,
    splits: str,
    weights_path: str,
) -> dict:
    """Train one model per `settings` (a mode that trains through the backbone) on the train split of
    `train_cache`; write config.json, history.csv and train.json into run_dir, and the trained weights to
    `weights_path`; return the training summary (train.json). Raises Preempted after checkpointing on
    SIGTERM/SIGINT/SIGUSR1.

    `splits`: the splits table, for label fractions (whole lesion groups). Under torchrun every rank calls
    this (distributed.py); rank 0 alone writes files and returns the summary, the others return {}."""
    phases = Phases.from_process_start()
    s = resolve_settings(settings)
    run_dir, ckpt_path = Path(run_dir), Path(checkpoint_dir) / CHECKPOINT
    device = distributed.local_device(devices.resolve_device(s["device"]))
    distributed.init(device)  # under torchrun: join the other ranks (distributed.py); else nothing
    precision = devices.resolve_precision(s["precision"], device)
    autocast = devices.autocast_for(device, precision)
    classes = list(cache.load_info(train_cache)["classes"])
    with phases("setup"):
        model, costs = _build(model_name, model_entry, s, classes, resolution, device)
        micro = s["micro_batch_size"] or math.ceil(s["batch_size"] / distributed.world_size())
        train_ids = subsample.train_subset(splits, s["label_fraction"], s["seed"])  # None: all of them
        loader = make_loader(
            train_cache, "train", batch_size=micro, shuffle=True, seed=s["seed"], image_ids=train_ids
        )
        val_loader = make_loader(
            train_cache, _val_split(train_cache), batch_size=micro, shuffle=False, seed=0
        )
        identity = checkpoints.identity(
            __name__,
            model=model_name,
            model_entry=model_entry,
            resolution=resolution,
            settings={k: v for k, v in s.items() if k != "n_bootstrap"},
            train_data=checkpoints.data_fingerprint(train_cache),
        )
        loop = Loop(model, s, loader, ckpt_path, identity, device)
        loop.resume()
    log.info("run %s: %s on %s (%s), mode %s", run_dir, model_name, device, precision, s["mode"])
    train(loop, val_loader, autocast=autocast, phases=phases)
    if not distributed.is_main():  # training is done; rank 0 writes for the job
        return {}
    config = {
        "model": model_name,
        "model_entry": model_entry,
        "resolution": resolution,
        "train_cache": str(train_cache),
        "classes": classes,
        "checkpoint": str(ckpt_path),
        "settings": s,
        "device": str(device),
        "precision": precision,
        "world_size": distributed.world_size(),
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
    }
    with phases("writing"):
        _write_outputs(run_dir, weights_path, loop, config)
    checkpoints.remove(ckpt_path)  # the run is complete: its checkpoint would only go stale
    summary = _summary(loop, costs, config, phases)
    integrity.write_json(run_dir / "train.json", summary)  # last: it holds the timings
    phases.log()
    return summary


def _build(model_name, model_entry, s, classes, resolution, device) -> tuple[nn.Module, dict[str, Any]]:
    """The seeded model, prepared for its mode, on `device`; and its cost figures."""
    model = models.build_seeded(
        model_name, model_entry, num_classes=len(classes), resolution=resolution, seed=s["seed"]
    )
    # Cost figures of the architecture as deployed (LoRA adapters can be merged into the weights).
    costs = {
        "gmacs": flops.count_gmacs(model, resolution),
        "params_m": count_m(model.parameters()),
        "effective_input_px": model.effective_input_px,
    }
    model = prepare_mode(model, s).to(device)
    distributed.broadcast_model(model)
    costs["trainable_params_m"] = count_m(model.parameters(), trainable_only=True)
    log.info(
        "%.2fM parameters, %.3fM trainable, %.3f GMACs at %d px",
        costs["params_m"],
        costs["trainable_params_m"],
        costs["gmacs"],
        resolution,
    )
    return model, costs


def _val_split(cache_dir: str | Path) -> str:
    if "val" in cache.load_info(cache_dir)["rows"]:
        return "val"
    log.warning("%s has no val split: per-epoch evaluation uses the test split", cache_dir)
    return "test"


def _write_outputs(run_dir: Path, weights_path: str, loop: Loop, config: dict[str, Any]) -> None:
    """The weights, config.json and history.csv of a finished run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    weights.save_weights(loop.model, weights_path)
    integrity.write_json(run_dir / "config.json", config, default=str)
    history = pd.DataFrame(loop.state["history"], columns=list(HISTORY_COLUMNS))
    history.to_csv(run_dir / "history.csv", index=False)


def _summary(loop: Loop, costs: dict, config: dict, phases: Phases) -> dict[str, Any]:
    """train.json: the architecture's cost figures, what training cost, and where the job's time went."""
    st = loop.state
    return {
        **costs,
        "peak_train_mem_mb": st["peak_mem_mb"],
        "train_img_per_s": st["images"] / st["seconds"] if st["seconds"] > 0 else None,
        "train_images": st["images"],
        "train_seconds": st["seconds"],
        "steps": st["step"],
        "mode": config["settings"]["mode"],
        "device": config["device"],
        "precision": config["precision"],
        "world_size": config["world_size"],
        "wall_seconds": phases.summary(),
    }
