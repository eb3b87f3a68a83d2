"""How a pretraining adapts its initial backbone (`adaptation:` of a pretraining spec), on the training modes'
own code (modes.py), and LoRA adapters merged into the weights when the backbone is saved (DINO-MX).

    full            every backbone weight trains.
    freeze_blocks   the stem and the first `blocks` blocks are frozen (Classifier.freeze).
    lora            peft LoRA adapters (r, alpha, dropout, targets) on the attention projections; the base
                    weights stay untouched. `merged` folds the adapters into the weights (W + B A alpha / r), so
                    the saved backbone is a plain one that any run loads like any other.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .modes import prepare_mode

KINDS = ("full", "freeze_blocks", "lora")


def adapt(model: nn.Module, adaptation: dict[str, Any]) -> nn.Module:
    """Set which of the Classifier's backbone parameters train, per `adaptation` (modes.prepare_mode)."""
    kind = adaptation["kind"]
    mode = {"full": "finetune", "freeze_blocks": "freeze_blocks", "lora": "lora"}[kind]
    lora = {k: adaptation[k] for k in ("r", "alpha", "dropout", "targets")}
    return prepare_mode(model, {"mode": mode, "freeze_blocks": adaptation["blocks"], "lora": lora})


def merged(model: nn.Module) -> nn.Module:
    """A copy of `model` with every peft adapter merged into its base layer and the adapter layers replaced by
    those base layers (what peft's merge_and_unload does); a model without adapters is copied as it is."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # imported here: only LoRA needs peft

    model = copy.deepcopy(model)
    adapted = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in adapted:
        layer = model.get_submodule(name)
        layer.merge(safe_merge=True)  # raises on NaN/inf instead of saving broken weights
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    return model
