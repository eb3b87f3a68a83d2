"""DINO (self-distillation with no labels) from lightly's pieces: DINOProjectionHead, DINOLoss's cross-entropy,
update_momentum, cosine_schedule, std_of_l2_normalized. Imported only by a pretraining job's work (lightly pulls
in torchvision and friends, a start-up cost no other job should pay).

A student (the backbone being adapted, with a projection head) learns to match, from every view of an image, the
teacher's sharpened and centred distribution over `out_dim` prototypes of each global view of it. The teacher is
the exponential moving average of the student (momentum cosine from `momentum` to 1); the centre is a moving
average of the teacher's outputs, which with the sharpening keeps the outputs from collapsing.

The centre is updated once per optimiser step, from the mean teacher output over the whole global batch (summed
over the micro batches and all-reduced over the ranks), as dinov2's ssl_meta_arch does. lightly's DINOLoss
updates it inside forward(), with an all-reduce of the per-call mean: once per micro batch (so micro batching
changes the result), and with a collective that a rank without a micro batch of a short step never joins (a
hang). `StepCentredDINOLoss` keeps lightly's loss and takes the update out of forward().
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.loss.dino_loss import DINOLoss
from lightly.models.modules.center import center_momentum
from lightly.models.modules.heads import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.debug import std_of_l2_normalized
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from . import distributed
from .modes import set_train_mode


class StepCentredDINOLoss(DINOLoss):
    """lightly's DINOLoss whose forward() leaves the centre alone; `step_center` updates it once per step."""

    def update_center(self, teacher_out: torch.Tensor) -> None:
        """Called by DINOLoss.forward() on every call (every micro batch): deliberately nothing."""

    @torch.no_grad()
    def step_center(self, batch_center: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * batch_center, with the mean teacher output of the global batch."""
        new = center_momentum(self.center, batch_center.view_as(self.center), self.center_momentum)
        self.center.copy_(new)


def allow_any_input_size(backbone: nn.Module) -> None:
    """Let a timm ViT take crops of any patch-multiple size (local crops), resampling its position embeddings
    per forward as timm's `dynamic_img_size` does; the weights and their names are unchanged, and at its own
    size it computes exactly what it did. transformers ViTs interpolate already (backbones.HFBackbone)."""
    from timm.layers import Format
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(backbone, VisionTransformer) and not backbone.dynamic_img_size:
        backbone.dynamic_img_size = True
        backbone.patch_embed.strict_img_size = False
        backbone.patch_embed.flatten = False  # flattened after the position embedding, from NHWC
        backbone.patch_embed.output_fmt = Format.NHWC


def patch_size(backbone: nn.Module) -> int | None:
    """The ViT's patch size (crop sizes must be multiples of it); None for a convnet."""
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is not None and hasattr(patch_embed, "patch_size"):
        return int(patch_embed.patch_size[0])
    config = getattr(getattr(backbone, "model", None), "config", None)
    patch = getattr(config, "patch_size", None)
    return int(patch[0] if isinstance(patch, list | tuple) else patch) if patch else None


class DINO(nn.Module):
    """Student and teacher (Classifiers without a classification head, models.py) with their DINO heads, and
    the loss holding the centre: one module, so one state dict checkpoints all of it."""

    def __init__(self, student: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        head_args = (student.feature_dim, spec["hidden_dim"], spec["bottleneck_dim"], spec["out_dim"])
        self.student = student
        self.student_head = DINOProjectionHead(*head_args, freeze_last_layer=spec["freeze_last_layer_epochs"])
        self.teacher = copy.deepcopy(student)
        self.teacher_head = DINOProjectionHead(*head_args)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher)
        deactivate_requires_grad(self.teacher_head)
        # From the start: the kNN monitor reads the teacher at step 0, before the loop's first train_mode(), and a
        # teacher in train mode would move its BatchNorm statistics there and drop out features.
        self.teacher.eval()
        self.teacher_head.eval()
        self.loss = StepCentredDINOLoss(
            spec["out_dim"], student_temp=spec["student_temp"], center_momentum=spec["center_momentum"]
        )
        self.n_global = spec["global_crops"]["n"]
        # The teacher follows the student's trainable weights only: frozen ones stay bit for bit the same.
        teacher = dict(self.named_parameters())
        pairs = [(p, teacher[n.replace("student", "teacher", 1)]) for n, p in self.trainable_named()]
        self._ema = (nn.ParameterList([s for s, _ in pairs]), nn.ParameterList([t for _, t in pairs]))

    def trainable_named(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def train_mode(self) -> None:
        """The student trains (its frozen modules in eval mode); the teacher is always in eval mode."""
        self.train()
        set_train_mode(self.student)
        self.teacher.eval()
        self.teacher_head.eval()

    def forward_micro(
        self,
        teacher_views: list[torch.Tensor],
        student_views: list[torch.Tensor],
        teacher_temp: float,
        autocast,
    ) -> dict[str, torch.Tensor]:
        """Teacher and student outputs of one micro batch's views (views of equal size batched together), and
        lightly's DINO loss (the mean over its images) with the centre as it stands."""
        with torch.no_grad(), autocast():
            teacher_features = self.teacher.backbone(torch.cat(teacher_views))
            teacher_out = self.teacher_head(teacher_features).float()
        n = self.n_global
        outs, student_features = [], None
        with autocast():
            for group in (student_views[:n], student_views[n:]):
                if group:
                    features = self.student.backbone(torch.cat(group))
                    student_features = features if student_features is None else student_features
                    outs.append(self.student_head(features).float())
        student_out = torch.cat(outs)
        loss = self.loss(
            list(teacher_out.chunk(n)), list(student_out.chunk(len(student_views))), teacher_temp=teacher_temp
        )
        return {
            "loss": loss,
            "teacher_out": teacher_out,
            "teacher_features": teacher_features.detach().float(),
            "student_features": student_features.detach().float(),
        }

    @torch.no_grad()
    def teacher_stats(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Sums over a micro batch's teacher outputs: [outputs (out_dim), softmax probabilities (out_dim),
        per-row entropy (1)]; the probabilities are the centred, sharpened ones the loss uses."""
        probs = F.softmax((teacher_out - self.loss.center.view(1, -1)) / teacher_temp, dim=-1)
        entropy = -torch.special.xlogy(probs, probs).sum()
        return torch.cat([teacher_out.sum(0), probs.sum(0), entropy.view(1)])

    @torch.no_grad()
    def update_teacher(self, momentum: float, batch_center: torch.Tensor) -> None:
        """After the optimiser step: the teacher's EMA update and the centre's, once per step."""
        update_momentum(self._ema[0], self._ema[1], m=momentum)
        self.loss.step_center(batch_center)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over the ranks, in place (a rank without micro batches adds zeros)."""
    if distributed.world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def std_l2(per_rank_micro: list[torch.Tensor]) -> tuple[float, int]:
    """std_of_l2_normalized of a global batch's features, gathered from the ranks in the order one process
    holds them (micro batch j from rank j mod world_size), times sqrt(dim); and the dim."""
    gathered = distributed.gather_objects([t.cpu() for t in per_rank_micro])
    world = len(gathered)
    ordered = [gathered[j % world][j // world] for j in range(sum(len(g) for g in gathered))]
    features = torch.cat(ordered)
    dim = features.shape[1]
    return float(std_of_l2_normalized(features)) * math.sqrt(dim), dim


def momentum_at(step: int, total_steps: int, start: float) -> float:
    """The teacher momentum of `step`: cosine from `start` to 1 over the run (lightly's cosine_schedule)."""
    return float(cosine_schedule(step, max(1, total_steps - 1), start, 1.0))


def teacher_temp_at(step: int, warmup_steps: int, warmup_temp: float, temp: float) -> float:
    """Linear warm-up of the teacher temperature from `warmup_temp` to `temp` over `warmup_steps`, then flat."""
    if step >= warmup_steps:
        return temp
    return warmup_temp + (temp - warmup_temp) * step / warmup_steps
