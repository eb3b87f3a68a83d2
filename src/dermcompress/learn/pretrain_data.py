"""The images a pretraining sees: the train split of each variant's cache, checked against the splits table
(no image of a val or test group, ever), with a few train groups held out for the kNN monitor.

Every variant must cache the same train images (they are views of the same images). An image of a cache's
train split that splits.parquet does not place in a train group stops the job before any step, naming the
images and the cache: a cache built from other splits, or a pretraining source that was never split.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dermcompress.data import integrity
from dermcompress.data.cache import CacheError, read_split

log = logging.getLogger(__name__)

SHOW = 5  # image ids an error names before "... (N in all)"


class LeakageError(ValueError):
    """A pretraining would see an image that is not in a train group of the splits table."""


@dataclass
class Rows:
    """Some rows of a cache split in memory, as loader.BatchLoader batches them: uint8 (N, 3, H, W) pixels."""

    pixels: torch.Tensor
    labels: torch.Tensor
    image_ids: list[str]
    split: str = "train"

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: np.ndarray) -> Rows:
        index = torch.from_numpy(rows)
        return Rows(self.pixels[index], self.labels[index], [self.image_ids[i] for i in rows], self.split)


@dataclass
class PretrainData:
    """The pretraining rows of each variant (same images, same order), and the kNN monitor's held-out rows of
    the first variant (None when knn_holdout is 0)."""

    variants: list[str]
    train: list[Rows]
    held_out: Rows | None
    classes: list[str]
    n_groups: int
    held_out_groups: list[str]


def _show(ids: list[str], split_of: dict[str, str]) -> str:
    shown = ", ".join(f"{i} ({split_of.get(i, 'not in the table')})" for i in ids[:SHOW])
    return shown + (f" ... ({len(ids)} in all)" if len(ids) > SHOW else "")


def check_train_only(cache_dir: str, image_ids: list[str], split_of: dict[str, str], splits: str) -> None:
    """Raise LeakageError naming the images of `image_ids` that are not in a train group of `splits`."""
    bad = sorted(i for i in image_ids if split_of.get(i) != "train")
    if bad:
        raise LeakageError(
            f"{cache_dir}: {len(bad)} image(s) of its train split are not in a train group of {splits}: "
            f"{_show(bad, split_of)}. Pretraining may only see train images; rebuild the cache from the "
            f"current splits (snakemake --forcerun {cache_dir}) or drop it from the spec's variants."
        )


def load(caches: dict[str, str], splits: str, *, holdout: float, seed: int) -> PretrainData:
    """The train rows of every variant's cache, checked against `splits`, with a seeded `holdout` fraction of
    the train groups set aside (from every variant) for the kNN monitor."""
    table = integrity.read_frame(splits, columns=["image_id", "group_id", "split"])
    split_of = dict(zip(table["image_id"], table["split"], strict=True))
    group_of = dict(zip(table["image_id"], table["group_id"], strict=True))
    variants, rows, classes = list(caches), [], None
    for variant, cache_dir in caches.items():
        try:
            data = read_split(cache_dir, "train")  # the train split only: val/test shards are never opened
        except CacheError as err:
            raise CacheError(
                f"variant {variant!r}: {err}. Pretraining reads the train split of each variant's cache: give "
                "it variants whose caches hold the train split (new variant names, not existing ones)"
            ) from None
        check_train_only(cache_dir, data.image_ids, split_of, splits)
        if rows and data.image_ids != rows[0].image_ids:
            raise ValueError(
                f"variant {variant!r} ({cache_dir}) caches other train images than {variants[0]!r} "
                f"({caches[variants[0]]}): {len(data.image_ids)} vs {len(rows[0].image_ids)}; the variants of a "
                "pretraining must be views of the same images"
            )
        pixels = torch.from_numpy(data.pixels).permute(0, 3, 1, 2).contiguous()
        rows.append(Rows(pixels, torch.from_numpy(data.labels.copy()), data.image_ids))
        classes = classes or data.classes
    groups = np.array([group_of[i] for i in rows[0].image_ids])
    unique = np.unique(groups)
    n_held = math.ceil(holdout * len(unique)) if holdout > 0 else 0
    if n_held >= len(unique):
        raise ValueError(
            f"knn_holdout {holdout} leaves none of the {len(unique)} train groups to pretrain on"
        )
    held = np.sort(np.random.default_rng(seed).permutation(unique)[:n_held])
    is_held = np.isin(groups, held)
    train = [r.subset(np.flatnonzero(~is_held)) for r in rows]
    held_out = rows[0].subset(np.flatnonzero(is_held)) if n_held else None
    log.info(
        "pretraining on %d train images of %d groups (variants %s); %d images of %d groups held out for kNN",
        len(train[0]),
        len(unique) - n_held,
        ", ".join(variants),
        0 if held_out is None else len(held_out),
        n_held,
    )
    return PretrainData(variants, train, held_out, list(classes), len(unique), [str(g) for g in held])


def cache_identity(caches: dict[str, str]) -> dict[str, str]:
    """Each variant's cache by the checksums of its train shards (a rebuilt cache invalidates checkpoints)."""
    from dermcompress.data.cache import load_info

    out = {}
    for variant, cache_dir in caches.items():
        shards = sorted(s["sha256"] for s in load_info(cache_dir)["shards"] if s["split"] == "train")
        out[variant] = integrity.sha256_bytes("".join(shards).encode())
    return out


def splits_identity(splits: str | Path) -> str:
    return integrity.file_sha256(splits)
