"""The training loop of one run, written out once (nanoGPT / timm style): the optimizer and its schedule, the
steps, history rows, validation on schedule, checkpoints and preemption. train.py builds what it runs on and
writes what it leaves.

Optimisation follows the study's Hugging Face Trainer setup: AdamW over the trainable parameters with weight
decay on weight matrices only (biases and norm scales get none, as the Trainer does), a linear or cosine schedule
with warmup, cross-entropy, gradients clipped to a total norm of `max_grad_norm` (the Trainer's default, 1.0;
null: none) over the summed gradient of the whole step (after the all-reduce over ranks, before the step;
`history.csv` logs the norm before clipping). `batch_size` is the global batch; a smaller `micro_batch_size`
splits it for memory and accumulates gradients, with the loss scaled so that the step equals the full-batch
step. Autocast (bf16) on CUDA. Optional flips and quarter turns (`augment`, augment.py) apply to the uint8 batch
on the device. The validation split of the training variant is scored every `eval_every_epochs` epochs
(history.csv's eval rows).

Checkpoints (checkpoints.py) are written at every epoch end and every `checkpoint_every_steps` steps, and on
SIGTERM/SIGINT/SIGUSR1, after which the loop raises Preempted and the retry resumes exactly where it stopped.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dermcompress.data.loader import normalize, step_batches

from . import augment, checkpoints, devices, distributed
from .checkpoints import Preempted
from .inference import predict
from .modes import set_train_mode
from .optim import lr_lambda, param_groups
from .phases import Phases

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
