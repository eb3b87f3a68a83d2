"""One training run through the backbone (finetune, freeze_blocks, lora): a model and a cache in; weights,
history, config and training costs out. Evaluation is its own job (evaluate.py); linear probes and kNN train on
frozen features (probes.py).

The loop is written out once (nanoGPT / timm style). Optimisation follows the study's Hugging Face Trainer setup:
AdamW over the trainable parameters with weight decay on weight matrices only (biases and norm scales get none,
as the Trainer does), a linear or cosine schedule with warmup, cross-entropy, gradients clipped to a total norm
of `max_grad_norm` (the Trainer's default, 1.0; null: none) over the summed gradient of the whole step (after the
all-reduce over ranks, before the step; `history.csv` logs the norm before clipping). `batch_size` is the global
batch; a smaller `micro_batch_size` splits it for memory and accumulates gradients, with the loss scaled so that
the step equals the full-batch step. Autocast (bf16) on CUDA. Optional flips and quarter turns (`augment`,
augment.py) apply to the uint8 batch on the device. The validation split of the training variant is scored every
`eval_every_epochs` epochs (history.csv's eval rows).

Checkpoints (checkpoints.py) are written at every epoch end and every `checkpoint_every_steps` steps, and on
SIGTERM/SIGUSR1, after which the run raises Preempted and the retry resumes exactly where it stopped. A finished
run writes its weights and deletes its checkpoint.

On N GPUs the job runs this under torchrun, one process per GPU (distributed.py): every step takes the same
global batch and micro batches as one process would, dealt to the ranks, with the gradients summed over them;
rank 0 writes the checkpoint and the outputs. Without torchrun it is one process, on one GPU or the CPU.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import augment, cache, checkpoints, devices, distributed, flops, models, subsample, weights
from .checkpoints import CHECKPOINT, Preempted
from .inference import predict
from .loader import make_loader, normalize, step_batches
from .modes import count_m, prepare_mode, set_train_mode
from .optim import lr_lambda, param_groups
from .phases import Phases
from .runs import HISTORY_COLUMNS
from .settings import resolve_settings

log = logging.getLogger(__name__)


class Loop:
    """The optimizer, schedule and state of one training, and the steps, logging and checkpoints of it."""

    def __init__(self, model: nn.Module, s: dict, loader, ckpt_path: Path, identity: str, device) -> None:
        self.model, self.s, self.loader, self.device = model, s, loader, device
        self.ckpt_path, self.identity = ckpt_path, identity
        self.steps_per_epoch = math.ceil(len(loader.dataset) / s["batch_size"])
        self.total_steps = self.steps_per_epoch * s["epochs"]
        warmup = math.ceil(s["warmup_ratio"] * self.total_steps)
        self.optimizer = torch.optim.AdamW(param_groups(model, s["weight_decay"]), lr=s["lr"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(s["schedule"], self.total_steps, warmup, s["min_lr_ratio"])
        )
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.state: dict[str, Any] = {
            "step": 0,
            "epoch": 0,
            "batches_done": 0,  # global batches (optimizer steps) of `epoch` already trained on
            "history": [],
            "window": [0.0, 0.0, 0],  # sums of step losses and gradient norms, and steps, since the last row
            "seconds": 0.0,
            "images": 0,
            "peak_mem_mb": None,
        }

    def resume(self) -> None:
        """Continue from the checkpoint, if there is one of this very run and code."""
        state = checkpoints.restore(self.ckpt_path, self.identity, self.model, self.optimizer, self.scheduler)
        if state is not None:
            self.state = state

    def checkpoint(self) -> None:
        checkpoints.write(
            self.ckpt_path, self.identity, self.model, self.optimizer, self.scheduler, self.state
        )

    def step(self, step_size: int, micro_batches, forward, flag: dict) -> None:
        """One optimizer step over this rank's micro batches of a global batch of `step_size` images."""
        step_loss = torch.zeros((), device=self.device)
        for batch in micro_batches:
            # Sum over the micro batch / size of the whole step: the summed gradient is the mean.
            y = batch["labels"].to(self.device)
            loss = F.cross_entropy(forward(batch).float(), y, reduction="sum") / step_size
            loss.backward()
            step_loss += loss.detach()
        distributed.all_reduce_gradients(self.model.parameters())
        # On the summed gradient of the whole step (every rank holds the same one), before the step.
        max_norm = self.s["max_grad_norm"] or math.inf  # inf: measure the norm, clip nothing
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm).item()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        distributed.sync_buffers(self.model)
        # One exchange per step: the step's loss over all ranks, and whether any rank was signalled.
        loss_sum, signalled = distributed.sum_over_ranks(
            [step_loss.item(), bool(flag["signal"])], self.device
        )
        flag["signal"] = flag["signal"] or ("a signal to another rank" if signalled else None)
        st = self.state
        st["step"] += 1
        st["batches_done"] += 1
        st["images"] += step_size
        window = st["window"]
        window[0], window[1], window[2] = window[0] + loss_sum, window[1] + grad_norm, window[2] + 1
        if st["step"] % self.s["log_every"] == 0:
            self.log_row(lr)

    def log_row(self, lr: float) -> None:
        """A history row: the mean loss and gradient norm over the steps since the last one."""
        st, (loss, norm, n) = self.state, self.state["window"]
        st["window"] = [0.0, 0.0, 0]
        row = {"step": st["step"], "epoch": st["step"] / self.steps_per_epoch, "lr": lr}
        st["history"].append({**row, "train_loss": loss / n, "grad_norm": norm / n})
        log.info(
            "step %d/%d lr %.3g train_loss %.4f grad_norm %.3g",
            st["step"],
            self.total_steps,
            lr,
            loss / n,
            norm / n,
        )

    def validate(self, epoch: int, val_loader, autocast) -> None:
        """Score the validation split after `epoch` epochs (a history row)."""
        result = predict(self.model, val_loader, device=self.device, autocast=autocast)
        row = {"step": self.state["step"], "epoch": float(epoch), "eval_loss": result["loss"]}
        self.state["history"].append({**row, "eval_accuracy": result["accuracy"]})
        log.info("epoch %d: eval_loss %.4f eval_accuracy %.4f", epoch, result["loss"], result["accuracy"])

    def account(self, start: float) -> None:
        """Add the training time since `start` and the peak memory so far to the run's totals."""
        devices.sync(self.device)
        self.state["seconds"] += time.perf_counter() - start
        peak = devices.peak_mb(self.device)
        if peak is not None:
            self.state["peak_mem_mb"] = max(peak, self.state["peak_mem_mb"] or 0.0)


def train(loop: Loop, val_loader, *, autocast, phases: Phases) -> None:
    """Every remaining epoch of `loop`, validating on schedule; raises Preempted after checkpointing on a signal."""
    s, st, model = loop.s, loop.state, loop.model
    draws = None  # this epoch's augmentation draws, per dataset row (augment.py)

    def forward(batch) -> torch.Tensor:
        pixels = batch["pixels"].to(loop.device, non_blocking=True)
        if draws is not None:
            pixels = augment.apply(pixels, draws[batch["index"]])
        with autocast():
            return model(normalize(pixels, model.mean, model.std))

    devices.reset_peak(loop.device)
    bar = tqdm(total=loop.total_steps, initial=st["step"], desc="train", unit="step", mininterval=5)
    with checkpoints.preemption_flag() as flag, bar:
        for epoch in range(st["epoch"], s["epochs"]):
            start = time.perf_counter()
            loop.loader.set_epoch(epoch)
            if s["augment"]:
                draws = augment.epoch_draws(len(loop.loader.dataset), s["seed"], epoch, s["augment"])
            set_train_mode(model)
            steps = step_batches(
                loop.loader, s["batch_size"], rank=distributed.rank(), world_size=distributed.world_size()
            )
            with phases("train"):
                for step_size, micro_batches in itertools.islice(steps, st["batches_done"], None):
                    loop.step(step_size, micro_batches, forward, flag)
                    bar.update()
                    every = s["checkpoint_every_steps"]
                    if flag["signal"] or (every and st["step"] % every == 0):
                        loop.account(start)
                        loop.checkpoint()
                        start = time.perf_counter()
                    if flag["signal"]:
                        raise Preempted(
                            f"{flag['signal']} at step {st['step']}: checkpoint saved to {loop.ckpt_path}"
                        )
                loop.account(start)
            if (epoch + 1) % s["eval_every_epochs"] == 0 or epoch + 1 == s["epochs"]:
                with phases("validate"):
                    loop.validate(epoch + 1, val_loader, autocast)
            st["epoch"], st["batches_done"] = epoch + 1, 0
            loop.checkpoint()
            if distributed.sum_over_ranks([bool(flag["signal"])], loop.device)[0]:
                flag["signal"] = flag["signal"] or "a signal to another rank"
            if flag["signal"]:
                raise Preempted(
                    f"{flag['signal']} after epoch {epoch + 1}: checkpoint saved to {loop.ckpt_path}"
                )


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
    SIGTERM/SIGUSR1.

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
    (run_dir / "train.json").write_text(json.dumps(summary, indent=2) + "\n")  # last: it holds the timings
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
    (run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
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
