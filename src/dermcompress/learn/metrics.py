"""Scoring one run: the predictions table every run writes, and the metrics.json computed from it.

`predictions.parquet` has one row per evaluated image: `split` (val or test), `image_id`, `group_id` (its lesion
or patient group), `label` and `pred` (class names), and one `prob_<CLASS>` column per class (rows sum to 1).
Every number in metrics.json is recomputed from that file, so a reviewer can rescore a run without the model:
the test split's scores under the plain keys, the validation split's under `val_<key>` (the validation split
chooses among runs, e.g. a learning rate; the test split only reports).

AUC convention: binary tasks score `prob_<classes[1]>` against `label == classes[1]` (ROC AUC is unchanged
when the positive class and its score are swapped together, so the choice is only bookkeeping); more classes
give the one-vs-rest macro AUC over the classes that are present in the labels. With a single class in the
labels AUC is undefined and reported as null.

F1 (macro and weighted) averages over the classes present in the labels or the predictions, as scikit-learn
does when not told the labels: a class absent from both has no F1 and is left out, not counted as 0.

Confidence intervals are 95% percentile bootstraps over lesion groups (bootstrap.py: images of one lesion are
not independent, so resampling images would give intervals that are too narrow), seeded, so a rerun gives the
same numbers.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermcompress.data import integrity

from . import bootstrap

log = logging.getLogger(__name__)

PROB_PREFIX = "prob_"
METRIC_KEYS = (
    "accuracy",
    "f1_macro",
    "f1_weighted",
    "auc",
    "balanced_accuracy",
    "per_class_recall",
    "confusion_matrix",
    "n_eval",
    "n_groups",
    "accuracy_ci95",
    "auc_ci95",
    "balanced_accuracy_ci95",
)
# metrics.json holds METRIC_KEYS of the test split, and of the validation split with this prefix.
VAL_PREFIX = "val_"
SPLITS = ("val", "test")
# Supplied by the training code (DESIGN.md, metrics.json contract); GPU memory is null on CPU.
EXTRA_KEYS = (
    "gmacs",
    "params_m",
    "effective_input_px",
    "peak_train_mem_mb",
    "peak_eval_mem_mb",
    "train_img_per_s",
    "eval_img_per_s",
)


def prob_columns(classes: list[str]) -> list[str]:
    return [f"{PROB_PREFIX}{c}" for c in classes]


def predictions_frame(
    image_ids: list[str],
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    *,
    group_ids: list[str],
    split: str,
) -> pd.DataFrame:
    """The predictions table of one split: split, image_id, group_id, label, pred (argmax; first class wins a
    tie), prob_<CLASS> per class.

    `labels` are class indices into `classes`; `probs` is (N, C) and must already be probabilities (softmax or
    kNN votes): rows are checked to sum to 1 and renormalised only to remove float rounding.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    n, n_classes = len(image_ids), len(classes)
    if len(set(classes)) != n_classes:
        raise ValueError(f"duplicate class names in {classes}")
    if labels.shape != (n,) or probs.shape != (n, n_classes) or len(group_ids) != n:
        raise ValueError(
            f"shape mismatch: {n} image ids, {len(group_ids)} group ids, labels {labels.shape}, probs"
            f" {probs.shape}, {n_classes} classes"
        )
    if n and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must be integer class indices in [0, {n_classes})")
    sums = probs.sum(axis=1)
    if not np.all(np.isfinite(probs)) or probs.min(initial=0.0) < 0 or not np.allclose(sums, 1.0, atol=1e-3):
        raise ValueError("probs must be finite, non-negative and sum to 1 per row (apply softmax first)")
    probs = probs / sums[:, None] if n else probs
    names = np.asarray(classes, dtype=object)
    frame = pd.DataFrame(
        {
            "split": pd.Series([split] * n, dtype="string"),
            "image_id": pd.Series(image_ids, dtype="string"),
            "group_id": pd.Series(group_ids, dtype="string"),
            "label": pd.Series(names[labels], dtype="string"),
            "pred": pd.Series(names[probs.argmax(axis=1)] if n else [], dtype="string"),
        }
    )
    for col, values in zip(prob_columns(classes), probs.T, strict=True):
        frame[col] = values
    return frame


def class_indices(values: pd.Series, classes: list[str], column: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(values.astype(str)) - index.keys())
    if unknown:
        raise ValueError(f"predictions column {column!r} has classes not in {classes}: {unknown[:5]}")
    return values.astype(str).map(index).to_numpy(dtype=np.int64)


def auc_score(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """Binary AUC of probs[:, 1], or one-vs-rest macro AUC over the classes present; None if undefined."""
    present = np.unique(y_true)
    if len(present) < 2:
        return None
    from sklearn.metrics import roc_auc_score  # imported where scored (see compute_metrics)

    if probs.shape[1] == 2:
        return float(roc_auc_score(y_true == 1, probs[:, 1]))
    # Per class by hand rather than multi_class="ovr": that raises when a class is missing from the labels,
    # which small or grouped eval splits (and bootstrap resamples) do produce.
    return float(np.mean([roc_auc_score(y_true == c, probs[:, c]) for c in present]))


def compute_metrics(
    predictions: pd.DataFrame, classes: list[str], *, n_bootstrap: int = 1000, seed: int = 0
) -> dict:
    """Every metric of the metrics.json contract that follows from the predictions (keys: METRIC_KEYS).

    `predictions` are one split's rows. Values are plain Python (JSON-ready); undefined values (AUC with one
    class, recall of a class absent from the labels, CIs with n_bootstrap=0) are None. Intervals resample the
    lesion groups of `group_id` (bootstrap.py).
    """
    # scikit-learn (and scipy under it) imported here, where scored, not with the module: a torch job imports this
    # module before its first log line, and ~1.5 s of imports there would be paid at every job's start.
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        recall_score,
    )

    n = len(predictions)
    if n == 0:
        raise ValueError("no predictions to score")
    missing = {"group_id", "label", "pred", *prob_columns(classes)} - set(predictions.columns)
    if missing:
        raise ValueError(f"predictions lack columns {sorted(missing)}")
    y_true = class_indices(predictions["label"], classes, "label")
    y_pred = class_indices(predictions["pred"], classes, "pred")
    probs = predictions[prob_columns(classes)].to_numpy(dtype=np.float64)
    labels = list(range(len(classes)))
    # F1 averages over the classes present in the labels or the predictions: a class absent from both has no
    # F1 (0/0), and counting it as 0 would pull the macro mean down for a class the split does not hold.
    present = np.union1d(y_true, y_pred).tolist()

    recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "f1_weighted": float(f1_score(y_true, y_pred, labels=present, average="weighted", zero_division=0)),
        "auc": auc_score(y_true, probs),
        # The ISIC challenge score: mean recall over the classes present in the labels.
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "per_class_recall": {
            c: None if math.isnan(r) else float(r) for c, r in zip(classes, recall, strict=True)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n_eval": int(n),
    }

    groups = predictions["group_id"].astype(str).to_numpy()
    metrics["n_groups"] = len(np.unique(groups))
    # One (n_bootstrap, N) matrix of group-resample weights serves every interval.
    weights = bootstrap.group_weights(groups, n_bootstrap, seed)
    metrics["accuracy_ci95"] = bootstrap.percentile_ci(
        bootstrap.weighted_mean((y_true == y_pred).astype(float), weights)
    )
    aucs = bootstrap.weighted_auc(y_true, probs, weights) if metrics["auc"] is not None else np.array([])
    if skipped := int(np.isnan(aucs).sum()):  # resamples holding one class have no AUC
        log.warning("AUC bootstrap: %d of %d resamples had one class and were skipped", skipped, n_bootstrap)
    metrics["auc_ci95"] = bootstrap.percentile_ci(aucs)
    metrics["balanced_accuracy_ci95"] = bootstrap.percentile_ci(
        bootstrap.weighted_balanced_accuracy(y_true, y_pred, weights)
    )
    return metrics


def compute_run_metrics(
    predictions: pd.DataFrame, classes: list[str], *, n_bootstrap: int = 1000, seed: int = 0
) -> dict:
    """metrics.json's scores: the test split's under the plain keys, the validation split's as `val_<key>`
    (when the predictions hold val rows)."""
    unknown = sorted(set(predictions["split"].astype(str)) - set(SPLITS))
    if unknown:
        raise ValueError(f"predictions hold rows of splits {unknown}; expected {list(SPLITS)}")
    scores = {}
    for split, prefix in (("test", ""), ("val", VAL_PREFIX)):
        rows = predictions[predictions["split"] == split]
        if split == "test" or len(rows):
            part = compute_metrics(rows, classes, n_bootstrap=n_bootstrap, seed=seed)
            scores.update({f"{prefix}{key}": value for key, value in part.items()})
    return scores


def metrics_from_file(
    predictions_parquet: str | Path, classes: list[str], *, n_bootstrap: int = 1000, seed: int = 0
) -> dict:
    """compute_run_metrics on a predictions.parquet written from predictions_frame."""
    return compute_run_metrics(
        integrity.read_frame(predictions_parquet), classes, n_bootstrap=n_bootstrap, seed=seed
    )


def _json_ready(value):
    """numpy scalars/arrays -> Python; NaN and inf -> None (JSON has no NaN; a bare NaN breaks readers)."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(path: str | Path, metrics: dict, extra: dict | None = None) -> dict:
    """Write metrics.json: `metrics` plus `extra` (cost figures from the training code); returns the payload.

    Non-finite numbers become null. An extra key that would overwrite a metric is an error, not a silent win.
    """
    extra = extra or {}
    clash = sorted(set(metrics) & set(extra))
    if clash:
        raise ValueError(f"extra keys overwrite metrics: {clash}")
    missing = [k for k in EXTRA_KEYS if k not in extra]
    if missing:
        log.warning("metrics.json for %s lacks cost keys %s", path, missing)
    payload = _json_ready({**metrics, **extra})
    # Written whole or not at all, with its checksum (integrity.py).
    integrity.write_json(path, payload, allow_nan=False)
    return payload


# train.json keys that metrics.json repeats: what the run cost to train, and its architecture's figures.
TRAIN_KEYS = (
    "gmacs",
    "params_m",
    "trainable_params_m",
    "effective_input_px",
    "peak_train_mem_mb",
    "train_img_per_s",
    "train_images",
    "train_seconds",
    "steps",
    "probe_lr",  # linear: the learning rate its head was chosen with (on val)
    "knn_k",  # knn: the k chosen (on val)
    "knn_val_scores",
)


def group_ids(splits: str | Path, image_ids: list[str], where: str) -> list[str]:
    """The lesion (patient) group of each image, from the splits table; every image must be there."""
    groups = integrity.read_frame(splits, columns=["image_id", "group_id"]).set_index("image_id")["group_id"]
    if missing := sorted(set(image_ids) - set(groups.index)):
        raise ValueError(f"{len(missing)} images of {where} are not in {splits}: {missing[:5]}")
    return groups.loc[image_ids].astype(str).tolist()


def write_evaluation(
    out_dir: str | Path,
    predictions: pd.DataFrame,
    classes: list[str],
    settings: dict,
    *,
    train: dict[str, Any],
    cost: dict[str, Any],
    phases: Any,
) -> dict:
    """predictions.parquet and metrics.json (scores, the run's training costs, this evaluation's) in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    integrity.write_parquet(out_dir / "predictions.parquet", predictions)
    scores = compute_run_metrics(
        predictions, classes, n_bootstrap=settings["n_bootstrap"], seed=settings["seed"]
    )
    extra = {
        **{key: train.get(key) for key in TRAIN_KEYS},
        **cost,
        "mode": settings["mode"],
        "wall_seconds": {"train": train.get("wall_seconds"), "evaluate": phases.summary()},
    }
    payload = write_metrics(out_dir / "metrics.json", scores, extra)
    log.info(
        "test accuracy %.4f, AUC %s (n=%d); val accuracy %s, AUC %s",
        scores["accuracy"],
        scores["auc"],
        scores["n_eval"],
        scores.get("val_accuracy"),
        scores.get("val_auc"),
    )
    return payload
