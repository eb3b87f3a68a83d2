"""Bootstrap over lesion (or patient) groups, vectorised: many resamples scored at once.

Images of one lesion are correlated (the same lesion photographed several times, or downsampled copies), so
resampling images treats them as independent evidence and gives intervals that are too narrow. A resample here
draws *groups* with replacement, as many as there are, and takes every image of each drawn group: an image's
weight in a resample is how often its group was drawn. Every statistic is then a weighted one, computed for all
resamples at once from a (n_resamples, n_images) weight matrix; no Python loop over resamples.

Groups are drawn over the sorted unique group ids with the given seed, so the same seed and the same set of
groups give the same resamples whatever the row order: two runs scored on the same test split share them,
which a paired comparison needs.
"""

from __future__ import annotations

import warnings

import numpy as np


def group_weights(groups: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, N) float64: how often each image's group is drawn in each group resample."""
    unique, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(unique), size=(n_resamples, len(unique)))
    counts = np.zeros((n_resamples, len(unique)))
    np.add.at(counts, (np.arange(n_resamples)[:, None], drawn), 1.0)
    return counts[:, inverse]


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B,) weighted means of `values` (N,) under each row of `weights` (B, N); NaN for an all-zero row."""
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, weights @ values / np.where(total > 0, total, 1), np.nan)


def weighted_binary_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B,) ROC AUC of `scores` for the boolean `positive` labels, one per weight row; NaN without both classes.

    AUC = sum over (positive i, negative j) of w_i w_j ([s_i > s_j] + [s_i = s_j] / 2) / (W_pos W_neg), as
    scikit-learn's roc_auc_score(sample_weight=w) computes it, in one pass over the scores sorted once.
    """
    order = np.argsort(scores, kind="stable")
    s, pos = scores[order], positive[order].astype(bool)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # runs of tied scores
    w = weights[:, order]
    pos_w = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)
    neg_w = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
    below = np.cumsum(neg_w, axis=1) - neg_w  # negative weight strictly below each tie run
    wins = (pos_w * (below + 0.5 * neg_w)).sum(axis=1)
    total = pos_w.sum(axis=1) * neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, wins / np.where(total > 0, total, 1), np.nan)


def weighted_auc(y_true: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B,) AUC per weight row: binary on probs[:, 1]; else the one-vs-rest macro over the classes present."""
    if probs.shape[1] == 2:
        return weighted_binary_auc(y_true == 1, probs[:, 1], weights)
    # A class absent from a resample has no AUC (NaN) and drops out of that resample's mean.
    per_class = [weighted_binary_auc(y_true == c, probs[:, c], weights) for c in range(probs.shape[1])]
    return _nanmean_rows(np.stack(per_class, axis=1))


def weighted_balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B,) mean recall over the classes present in each resample (the ISIC challenge score)."""
    correct = (y_true == y_pred).astype(float)
    recalls = []
    for c in np.unique(y_true):
        in_class = y_true == c
        recalls.append(weighted_mean(correct[in_class], weights[:, in_class]))
    return _nanmean_rows(np.stack(recalls, axis=1))


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Row means over the finite entries; NaN (without numpy's warning) for a row with none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=1)


def percentile_ci(values: np.ndarray) -> list[float] | None:
    """The 95% percentile interval of the finite values; None if there are none."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]
