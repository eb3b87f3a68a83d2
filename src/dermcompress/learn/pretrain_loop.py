"""The DINO pretraining loop of one run (pretrain.py builds what it runs on and writes what it leaves): the
optimizer and schedules, the steps over seeded multi-crop views (crops.py), the collapse and kNN monitors
(collapse.py), history rows, checkpoints and preemption, as loop.py does for training.

A step takes the same global batch and micro batches as one process would, dealt to the ranks
(loader.step_batches); each micro batch's loss is scaled by its share of the global batch, the gradients are
summed over the ranks (distributed.py), and the teacher statistics (the centre's batch mean, the monitors' sums)
are summed over micro batches and ranks in one all-reduce, so the centre moves once per step whatever the micro
batch size or the number of ranks (dino.py).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dermcompress.data.loader import BatchLoader, normalize, step_batches

from . import checkpoints, crops, devices, dino, distributed
from .checkpoints import Preempted
from .collapse import Monitors, knn_drop
from .knn import knn_predict
from .optim import lr_lambda, param_groups
from .phases import Phases

log = logging.getLogger(__name__)

HISTORY_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "lr",
    "momentum",
    "teacher_temp",
    "grad_norm",
    "teacher_entropy",
    "batch_mean_entropy",
    "std_l2",
    "std_l2_student",
    "knn_acc",
)


class Pretraining:
    """The optimizer, schedules and state of one pretraining, and its steps, monitors and checkpoints."""

    def __init__(
        self, model, s: dict, data, sizes: tuple[int, int], ckpt_path: Path, identity: str, device, autocast
    ):
        self.model, self.s, self.data, self.device, self.autocast = model, s, data, device, autocast
        self.ckpt_path, self.identity = ckpt_path, identity
        micro = s["micro_batch_size"] or math.ceil(s["batch_size"] / distributed.world_size())
        self.loader = BatchLoader(data.train[0], batch_size=micro, shuffle=True, seed=s["seed"])
        n = len(data.train[0])
        self.steps_per_epoch = math.ceil(n / s["batch_size"])
        self.total_steps = s["steps"] or self.steps_per_epoch * s["epochs"]
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        g, loc = sizes
        self.view_specs = [(g, s["global_crops"]["scale"])] * s["global_crops"]["n"] + [
            (loc, s["local_crops"]["scale"])
        ] * s["local_crops"]["n"]
        self.warmup_temp_steps = round(s["warmup_teacher_temp_epochs"] * self.steps_per_epoch)
        self.trainable = [p for _, p in model.trainable_named()]
        self.optimizer = torch.optim.AdamW(param_groups(model, s["weight_decay"]), lr=s["lr"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(
                "cosine",
                self.total_steps,
                min(self.total_steps - 1, math.ceil(s["warmup_epochs"] * self.steps_per_epoch)),
                s["min_lr"] / s["lr"],
            ),
        )
        self.state: dict[str, Any] = {
            "step": 0,
            "epoch": 0,
            "batches_done": 0,
            "history": [],
            "seconds": 0.0,
            "images": 0,
            "peak_mem_mb": None,
            "knn": [],  # {"step", "epoch", "accuracy"}
            "monitors": None,  # collapse.Monitors' state
            "stopped": None,  # why the run stopped early (a monitor's message)
        }

    def resume(self) -> None:
        state = checkpoints.restore(self.ckpt_path, self.identity, self.model, self.optimizer, self.scheduler)
        if state is not None:
            self.state = state

    def checkpoint(self) -> None:
        checkpoints.write(
            self.ckpt_path, self.identity, self.model, self.optimizer, self.scheduler, self.state
        )

    # ------------------------------------------------------------------------------------------- one step

    def step(self, epoch: int, step_size: int, micro_batches, draws, variant_of, flag) -> dict[str, float]:
        s, model, st = self.s, self.model, self.state
        step = st["step"]
        temp = dino.teacher_temp_at(step, self.warmup_temp_steps, s["warmup_teacher_temp"], s["teacher_temp"])
        stats, teacher_feats, student_feats = None, [], []
        loss_sum = torch.zeros((), device=self.device)
        n_global = s["global_crops"]["n"]
        for batch in micro_batches:
            index = batch["index"]
            teacher_pixels = batch["pixels"].to(self.device, non_blocking=True)
            student_pixels = self._student_pixels(index, variant_of[index], teacher_pixels)
            kw = {
                "mean": model.student.mean,
                "std": model.student.std,
                "flip": s["flip"],
                "strength": s["jitter"],
            }
            student_views = crops.views(student_pixels, draws[index], self.view_specs, **kw)
            if student_pixels is teacher_pixels:  # one variant: the teacher's globals are the student's
                teacher_views = student_views[:n_global]
            else:
                teacher_views = crops.views(
                    teacher_pixels, draws[index, :n_global], self.view_specs[:n_global], **kw
                )
            out = model.forward_micro(teacher_views, student_views, temp, self.autocast)
            # lightly's loss is the micro batch's mean: times its images / the step's, the sum is the step's mean
            (out["loss"] * len(index) / step_size).backward()
            loss_sum += out["loss"].detach() * len(index)
            micro_stats = model.teacher_stats(out["teacher_out"], temp)
            stats = micro_stats if stats is None else stats + micro_stats
            teacher_feats.append(out["teacher_features"])
            student_feats.append(out["student_features"])
        out_dim = s["out_dim"]
        if stats is None:  # this rank got no micro batch of a short last step
            stats = torch.zeros(2 * out_dim + 1, device=self.device)
        signal = torch.tensor([loss_sum.item(), float(bool(flag["signal"]))], device=self.device)
        reduced = dino.all_reduce_sum(torch.cat([stats.float(), signal]))
        distributed.all_reduce_gradients(self.trainable)
        max_norm = s["clip_grad"] or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm).item()
        model.student_head.cancel_last_layer_gradients(epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        momentum = dino.momentum_at(step, self.total_steps, s["momentum"])
        rows = n_global * step_size  # teacher outputs in the step
        model.update_teacher(momentum, reduced[:out_dim] / rows)
        distributed.sync_buffers(model)
        if reduced[-1] > 0:
            flag["signal"] = flag["signal"] or "a signal to another rank"
        probs_mean = reduced[out_dim : 2 * out_dim] / rows
        batch_entropy = float(-torch.special.xlogy(probs_mean, probs_mean).sum())
        log_k = math.log(out_dim)
        std_teacher, _ = dino.std_l2(teacher_feats)
        std_student, _ = dino.std_l2(student_feats)
        st["step"] += 1
        st["batches_done"] += 1
        st["images"] += step_size
        row = {
            "step": st["step"],
            "epoch": st["step"] / self.steps_per_epoch,
            "loss": float(reduced[-2]) / step_size,
            "lr": lr,
            "momentum": momentum,
            "teacher_temp": temp,
            "grad_norm": grad_norm,
            "teacher_entropy": float(reduced[2 * out_dim]) / rows / log_k,
            "batch_mean_entropy": batch_entropy / log_k,
            "std_l2": std_teacher,
            "std_l2_student": std_student,
            "knn_acc": None,
        }
        st["history"].append(row)
        return row

    def _student_pixels(self, index: torch.Tensor, variants: torch.Tensor, teacher_pixels: torch.Tensor):
        """The images each student view is cut from: the variant drawn for each image (the first: the teacher's)."""
        if len(self.data.train) == 1:
            return teacher_pixels
        out = teacher_pixels.clone()
        for v in range(1, len(self.data.train)):
            chosen = variants == v
            if chosen.any():
                out[chosen.to(out.device)] = self.data.train[v].pixels[index[chosen]].to(self.device)
        return out

    # ------------------------------------------------------------------------------------------- kNN monitor

    @torch.no_grad()
    def knn(self, epoch: float) -> float | None:
        """Frozen-feature kNN accuracy of the teacher backbone: held-out train groups against the pretraining
        images (first variant, full images at the cached resolution); a history row's knn_acc."""
        if self.data.held_out is None:
            return None
        teacher = self.model.teacher
        bank, queries = self.data.train[0], self.data.held_out
        features = [self._features(teacher, rows.pixels) for rows in (bank, queries)]
        probs = knn_predict(
            features[0], bank.labels, features[1], num_classes=len(self.data.classes), k=self.s["knn_k"]
        )
        accuracy = float((probs.argmax(1).cpu() == queries.labels).float().mean())
        st = self.state
        st["knn"].append({"step": st["step"], "epoch": epoch, "accuracy": accuracy})
        if st["history"] and st["history"][-1]["step"] == st["step"]:
            st["history"][-1]["knn_acc"] = accuracy
        else:
            st["history"].append({"step": st["step"], "epoch": epoch, "knn_acc": accuracy})
        log.info("kNN monitor at step %d: accuracy %.4f", st["step"], accuracy)
        return accuracy

    def _features(self, model: nn.Module, pixels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        out = []
        for start in range(0, len(pixels), chunk):
            x = normalize(pixels[start : start + chunk], model.mean, model.std, device=self.device)
            with self.autocast():
                out.append(model.forward_features(x).float())
        return torch.cat(out)

    # ------------------------------------------------------------------------------------------- the loop

    def run(self, phases: Phases, monitors: Monitors) -> None:
        """Every remaining step; stops early (state["stopped"]) when a monitor fires; raises Preempted after
        checkpointing on a signal."""
        s, st, model = self.s, self.state, self.model
        st["monitors"] = monitors.state
        devices.reset_peak(self.device)

        def measure_knn(epoch: float) -> None:
            with phases("knn"):
                accuracy = self.knn(epoch)
            if accuracy is not None and st["knn"][0]["step"] < st["step"]:
                event = knn_drop(st["step"], accuracy, st["knn"][0]["accuracy"], s["stop_on_knn_drop"])
                if event:
                    st["monitors"]["fired"].append(event)
                    st["stopped"] = st["stopped"] or event["message"]

        if st["step"] == 0 and not st["knn"]:
            measure_knn(0.0)
        bar = tqdm(total=self.total_steps, initial=st["step"], desc="pretrain", unit="step", mininterval=5)
        n = len(self.data.train[0])
        with checkpoints.preemption_flag() as flag, bar:
            for epoch in range(st["epoch"], self.epochs):
                if st["stopped"] and s["collapse"]["stop"]:
                    break
                start = time.perf_counter()
                self.loader.set_epoch(epoch)
                draws = crops.epoch_draws(n, len(self.view_specs), s["seed"], epoch)
                variant_of = crops.variant_draws(n, len(self.data.train), s["seed"], epoch)
                model.train_mode()
                steps = step_batches(
                    self.loader, s["batch_size"], rank=distributed.rank(), world_size=distributed.world_size()
                )
                with phases("train"):
                    for step_size, micro in itertools.islice(steps, st["batches_done"], None):
                        if st["step"] >= self.total_steps:
                            break
                        row = self.step(epoch, step_size, micro, draws, variant_of, flag)
                        bar.update()
                        if st["step"] % s["log_every"] == 0 or st["step"] == 1:
                            _log_row(row, self.total_steps)
                        for event in monitors.update(st["step"], row):
                            st["stopped"] = st["stopped"] or event["message"]
                        if st["stopped"] and s["collapse"]["stop"]:
                            break
                        every = s["checkpoint_every_steps"]
                        if flag["signal"] or (every and st["step"] % every == 0):
                            self.account(start)
                            self.checkpoint()
                            start = time.perf_counter()
                        if flag["signal"]:
                            raise Preempted(
                                f"{flag['signal']} at step {st['step']}: checkpoint saved to {self.ckpt_path}"
                            )
                    self.account(start)
                if st["stopped"] and s["collapse"]["stop"]:
                    break
                last = st["step"] >= self.total_steps
                if (epoch + 1) % s["knn_every"] == 0 or last:
                    measure_knn(st["step"] / self.steps_per_epoch)
                st["epoch"], st["batches_done"] = epoch + 1, 0
                if last:
                    break
                self.checkpoint()
                if (
                    dino.all_reduce_sum(torch.tensor([float(bool(flag["signal"]))], device=self.device))[0]
                    > 0
                ):
                    flag["signal"] = flag["signal"] or "a signal to another rank"
                if flag["signal"]:
                    raise Preempted(
                        f"{flag['signal']} after epoch {epoch + 1}: checkpoint saved to {self.ckpt_path}"
                    )

    def account(self, start: float) -> None:
        devices.sync(self.device)
        self.state["seconds"] += time.perf_counter() - start
        peak = devices.peak_mb(self.device)
        if peak is not None:
            self.state["peak_mem_mb"] = max(peak, self.state["peak_mem_mb"] or 0.0)


def _log_row(row: dict, total: int) -> None:
    log.info(
        "step %d/%d loss %.4f lr %.3g momentum %.5f teacher_temp %.3f grad_norm %.3g | teacher_entropy %.3f "
        "batch_mean_entropy %.3f std_l2 %.3f (student %.3f)",
        row["step"],
        total,
        row["loss"],
        row["lr"],
        row["momentum"],
        row["teacher_temp"],
        row["grad_norm"],
        row["teacher_entropy"],
        row["batch_mean_entropy"],
        row["std_l2"],
        row["std_l2_student"],
    )
