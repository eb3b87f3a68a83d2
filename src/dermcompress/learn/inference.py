"""Inference over a whole split of a cache: a classifier's probabilities, in row order (torch only, so that a
training job need not import the scoring code)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dermcompress.data.loader import normalize


@torch.no_grad()
def predict(model: nn.Module, loader, *, device: torch.device, autocast) -> dict[str, Any]:
    """Mean cross-entropy, accuracy, and (N, C) probabilities + labels in row order, of a whole split."""
    model.eval()
    probs, labels, index = [], [], []
    loss_sum = 0.0
    for batch in tqdm(loader, desc="eval", unit="batch", mininterval=5):
        x = normalize(batch["pixels"], model.mean, model.std, device=device)
        y = batch["labels"].to(device)
        with autocast():
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        probs.append(torch.softmax(logits, dim=1).cpu())
        labels.append(batch["labels"])
        index.append(batch["index"])
    order = torch.cat(index)
    p, y = torch.empty_like(torch.cat(probs)), torch.empty_like(torch.cat(labels))
    p[order], y[order] = torch.cat(probs), torch.cat(labels)
    return {
        "loss": loss_sum / len(y),
        "accuracy": float((p.argmax(1) == y).double().mean()),
        "probs": p.double().numpy(),
        "labels": y.numpy(),
    }
