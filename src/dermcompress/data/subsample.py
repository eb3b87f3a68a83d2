"""Label efficiency: train on a fraction of the training labels, drawn as whole lesion (or patient) groups.

Images of one group are near-duplicates, so drawing single images would overstate how many independent examples a
fraction holds; whole groups are drawn instead (as the split does). The draw is stratified: each class keeps about
`fraction` of its images. Groups are visited in one seeded order, so for a given seed a smaller fraction is a subset
of a larger one and a learning curve compares nested training sets.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dermcompress.data import integrity

log = logging.getLogger(__name__)


def grouped_subsample(rows: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """The rows (columns image_id, group_id, label) of whole groups holding about `fraction` of each class's images.

    A group counts towards its most frequent label. Within a class, groups are taken in a seeded random order
    until the images taken reach round(fraction x class images), at least one; so every class keeps at least one
    group and a fraction never rounds down to nothing.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return rows
    sizes = rows.groupby("group_id").size()
    group_label = rows.groupby("group_id")["label"].agg(lambda s: s.value_counts().index[0])
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.sort(sizes.index.to_numpy()))  # sorted first: the row order must not matter
    keep: list[str] = []
    for label in sorted(group_label.unique()):
        groups = [g for g in order if group_label[g] == label]
        target = max(1, round(fraction * sizes[groups].sum()))
        taken = np.cumsum(sizes[groups].to_numpy())
        keep += groups[: int(np.searchsorted(taken, target)) + 1]
    return rows[rows["group_id"].isin(keep)]


def train_subset(splits: str | Path, fraction: float, seed: int) -> list[str] | None:
    """Image ids of the train split to train on (None: all of them), from splits.parquet."""
    if fraction == 1:
        return None
    train = integrity.read_frame(splits).query("split == 'train'")
    chosen = grouped_subsample(train, fraction, seed)
    counts = chosen["label"].value_counts().sort_index().to_dict()
    log.info(
        "label fraction %g (seed %d): %d of %d training images in %d of %d groups, per class %s",
        fraction,
        seed,
        len(chosen),
        len(train),
        chosen["group_id"].nunique(),
        train["group_id"].nunique(),
        counts,
    )
    return sorted(chosen["image_id"])
