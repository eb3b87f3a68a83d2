"""k-nearest-neighbour classification of frozen features, as in DINOv2's eval/knn.py.

Features are L2-normalised, so the dot product is the cosine similarity. Each query takes its k most similar
training features; a neighbour votes for its class with weight exp(sim / T) (DINOv2; T = 0.07), or 1
("uniform": a plain majority vote). Votes are normalised per query, so the output is class probabilities
that go straight into metrics.predictions_frame.

Ties in similarity go to the lower training index (a stable sort instead of topk, whose order among equal
values is unspecified), so a rerun picks the same neighbours. Chunk size and device change only the last bits
of the similarities (BLAS summation order), hence of the probabilities.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

log = logging.getLogger(__name__)

WEIGHTINGS = ("exp", "uniform")


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    weighting: str = "exp",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """(M, num_classes) class probabilities for the queries, on train_features' device.

    Queries are processed `chunk_size` at a time, so memory is chunk_size x N similarities, not M x N.
    k larger than the training set is clipped to N.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if train_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError("features must be 2-D (N, D)")
    n_train, dim = train_features.shape
    if query_features.shape[1] != dim:
        raise ValueError(f"train features have {dim} dims, queries {query_features.shape[1]}")
    if train_labels.shape != (n_train,):
        raise ValueError(f"{n_train} train features but labels of shape {tuple(train_labels.shape)}")
    if n_train == 0:
        raise ValueError("no training features")
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"need k >= 1, temperature > 0, chunk_size >= 1 (got {k}, {temperature}, {chunk_size})"
        )
    labels = train_labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"train labels must lie in [0, {num_classes})")
    if k > n_train:
        log.warning("k=%d exceeds the %d training features; using k=%d", k, n_train, n_train)
        k = n_train

    device = train_features.device
    # Half-precision features are scored in float32: similarities near 1 need the mantissa.
    dtype = torch.promote_types(train_features.dtype, torch.float32)
    train = F.normalize(train_features.to(dtype), dim=1)
    labels = labels.to(device)
    out = torch.empty(len(query_features), num_classes, dtype=dtype, device=device)
    starts = range(0, len(query_features), chunk_size)
    for start in tqdm(starts, desc="knn", unit="chunk", mininterval=5):
        query = F.normalize(query_features[start : start + chunk_size].to(device=device, dtype=dtype), dim=1)
        sims = query @ train.T
        top_sims, top_idx = torch.sort(sims, dim=1, descending=True, stable=True)
        top_sims, top_idx = top_sims[:, :k], top_idx[:, :k]
        if weighting == "exp":
            # softmax = exp(sim / T) normalised over the k neighbours, without overflow (as DINOv2 does).
            weights = torch.softmax(top_sims / temperature, dim=1)
        else:
            weights = torch.full_like(top_sims, 1.0 / k)
        votes = torch.zeros(len(query), num_classes, dtype=dtype, device=device)
        votes.scatter_add_(1, labels[top_idx], weights)
        out[start : start + len(query)] = votes / votes.sum(dim=1, keepdim=True)
    return out
