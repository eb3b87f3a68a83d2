"""Collapse monitors of self-distillation: the loss alone proves nothing (a collapsed output drives it down).

Per step, over the whole global batch (history.csv):

    teacher_entropy     mean entropy of the teacher's (centred, sharpened) softmax per image and view, as a
                        fraction of log(out_dim). Near 1: every image gets the uniform distribution (collapse to
                        uniform: a teacher temperature far too high, or constant outputs the centre cancels).
    batch_mean_entropy  entropy of the batch-mean teacher distribution, as a fraction of log(out_dim). Near 0:
                        every image goes to the same few prototypes (collapse to one dimension).
    std_l2              lightly's std_of_l2_normalized of the teacher backbone's features (and the student's,
                        logged), times sqrt(dim): 1 for isotropic features, 0 when every image embeds alike.

A monitor fires when it is past its threshold for `patience` consecutive steps: a warning names it and its
value, pretrain.json records it, and (collapse.stop, default on) the job stops with CollapseError. The kNN
monitor (pretrain.py) fires when the frozen-feature kNN accuracy falls more than `stop_on_knn_drop` points
below its step-0 value (continued pretraining of DINOv2 without its heads, dinov2 issue #204).
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger(__name__)

# monitor -> (collapse setting holding its threshold, "above" | "below": which side of it is collapse)
MONITORS = {
    "teacher_entropy": ("teacher_entropy_max", "above"),
    "batch_mean_entropy": ("batch_entropy_min", "below"),
    "std_l2": ("std_l2_min", "below"),
}


class CollapseError(RuntimeError):
    """Pretraining stopped: a collapse monitor fired (or the kNN monitor fell); the message says which."""


def entropy_fraction(entropy_nats: float, out_dim: int) -> float:
    return entropy_nats / math.log(out_dim)


class Monitors:
    """Consecutive-step counters of the collapse monitors; `state` is plain data (it goes into checkpoints)."""

    def __init__(self, settings: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.state = state or {"streak": dict.fromkeys(MONITORS, 0), "fired": []}

    def past(self, name: str, value: float) -> bool:
        key, side = MONITORS[name]
        threshold = self.settings[key]
        if threshold is None or value is None or math.isnan(value):
            return False
        return value > threshold if side == "above" else value < threshold

    def update(self, step: int, values: dict[str, float]) -> list[dict[str, Any]]:
        """Count this step's values; the monitors that fire now (each once per run)."""
        fired = []
        done = {f["monitor"] for f in self.state["fired"]}
        for name in MONITORS:
            streak = self.state["streak"]
            streak[name] = streak[name] + 1 if self.past(name, values[name]) else 0
            if streak[name] >= self.settings["patience"] and name not in done:
                key, side = MONITORS[name]
                event = {
                    "monitor": name,
                    "step": step,
                    "value": values[name],
                    "threshold": self.settings[key],
                    "message": f"collapse monitor {name} = {values[name]:.4g} {side} collapse.{key} = "
                    f"{self.settings[key]} for {streak[name]} consecutive steps (step {step})",
                }
                log.warning("%s", event["message"])
                self.state["fired"].append(event)
                fired.append(event)
        return fired


def knn_drop(step: int, accuracy: float, reference: float, points: float | None) -> dict[str, Any] | None:
    """The kNN monitor's event if `accuracy` fell more than `points` (percentage points) below step 0's."""
    if points is None or accuracy >= reference - points / 100:
        return None
    message = (
        f"kNN monitor: accuracy {accuracy:.3f} at step {step} is more than {points} points below its step-0 "
        f"value {reference:.3f} (stop_on_knn_drop): the pretraining is destroying what the initial weights "
        "knew (for DINOv2, continued pretraining without its released heads is a known risk; prefer LoRA, a "
        "lower lr, or a longer head warm-up)"
    )
    log.warning("%s", message)
    return {"monitor": "knn_acc", "step": step, "value": accuracy, "threshold": points, "message": message}
