"""The classification task: which images of the manifest it uses, and how its classes are balanced.

The study is balanced MEL vs NV: every class keeps as many images as the rarest one has, drawn with a seed.
Only images ingest marked `ok` take part; quarantined ones and other diagnoses are left out (and counted in
the log).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dermcompress.data import integrity

logger = logging.getLogger(__name__)

BALANCES = ("undersample", "none")


def _check_classes(classes: list[str]) -> list[str]:
    classes = [str(c) for c in classes]
    if len(classes) < 2:
        raise ValueError(f"a classification task needs at least two classes, got {classes}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be unique, got {classes}")
    return classes


def select_task(manifest: pd.DataFrame, *, classes: list[str], balance: str, seed: int) -> pd.DataFrame:
    """The manifest rows of the task: status ok, label in `classes`, with `label_idx` (index in `classes`).

    balance="undersample" draws, per class, as many images as the rarest class has (numpy Generator seeded
    with `seed`); "none" keeps them all. Rows are sorted by image_id before the draw, so the result depends on
    the set of rows only, not on their order. Returned sorted by image_id, every manifest column kept.
    """
    classes = _check_classes(classes)
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    for column in ("image_id", "status", "label"):
        if column not in manifest.columns:
            raise ValueError(f"manifest has no {column!r} column (columns: {list(manifest.columns)})")
    if manifest["image_id"].duplicated().any():
        dupes = manifest.loc[manifest["image_id"].duplicated(), "image_id"].unique()[:5].tolist()
        raise ValueError(f"manifest lists some image_id more than once, e.g. {dupes}")

    ok = manifest[(manifest["status"] == "ok") & manifest["label"].isin(classes)]
    ok = ok.sort_values("image_id", kind="stable").reset_index(drop=True)
    counts = ok["label"].value_counts()
    empty = [c for c in classes if counts.get(c, 0) == 0]
    if empty:
        available = manifest.loc[manifest["status"] == "ok", "label"].value_counts().to_dict()
        raise ValueError(
            f"class(es) {empty} have no image with status ok; ok images per label in the manifest: "
            f"{available}"
        )

    if balance == "undersample":
        n = int(counts[classes].min())
        rng = np.random.default_rng(seed)
        keep = []
        for c in classes:  # fixed class order, so the draw is reproducible
            rows = np.flatnonzero((ok["label"] == c).to_numpy())
            keep.append(rng.choice(rows, size=n, replace=False))
        ok = ok.iloc[np.sort(np.concatenate(keep))].reset_index(drop=True)

    ok["label_idx"] = ok["label"].map({c: i for i, c in enumerate(classes)}).astype("int64")
    return ok


def _per_class(frame: pd.DataFrame, classes: list[str]) -> dict[str, int]:
    counts = frame["label"].value_counts()
    return {c: int(counts.get(c, 0)) for c in classes}


def run_task(
    *, manifest: str | Path, task_out: str | Path, classes: list[str], balance: str, seed: int
) -> pd.DataFrame:
    """Read the manifest, select the task, write `task.parquet` (manifest columns + label_idx, by id)."""
    frame = integrity.read_frame(manifest)
    classes = _check_classes(classes)
    ok = frame["status"] == "ok"
    logger.info(
        "manifest %s: %d images, %d ok, %d quarantined", manifest, len(frame), int(ok.sum()), int((~ok).sum())
    )
    logger.info("ok images per class before balancing: %s", _per_class(frame[ok], classes))
    others = int((ok & ~frame["label"].isin(classes)).sum())
    logger.info("ok images of other classes (or unlabelled), left out: %d", others)

    task = select_task(frame, classes=classes, balance=balance, seed=seed)
    logger.info(
        "task (balance=%s, seed=%d): %d images, per class %s",
        balance,
        seed,
        len(task),
        _per_class(task, classes),
    )

    integrity.write_parquet(task_out, task)
    logger.info("wrote %s", task_out)
    return task
