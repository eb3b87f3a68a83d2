"""Which parameters train in each mode (runs.MODES), set on a built Classifier (models.py).

    finetune       every weight trains.
    freeze_blocks  the stem (every backbone parameter registered before the first of `model.blocks`: patch or
                   stem embedding, class and position tokens) and the first `freeze_blocks` blocks are frozen.
    lora           peft LoRA adapters on the backbone's `lora.targets` (default: the model's `lora_targets`);
                   the base weights are frozen, the adapters and the head train.
    linear, knn    the backbone is frozen; a linear probe's head lives on the features (probes.py).

A module whose parameters are all frozen runs in eval mode, so frozen BatchNorm statistics stay frozen too.
Evaluation rebuilds the same structure (prepare_mode on the bare architecture) before it loads a run's weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from torch import nn

log = logging.getLogger(__name__)


def count_m(params: Iterator[nn.Parameter], trainable_only: bool = False) -> float:
    """Parameters, in millions (only the trainable ones if asked)."""
    return sum(p.numel() for p in params if p.requires_grad or not trainable_only) / 1e6


def apply_lora(model: nn.Module, lora: dict[str, Any]) -> nn.Module:
    """LoRA adapters (peft) on the backbone's target modules; its base weights frozen, the head trainable.

    peft's inject_adapter_in_model (what get_peft_model does underneath, minus the PeftModel wrapper) adapts the
    backbone in place, so the Classifier keeps its head, attributes and readable state-dict names.
    """
    from peft import LoraConfig, inject_adapter_in_model  # imported here: only this mode needs peft

    targets = lora["targets"] or model.lora_targets  # the model raises LoraUnsupportedError if it has none
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=targets if isinstance(targets, str) else list(targets),  # a string is one regex
    )
    model.backbone = inject_adapter_in_model(config, model.backbone)  # marks only the adapters trainable
    model.head.requires_grad_(True)
    return model


def prepare_mode(model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """Set which parameters train, per the mode (Classifier.freeze: the stem is what precedes the first block)."""
    mode = settings["mode"]
    if mode in ("linear", "knn"):
        model.freeze()
        model.head.requires_grad_(mode == "linear")
    elif mode == "freeze_blocks":
        model.freeze(settings["freeze_blocks"])
    elif mode == "lora":
        model = apply_lora(model, settings["lora"])
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    log.info("mode %s: %d parameter tensors frozen (%s)", mode, len(frozen), _abbreviate(frozen))
    return model


def _abbreviate(names: list[str], n: int = 6) -> str:
    return (
        ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "") if names else "none"
    )


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except modules whose parameters are all frozen, which stay in eval mode."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
