"""Frozen features: a backbone's pooled features of the splits of one cache variant, computed once.

A features job (rules `features__<splits>`: one per model x resolution x variant x init) builds the backbone
once, runs it over each split the probes read (on the GPU) and writes `results/features/.../<split>.parquet`:
`image_id`, `label` (class name) and `features` (float16, the model's pooled feature vector), with the cost of
computing them in the file's metadata (images/s, peak GPU memory, GMACs). Linear probes and kNN (probes.py) read
these files, never the backbone, so each (model, resolution, variant, split) is run through the backbone once
however many probes, label fractions and seeds use it. A backbone that is not pretrained is built from the seed
(its random weights are part of what the features are): its features are keyed by the seed too (runs.FEATURES).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from tqdm import tqdm

from dermcompress.data import cache, integrity
from dermcompress.data.loader import make_loader, normalize

from . import devices, flops, models
from .modes import count_m
from .phases import Phases
from .settings import resolve_settings

log = logging.getLogger(__name__)

METADATA_KEY = b"dermcompress"


@torch.no_grad()
def extract(model: nn.Module, loader, *, device: torch.device, autocast) -> torch.Tensor:
    """(N, D) float32 features of a whole split, in row order, on `device`."""
    model.eval()
    feats, index = [], []
    for batch in tqdm(loader, desc="features", unit="batch", mininterval=5):
        x = normalize(batch["pixels"], model.mean, model.std, device=device)
        with autocast():
            feats.append(model.forward_features(x).float())
        index.append(batch["index"])
    order, feats = torch.cat(index).to(device), torch.cat(feats)
    out = torch.empty_like(feats)
    out[order] = feats
    return out


def run_features(
    *,
    model_name: str,
    model_entry: dict,
    cache_dir: str,
    outputs: dict[str, str],
    settings: dict,
    resolution: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Features of each split of a cache ({split: out parquet}) through the (frozen) backbone, built once;
    returns each file's metadata by split."""
    phases = Phases.from_process_start()
    s = resolve_settings(settings)
    device = devices.resolve_device(s["device"])
    precision = devices.resolve_precision(s["precision"], device)
    classes = list(cache.load_info(cache_dir)["classes"])
    with phases("setup"):
        model = models.build_seeded(
            model_name, model_entry, num_classes=len(classes), resolution=resolution, seed=seed
        )
        gmacs, params_m = flops.count_gmacs(model, resolution), count_m(model.parameters())
        model = model.to(device)
    written = {}
    for split, out in outputs.items():
        with phases("load"):  # the split's pixels: work that grows with the data, not a fixed cost
            loader = make_loader(
                cache_dir, split, batch_size=s["micro_batch_size"] or s["batch_size"], shuffle=False, seed=0
            )
        own = Phases()
        with phases("extract"), own("extract"):
            devices.reset_peak(device)
            devices.sync(device)
            feats = extract(model, loader, device=device, autocast=devices.autocast_for(device, precision))
            devices.sync(device)
        seconds = own.seconds["extract"]
        meta = {
            "model": model_name,
            "resolution": resolution,
            "cache": str(cache_dir),
            "split": split,
            "seed": seed,
            "classes": classes,
            "feature_dim": int(feats.shape[1]),
            "images": len(loader.dataset),
            "seconds": seconds,
            "img_per_s": len(loader.dataset) / seconds if seconds > 0 else None,
            "peak_mem_mb": devices.peak_mb(device),
            "gmacs": gmacs,
            "params_m": params_m,
            "effective_input_px": model.effective_input_px,
            "device": str(device),
            "precision": precision,
        }
        with phases("writing"):
            labels = [classes[i] for i in loader.dataset.labels.tolist()]
            write_features(out, loader.dataset.image_ids, labels, feats.cpu().numpy(), meta)
        log.info(
            "%d x %d features of %s/%s at %.1f images/s",
            *feats.shape,
            cache_dir,
            split,
            meta["img_per_s"] or 0,
        )
        written[split] = meta
    phases.log()
    return written


def write_features(
    path: str | Path, image_ids: list[str], labels: list[str], feats: np.ndarray, meta: dict
) -> None:
    """A features table: image_id, label, features (float16 vectors); `meta` in the file's metadata."""
    dim = feats.shape[1]
    values = pa.array(feats.astype(np.float16).reshape(-1), type=pa.float16())
    table = pa.table(
        {
            "image_id": pa.array(image_ids, type=pa.string()),
            "label": pa.array(labels, type=pa.string()),
            "features": pa.FixedSizeListArray.from_arrays(values, dim),
        }
    ).replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    integrity.write_parquet(path, table, compression="zstd")


@dataclass
class Features:
    """One split's features: ids, class indices into `classes`, (N, D) float32 tensor, and their metadata."""

    image_ids: list[str]
    labels: torch.Tensor
    features: torch.Tensor
    classes: list[str]
    meta: dict[str, Any]


def read_features(path: str | Path, image_ids: Collection[str] | None = None) -> Features:
    """A features table (only the rows of `image_ids`, if given, all of which must be there), in file order."""
    table = integrity.read_parquet(path)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    ids = table.column("image_id").to_pylist()
    rows = np.arange(len(ids))
    if image_ids is not None:
        wanted = set(image_ids)
        if missing := wanted - set(ids):
            raise ValueError(f"{len(missing)} requested image(s) not in {path}, e.g. {min(missing)}")
        rows = np.flatnonzero([i in wanted for i in ids])
    column = table.column("features").combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False).reshape(len(ids), -1)
    index = {c: i for i, c in enumerate(meta["classes"])}
    labels = [index[x] for x in table.column("label").to_pylist()]
    return Features(
        image_ids=[ids[i] for i in rows],
        labels=torch.tensor(labels, dtype=torch.int64)[rows],
        features=torch.from_numpy(flat[rows].astype(np.float32)),
        classes=list(meta["classes"]),
        meta=meta,
    )
