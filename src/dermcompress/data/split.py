"""Grouped, stratified train/val/test split: no patient (or lesion) in two splits, class proportions kept.

ISIC 2019 has several images of one lesion (`lesion_id`); ISIC 2020 / Archive metadata also name the patient
(`patient_id`). If images of one group landed in both train and test, the test score would partly measure
recognising a lesion seen in training, not diagnosing a new one. So whole groups are assigned, with
scikit-learn's StratifiedGroupKFold keeping the class mix of every split close to the whole's.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from dermcompress.data import integrity
from dermcompress.data.groups import connected_groups, id_counts

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
COLUMNS = ["image_id", "group_id", "label", "split"]
# Written by ingest for a listed duplicate pair (ISIC 2020): the smallest image id of the pair's component.
DUPLICATE_GROUP = "duplicate_group"
ID_COLUMNS = ("patient_id", "lesion_id")
# More folds give finer fractions (k/MAX_FOLDS) at a cost linear in folds x groups; 20 resolves 0.05 exactly.
MAX_FOLDS = 20


def group_ids(task: pd.DataFrame, group_columns: list[str]) -> tuple[pd.Series, str]:
    """(group id per row, the link columns used joined by '+'): the connected components of the images that
    share a value of any of `group_columns` present in `task`, or a `duplicate_group` (groups.py). With one
    such column the groups are its values, as before; an image with no value in any is its own group.
    """
    columns = [c for c in group_columns if c in task.columns]
    if not columns:
        raise ValueError(
            f"none of the group columns {list(group_columns)} is in the task table "
            f"(columns: {list(task.columns)})"
        )
    links = [*columns, *([DUPLICATE_GROUP] if DUPLICATE_GROUP in task.columns else [])]
    if all(task[c].astype("string").str.strip().fillna("").eq("").all() for c in links):
        logger.warning(
            "group columns %s are empty in every row, so every image is its own group", list(columns)
        )
    return connected_groups(task, links), "+".join(columns)


def _fold_plan(fraction: float, max_folds: int) -> tuple[int, int]:
    """(folds, folds taken): the fewest folds whose share taken/folds comes closest to `fraction`."""
    best: tuple[float, int, int] | None = None
    for folds in range(2, max_folds + 1):
        taken = min(max(round(fraction * folds), 1), folds - 1)
        error = abs(taken / folds - fraction)
        if best is None or error < best[0] - 1e-12:
            best = (error, folds, taken)
    assert best is not None
    return best[1], best[2]


def _carve(
    labels: np.ndarray, groups: np.ndarray, fraction: float, rng: np.random.Generator, what: str
) -> np.ndarray:
    """Mask of about `fraction` of the rows, whole groups only, class mix kept: the union of some folds."""
    n_groups = len(np.unique(groups))
    largest_class = int(np.unique(labels, return_counts=True)[1].max())
    max_folds = min(MAX_FOLDS, n_groups, largest_class)
    if max_folds < 2:
        raise ValueError(
            f"cannot carve a {what} split out of {len(labels)} image(s) in {n_groups} group(s), largest "
            f"class {largest_class} image(s): at least two groups, and two images of one class, are needed"
        )
    folds, taken = _fold_plan(fraction, max_folds)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=int(rng.integers(2**31 - 1)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tests = [test for _, test in cv.split(np.zeros(len(labels)), labels, groups)]
    for warning in caught:
        logger.warning("%s split: %s", what, warning.message)
    # The first fold always receives the largest group; picking folds at random keeps it out of any one split.
    mask = np.zeros(len(labels), dtype=bool)
    for fold in rng.permutation(folds)[:taken]:
        mask[tests[fold]] = True
    if mask.all() or not mask.any():
        raise ValueError(
            f"the {what} split of {fraction:g} came out empty or whole: too few groups ({n_groups})"
        )
    logger.info(
        "%s split: %d of %d folds, %d of %d images (%.3f, asked %.3f)",
        what,
        taken,
        folds,
        int(mask.sum()),
        len(mask),
        mask.mean(),
        fraction,
    )
    return mask


def grouped_split(
    task: pd.DataFrame, *, group_columns: list[str], test_fraction: float, val_fraction: float, seed: int
) -> pd.DataFrame:
    """`image_id, group_id, label, split` (train/val/test) for every image of `task`, sorted by image_id.

    The test split is about `test_fraction` of the images, val about `val_fraction` of them (carved from the
    rest; 0 gives none). Groups never straddle splits; the same rows and seed give the same split, whatever
    their order. `attrs["group_column"]` names the column used.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise ValueError(f"val_fraction must be in [0, 1) and leave images for training, got {val_fraction}")
    for column in ("image_id", "label"):
        if column not in task.columns:
            raise ValueError(f"task table has no {column!r} column (columns: {list(task.columns)})")
    if task["image_id"].duplicated().any():
        raise ValueError("task table lists some image_id more than once")
    if task["label"].isna().any():
        raise ValueError(f"task table has {int(task['label'].isna().sum())} image(s) without a label")

    frame = task.sort_values("image_id", kind="stable").reset_index(drop=True)
    group_id, column = group_ids(frame, group_columns)
    labels = frame["label"].astype(str).to_numpy()
    groups = group_id.to_numpy()
    rng = np.random.default_rng(seed)

    split = np.full(len(frame), "train", dtype=object)
    split[_carve(labels, groups, test_fraction, rng, "test")] = "test"
    if val_fraction > 0:
        rest = np.flatnonzero(split == "train")
        # val_fraction is of all images; the rest differs from 1 - test_fraction by however the test came out.
        share = val_fraction * len(frame) / len(rest)
        if share >= 1:
            raise ValueError(f"val_fraction={val_fraction} leaves no training images after the test split")
        split[rest[_carve(labels[rest], groups[rest], share, rng, "val")]] = "val"

    out = pd.DataFrame(
        {"image_id": frame["image_id"].astype(str), "group_id": group_id, "label": labels, "split": split}
    ).astype(str)
    out.attrs["group_column"] = column
    return out


def _by_split(series: pd.Series) -> dict[str, int]:
    return {s: int(series.get(s, 0)) for s in SPLITS}


def split_report(splits: pd.DataFrame, *, group_column: str | None = None) -> dict[str, Any]:
    """Counts per split and class, images and groups per split, fractions achieved, groups shared (must be 0).

    `group_column` defaults to the one `grouped_split` recorded in `splits.attrs`.
    """
    n = len(splits)
    classes = sorted(splits["label"].unique())
    images = _by_split(splits["split"].value_counts())
    groups = _by_split(splits.groupby("split")["group_id"].nunique())
    counts = pd.crosstab(splits["split"], splits["label"]).reindex(
        index=list(SPLITS), columns=classes, fill_value=0
    )
    return {
        "group_column": group_column if group_column is not None else splits.attrs.get("group_column"),
        "n_images": n,
        "n_groups": int(splits["group_id"].nunique()),
        "images_without_group_value": int((splits["group_id"] == splits["image_id"]).sum()),
        "groups_shared_across_splits": int((splits.groupby("group_id")["split"].nunique() > 1).sum()),
        "images_per_split": images,
        "groups_per_split": groups,
        "fraction_per_split": {s: round(images[s] / n, 4) if n else None for s in SPLITS},
        "counts": {s: {c: int(counts.loc[s, c]) for c in classes} for s in SPLITS},
        "class_fraction_per_split": {
            s: {c: round(int(counts.loc[s, c]) / images[s], 4) if images[s] else None for c in classes}
            for s in SPLITS
        },
        "class_fraction_overall": {c: round(int((splits["label"] == c).sum()) / n, 4) for c in classes},
    }


def run_split(
    *,
    task: str | Path,
    splits_out: str | Path,
    report_out: str | Path,
    group_columns: list[str],
    test_fraction: float,
    val_fraction: float,
    seed: int,
) -> dict[str, Any]:
    """Read the task, split it, write `splits.parquet` (image_id, group_id, label, split) and its report."""
    frame = integrity.read_frame(task)
    logger.info("task %s: %d images; group columns tried in order: %s", task, len(frame), list(group_columns))
    splits = grouped_split(
        frame, group_columns=group_columns, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed
    )
    report = split_report(splits)
    ids = splits.merge(frame[["image_id", *(c for c in ID_COLUMNS if c in frame.columns)]], on="image_id")
    # Patients, lesions and groups per split, and how many are found in two splits: all 0, or a leak.
    report["ids"] = id_counts(ids, [*ID_COLUMNS, "group_id"])
    leaked = {c: v["shared_across_splits"] for c, v in report["ids"].items() if v["shared_across_splits"]}
    report["requested"] = {"test_fraction": test_fraction, "val_fraction": val_fraction, "seed": seed}
    logger.info("split report:\n%s", json.dumps(report, indent=2))
    # Defensive: grouped_split cannot share a group, but a leak would silently inflate every test score.
    if report["groups_shared_across_splits"] or leaked:
        raise RuntimeError(
            f"ids found in more than one split: {leaked or report['groups_shared_across_splits']}"
        )

    splits = splits.sort_values("image_id").reset_index(drop=True)[COLUMNS]
    integrity.write_parquet(splits_out, splits)
    integrity.write_json(report_out, report)
    logger.info("wrote %s and %s", splits_out, report_out)
    return report
