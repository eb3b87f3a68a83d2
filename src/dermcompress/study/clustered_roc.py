"""Analytic tests of the difference of two correlated ROC AUCs scored on the same images, where the images are
clustered (several images of one lesion or one patient).

Images of one lesion are not independent: their scores share the lesion's difficulty, so DeLong's variance,
which treats every image as an independent case, is too small and its p-values too small with it. Obuchowski's
nonparametric method keeps DeLong's structural components (placement values) but takes their variance over
clusters rather than images, so whatever the correlation inside a cluster (between scores, and between disease
statuses), it is carried by the cluster sums. With one image per cluster it is exactly DeLong's.

- N. A. Obuchowski, "Nonparametric analysis of clustered ROC curve data", Biometrics 53(2):567-578, 1997.
- E. R. DeLong, D. M. DeLong, D. L. Clarke-Pearson, "Comparing the areas under two or more correlated receiver
  operating characteristic curves: a nonparametric approach", Biometrics 44(3):837-845, 1988.
- X. Sun, W. Xu, "Fast implementation of DeLong's algorithm for comparing the areas under correlated receiver
  operating characteristic curves", IEEE Signal Processing Letters 21(11):1389-1393, 2014 (placements from
  midranks, O(N log N) instead of O(M N)).

The variance of the difference is Obuchowski's variance applied to the per-image differences of the two
modalities' placements, which is algebraically her V(θ_a) + V(θ_b) - 2 Cov(θ_a, θ_b), the cross-modality
S11 terms entering as S11^(ab) + S11^(ba). Written by hand (no maintained Python package does clustered ROC),
vectorised with numpy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import ndtr

# Placement values lie in [0, 1]; a variance of their difference below this is rounding, i.e. zero.
_ZERO_VARIANCE = 1e-20
_ZERO_DELTA = 1e-12


def placements(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seed-averaged structural components of the AUC from midranks (Sun & Xu 2014): V10 (m,) per positive image,
    the fraction of negatives it outscores (ties count half), and V01 (n,) per negative image, the fraction of
    positives that outscore it. `scores` is (N,) or (n_seeds, N); positive is a bool (N,) mask.

    A positive's midrank among all images less its midrank among the positives counts the negatives below it
    (ties half); likewise for negatives. Their means are the AUC.
    """
    positive = np.asarray(positive, dtype=bool)
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    x, y = s[:, positive], s[:, ~positive]
    m, n = x.shape[1], y.shape[1]
    ranks = _midranks(np.concatenate([x, y], axis=1))
    v10 = (ranks[:, :m] - _midranks(x)) / n
    v01 = 1.0 - (ranks[:, m:] - _midranks(y)) / m
    return v10.mean(axis=0), v01.mean(axis=0)


def _midranks(a: np.ndarray) -> np.ndarray:
    """Ranks along each row, ties sharing their mean rank: scipy.stats.rankdata(a, axis=1), by pandas, since
    importing scipy.stats costs every table job over a second of start-up."""
    return pd.DataFrame(a).rank(axis=1, method="average").to_numpy()


def _labels(y_true) -> np.ndarray:
    """The positive mask of binary labels (bool or 0/1); ValueError for anything else."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be one-dimensional (N,), got shape {y.shape}")
    if y.dtype == bool:
        return y
    if y.dtype.kind not in "iuf" or not np.isin(y, [0, 1]).all():
        shown = np.unique(y.astype(str))[:5].tolist() if y.size else []
        raise ValueError(
            f"y_true must be binary (bool or 0/1), got dtype {y.dtype} with values such as {shown}"
        )
    return y.astype(bool)


def _scores(scores, n_images: int, name: str) -> np.ndarray:
    """`scores` as (n_seeds, N) floats; ValueError naming the shapes when they do not match the labels."""
    s = np.asarray(scores, dtype=float)
    if s.ndim not in (1, 2) or s.shape[-1] != n_images or (s.ndim == 2 and s.shape[0] == 0):
        raise ValueError(
            f"{name} has shape {s.shape}; {n_images} labels need scores of shape ({n_images},)"
            f" or (n_seeds, {n_images}) with n_seeds >= 1"
        )
    if not np.isfinite(s).all():
        raise ValueError(f"{name} holds non-finite scores (NaN or inf)")
    return np.atleast_2d(s)


def _cluster_index(groups, n_images: int) -> np.ndarray:
    """Each image's cluster as an integer 0..K-1; every image its own cluster when `groups` is None."""
    if groups is None:
        return np.arange(n_images)
    g = np.asarray(groups)
    if g.shape != (n_images,):
        raise ValueError(f"groups has shape {g.shape}, expected ({n_images},) to match the labels")
    try:
        return np.unique(g, return_inverse=True)[1].reshape(-1)
    except TypeError:  # ids of kinds that do not sort against each other: number them by first appearance
        codes: dict = {}
        return np.array([codes.setdefault(v, len(codes)) for v in g.tolist()], dtype=np.intp)


def auc_difference(y_true, scores_a, scores_b, groups=None) -> tuple[float, float]:
    """(AUC_a - AUC_b, its variance) by Obuchowski's clustered method; groups=None: every image its own cluster
    (DeLong). Scores (N,) or (n_seeds, N), seed counts of a and b may differ: each side's placements are averaged
    over its seeds (the seed-averaged AUC is a U-statistic whose components are the seed averages), and the
    variance is that of the difference of the seed-averaged AUCs given the scores. NaN variance where it cannot
    be estimated (fewer than two clusters holding a positive, or holding a negative); (nan, nan) without both
    classes.

    With D10, D01 the per-image differences of placements and Δ = mean(D10) = mean(D01); X_i, Y_i their sums
    over cluster i's m_i positives and n_i negatives; M, N the totals; I10, I01 the clusters holding a positive,
    a negative; K all clusters:
      S10 = I10 / ((I10 - 1) M) Σ (X_i - m_i Δ)²,  S01 = I01 / ((I01 - 1) N) Σ (Y_i - n_i Δ)²,
      S11 = K / (K - 1) Σ (X_i - m_i Δ)(Y_i - n_i Δ),  Var = S10 / M + S01 / N + 2 S11 / (M N).
    """
    positive = _labels(y_true)
    a = _scores(scores_a, len(positive), "scores_a")
    b = _scores(scores_b, len(positive), "scores_b")
    cluster = _cluster_index(groups, len(positive))
    m_total, n_total = int(positive.sum()), int((~positive).sum())
    if m_total == 0 or n_total == 0:
        return float("nan"), float("nan")
    a10, a01 = placements(positive, a)
    b10, b01 = placements(positive, b)
    d10, d01 = a10 - b10, a01 - b01
    delta = float(d10.mean())

    k = int(cluster.max()) + 1
    pos_cluster, neg_cluster = cluster[positive], cluster[~positive]
    m_i = np.bincount(pos_cluster, minlength=k)
    n_i = np.bincount(neg_cluster, minlength=k)
    i10, i01 = int(np.count_nonzero(m_i)), int(np.count_nonzero(n_i))
    if i10 < 2 or i01 < 2:
        return delta, float("nan")
    # Centred cluster sums; zero for a cluster without positives (resp. negatives).
    x = np.bincount(pos_cluster, weights=d10, minlength=k) - m_i * delta
    y = np.bincount(neg_cluster, weights=d01, minlength=k) - n_i * delta
    s10 = i10 / ((i10 - 1) * m_total) * float(x @ x)
    s01 = i01 / ((i01 - 1) * n_total) * float(y @ y)
    s11 = k / (k - 1) * float(x @ y)
    variance = s10 / m_total + s01 / n_total + 2.0 * s11 / (m_total * n_total)
    return delta, variance


def auc_difference_test(y_true, scores_a, scores_b, groups=None) -> tuple[float, float]:
    """(delta, two-sided p) from auc_difference with a normal reference distribution. A variance below 1e-20
    (identical scores) gives p = 1 when |delta| < 1e-12, else 0. NaN p when the variance is NaN."""
    delta, variance = auc_difference(y_true, scores_a, scores_b, groups)
    if np.isnan(variance):
        return delta, float("nan")
    if variance < _ZERO_VARIANCE:
        return delta, 1.0 if abs(delta) < _ZERO_DELTA else 0.0
    return delta, float(2.0 * ndtr(-abs(delta) / np.sqrt(variance)))
