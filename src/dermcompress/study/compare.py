"""Paired comparisons of a table's rows against a reference row: Δ AUC and Δ balanced accuracy, with intervals
and p-values, for runs of one study (resolutions, codecs) scored on the same test images.

The runs are paired: every row scores the same images, so much of the sampling noise (which lesions happen to
be in the test split, how hard they are) is shared, and cancels in a difference. Comparing two independent
intervals ignores that and is too conservative. Here one matrix of lesion-group resamples (bootstrap.py)
serves every row and seed: each resample's Δ is taken between rows scored on the very same resampled groups,
so the interval of Δ is narrower than the two rows' intervals would suggest, and still honest about lesion
clustering. Several seeds of one row are averaged (the row's metric is its mean over seeds) before the Δ.

DeLong's test for correlated ROC AUCs (binary tasks only) is given alongside, as the classic analytic check.
It treats images as independent and so ignores lesion clustering, unlike the group bootstrap: with several
images per lesion its p-values are too small. Holm's step-down correction adjusts each p column within the
table, over the rows tested against the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm, rankdata
from sklearn.metrics import balanced_accuracy_score

from dermcompress.learn import bootstrap
from dermcompress.learn.metrics import auc_score, class_indices, prob_columns

METRICS = ("auc", "balanced_accuracy")
# Placement values lie in [0, 1]; a variance of their difference below this is rounding, i.e. zero.
_ZERO_VARIANCE = 1e-20


def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control, any dependence between the tests):
    the i-th smallest of m is multiplied by m - i + 1, then made monotone and capped at 1. NaNs stay NaN and
    do not count towards m."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    steps = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted[order] = np.minimum(steps, 1.0)
    return adjusted


def _placements(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seed-averaged structural components of the AUC from midranks (Sun & Xu 2014): V10 (m,) per positive,
    the fraction of negatives it outscores (ties count half), and V01 (n,) per negative, the fraction of
    positives that outscore it."""
    x, y = scores[:, positive], scores[:, ~positive]
    m, n = x.shape[1], y.shape[1]
    ranks = rankdata(np.concatenate([x, y], axis=1), axis=1)
    v10 = (ranks[:, :m] - rankdata(x, axis=1)) / n
    v01 = 1.0 - (ranks[:, m:] - rankdata(y, axis=1)) / m
    return v10.mean(axis=0), v01.mean(axis=0)


def delong_test(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> tuple[float, float]:
    """(AUC_a - AUC_b, two-sided p) by DeLong's test for two correlated AUCs on the same images, with the
    fast midrank algorithm of Sun & Xu (2014, IEEE SPL, "Fast implementation of DeLong's algorithm").

    `y_true` is binary (bool or 0/1). Scores are (N,) or (n_seeds, N); the seed counts of a and b may differ.
    With several seeds the AUC averaged over seeds is itself a two-sample U-statistic whose structural
    components (placement values V10, V01) are the seed-averages of each seed's, so each seed's placements
    are averaged over seeds and DeLong's variance is applied to the averaged components. A zero variance of
    the difference (identical scores) gives p = 1 when Δ = 0 (and p = 0 in the degenerate case Δ ≠ 0).
    Images are taken as independent: lesion clustering is ignored. NaN p with fewer than two of a class.
    """
    y = np.asarray(y_true)
    if not np.isin(y, [0, 1]).all():
        raise ValueError("DeLong's test needs binary labels (bool or 0/1)")
    positive = y.astype(bool)
    a, b = np.atleast_2d(np.asarray(scores_a, float)), np.atleast_2d(np.asarray(scores_b, float))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != len(y) or b.shape[1] != len(y):
        raise ValueError(f"scores {a.shape} and {b.shape} do not match {len(y)} labels")
    m, n = int(positive.sum()), int((~positive).sum())
    if m == 0 or n == 0:
        return float("nan"), float("nan")
    a10, a01 = _placements(positive, a)
    b10, b01 = _placements(positive, b)
    d10, d01 = a10 - b10, a01 - b01
    delta = float(d10.mean())
    if m < 2 or n < 2:
        return delta, float("nan")
    variance = d10.var(ddof=1) / m + d01.var(ddof=1) / n
    if variance < _ZERO_VARIANCE:
        return delta, 1.0 if abs(delta) < 1e-12 else 0.0
    return delta, float(2.0 * norm.sf(abs(delta) / np.sqrt(variance)))


def _align(frame: pd.DataFrame, image_ids: pd.Index, row: int, columns: list[str]) -> pd.DataFrame:
    """`frame` reordered to `image_ids`; ValueError naming the row if it holds other images."""
    if missing := sorted(set(columns) - set(frame.columns)):
        raise ValueError(f"row {row}: predictions lack columns {missing}")
    ids = pd.Index(frame["image_id"].astype(str))
    if ids.has_duplicates:
        raise ValueError(f"row {row}: duplicate image ids, e.g. {sorted(set(ids[ids.duplicated()]))[:5]}")
    if len(ids) != len(image_ids) or not ids.isin(image_ids).all():
        absent, extra = sorted(set(image_ids) - set(ids)), sorted(set(ids) - set(image_ids))
        raise ValueError(
            f"row {row} scores other images than the reference: missing {absent[:5]} ({len(absent)}),"
            f" extra {extra[:5]} ({len(extra)})"
        )
    return frame.iloc[ids.get_indexer(image_ids)].reset_index(drop=True)


def _bootstrap_p(deltas: np.ndarray) -> float:
    """Two-sided bootstrap p of Δ = 0 over the finite resamples, with the +1 correction (never 0)."""
    d = deltas[np.isfinite(deltas)]
    if len(d) == 0:
        return float("nan")
    below, above = np.count_nonzero(d <= 0) + 1, np.count_nonzero(d >= 0) + 1
    return min(1.0, 2.0 * min(below, above) / (len(d) + 1))


def paired_comparison(
    rows: Sequence[Sequence[pd.DataFrame]], reference: int, classes: list[str], *, n_bootstrap: int, seed: int
) -> pd.DataFrame:
    """Each row's Δ AUC and Δ balanced accuracy against row `reference`: point value, 95% paired group-bootstrap
    interval, two-sided bootstrap p and its Holm adjustment, plus DeLong's p for Δ AUC (binary tasks only;
    NaN for more classes).

    `rows[k]` holds the test-split prediction frames (metrics.py format), one per seed, behind table row k.
    Every frame must score the same images; all are aligned on the reference's first frame, whose `group_id`
    gives the lesion groups. One `bootstrap.group_weights` matrix serves every row and seed, so each
    resample's Δ (mean over the row's seeds minus mean over the reference's) compares like with like. Point
    values are unweighted (scikit-learn) means over seeds. The reference row has Δ 0 and NaN p values.
    """
    if not 0 <= reference < len(rows):
        raise ValueError(f"reference {reference} is not a row index of {len(rows)} rows")
    if empty := [k for k, frames in enumerate(rows) if len(frames) == 0]:
        raise ValueError(f"rows {empty} have no prediction frames")
    columns = ["image_id", "group_id", "label", "pred", *prob_columns(classes)]
    first = rows[reference][0]
    image_ids = pd.Index(first["image_id"].astype(str))
    first = _align(first, image_ids, reference, columns)  # checks the reference itself for duplicates
    y_true = class_indices(first["label"], classes, "label")
    aligned = [[_align(f, image_ids, k, columns) for f in frames] for k, frames in enumerate(rows)]
    labels = first["label"].astype(str).to_numpy()
    for k, frames in enumerate(aligned):
        if any((f["label"].astype(str).to_numpy() != labels).any() for f in frames):
            raise ValueError(f"row {k} gives some images other labels than the reference")
    weights = bootstrap.group_weights(first["group_id"].astype(str).to_numpy(), n_bootstrap, seed)

    def scores(frames: list[pd.DataFrame]) -> dict[str, tuple[float, np.ndarray]]:
        """Per metric: the point value and the (B,) resampled values, both means over the seeds."""
        probs = [f[prob_columns(classes)].to_numpy(dtype=np.float64) for f in frames]
        preds = [class_indices(f["pred"], classes, "pred") for f in frames]
        auc = [auc_score(y_true, p) for p in probs]
        return {
            "auc": (
                float(np.mean([np.nan if a is None else a for a in auc])),
                np.mean([bootstrap.weighted_auc(y_true, p, weights) for p in probs], axis=0),
            ),
            "balanced_accuracy": (
                float(np.mean([balanced_accuracy_score(y_true, p) for p in preds])),
                np.mean([bootstrap.weighted_balanced_accuracy(y_true, p, weights) for p in preds], axis=0),
            ),
        }

    per_row = [scores(frames) for frames in aligned]
    ref = per_row[reference]
    binary = len(classes) == 2
    positive_scores = [
        np.stack([f[f"prob_{classes[1]}"].to_numpy(float) for f in frames]) for frames in aligned
    ]
    out = []
    for k, row in enumerate(per_row):
        record: dict[str, float | bool] = {"reference": k == reference}
        for metric in METRICS:
            if k == reference:
                values = (0.0, 0.0, 0.0, np.nan)
            else:
                deltas = row[metric][1] - ref[metric][1]
                ci = bootstrap.percentile_ci(deltas) or [np.nan, np.nan]
                values = (row[metric][0] - ref[metric][0], *ci, _bootstrap_p(deltas))
            for suffix, value in zip(("", "_low", "_high", "_p"), values, strict=True):
                record[f"delta_{metric}{suffix}"] = value
        delong = binary and k != reference
        p = delong_test(y_true == 1, positive_scores[k], positive_scores[reference])[1] if delong else np.nan
        record["delong_p"] = p
        out.append(record)
    table = pd.DataFrame(out)
    for column in ("delta_auc_p", "delta_balanced_accuracy_p", "delong_p"):
        table.insert(table.columns.get_loc(column) + 1, f"{column}_holm", holm(table[column].to_numpy()))
    return table
