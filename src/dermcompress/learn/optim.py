"""The optimizer and schedule of the study's Hugging Face Trainer setup, without importing transformers:
AdamW parameter groups with weight decay on matrices only, and its linear and cosine schedules with warmup."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; weight decay on matrices and kernels only (not biases, norm scales)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def lr_lambda(
    schedule: str, total_steps: int, warmup_steps: int, min_lr_ratio: float
) -> Callable[[int], float]:
    """LR multiplier per step: linear warmup from 0, then linear decay to 0 or cosine decay to min_lr_ratio.

    The same curves as transformers' get_linear_schedule_with_warmup and
    get_cosine_with_min_lr_schedule_with_warmup (what the study's Trainer used), without importing transformers.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
