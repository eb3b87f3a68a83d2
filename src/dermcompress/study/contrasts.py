"""The statistics of a paired difference between table rows (a contrast), valid for the kind of difference it is.

A table row is scored per seed on the whole test split (`point`) and on every lesion-group resample of it
(`resampled`: one `learn.bootstrap.group_weights` matrix serves every row, so the resamples are paired across
rows). Its `recipe` names the trained models behind it: two rows with the same recipe are the same trained
models (seed for seed) scored on another test condition (a codec, a degradation applied at evaluation).

A contrast is a linear combination of rows: a difference (row - reference) or a difference of differences
(an interaction: does a codec cost model A more than model B?). Its estimate is the combination of the rows'
seed means, and its variance has up to two parts:

- test-set sampling: the variance of the combination over the group resamples (or an analytic variance such
  as Obuchowski's clustered ROC variance, clustered_roc.py). Lesions are resampled whole, so images of one lesion
  count as one unit of evidence; no floor on the p-value, unlike a p read off the resample distribution.
- seed-to-seed variance, when the contrast spans more than one recipe: "another recipe" is a claim about what
  training that recipe gives, and a new set of seeds would give other models. Per recipe, the per-seed value of
  its part of the combination varies over its seeds; its sample variance over n seeds, divided by n, is added
  (recipes trained independently). With one seed it cannot be estimated: the contrast then covers test-set
  sampling only, and says so. Within one recipe the trained models are held fixed (the question is what this
  test condition does to these models), so no seed variance enters.

The reference distribution is normal with no seed part, else Student's t with Welch-Satterthwaite degrees of
freedom (the sampling part counted as known): five seeds give roughly 4-8 df, where a normal would reject too
often. Intervals are the estimate ± the distribution's 97.5% quantile times the standard error, so an interval
excludes 0 exactly when p < 0.05. The seed part slightly double-counts the test-sampling noise that differs
between seeds (it sits in both parts): a conservative error, small beside the seed variance itself.
benchmarks/stats.py checks the type-I error and power of each test by simulation.

Holm's step-down adjustment (family-wise error, any dependence) is applied per family of rows (compare.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The normal and Student's t distributions by their scipy.special functions (what scipy.stats.norm and t call):
# importing scipy.stats costs every table job over a second of start-up.
from scipy.special import ndtr, ndtri, stdtr, stdtrit

SAME_MODELS = "same models"
RECIPE = "recipe"
# A variance below this is rounding of identical scores, i.e. zero.
_ZERO_VARIANCE = 1e-20


@dataclass(frozen=True)
class RowScores:
    """One row's values of one metric: `point` (n_seeds,) on the whole test split and `resampled`
    (n_seeds, n_resamples) on each group resample; `recipe` names the trained models (rows with the same recipe
    are the same models, their seeds in the same order)."""

    point: np.ndarray
    resampled: np.ndarray
    recipe: str

    @property
    def n_seeds(self) -> int:
        return len(self.point)


@dataclass(frozen=True)
class Contrast:
    """A contrast's estimate, standard error, degrees of freedom (inf: normal), 95% interval and two-sided p;
    its kind (SAME_MODELS or RECIPE), the seeds behind each recipe, and whether seed variance is covered."""

    delta: float
    se: float
    df: float
    low: float
    high: float
    p: float
    kind: str
    seeds: tuple[int, ...]
    seed_variance: bool

    @property
    def test(self) -> str:
        """The test in words, as a table names it."""
        if self.kind == SAME_MODELS:
            return "paired group bootstrap, models fixed (z)"
        if self.seed_variance:
            return "group bootstrap + seed variance (Welch t)"
        return "group bootstrap, 1 seed: seed variance not covered (z)"


def contrast(terms: Sequence[tuple[float, RowScores]], *, sampling_variance: float | None = None) -> Contrast:
    """The contrast Σ coefficient x row of `terms` (module docstring). The test-set sampling variance is that of
    the combination over the group resamples unless `sampling_variance` is given (an analytic one)."""
    if not terms:
        raise ValueError("a contrast needs at least one row")
    by_recipe: dict[str, np.ndarray] = {}
    resampled = 0.0
    for coefficient, row in terms:
        if row.point.ndim != 1 or row.resampled.shape[0] != row.n_seeds:
            raise ValueError(
                f"recipe {row.recipe}: point {row.point.shape} and resampled {row.resampled.shape}"
            )
        part = coefficient * row.point
        if row.recipe in by_recipe and len(by_recipe[row.recipe]) != len(part):
            raise ValueError(
                f"recipe {row.recipe}: rows with {len(by_recipe[row.recipe])} and {len(part)} seeds"
            )
        by_recipe[row.recipe] = by_recipe.get(row.recipe, 0.0) + part
        resampled = resampled + coefficient * row.resampled.mean(axis=0)
    delta = float(sum(per_seed.mean() for per_seed in by_recipe.values()))
    if sampling_variance is None:
        finite = np.asarray(resampled)[np.isfinite(resampled)]
        sampling_variance = float(finite.var(ddof=1)) if len(finite) > 1 else np.nan
    seeds = tuple(len(v) for v in by_recipe.values())
    kind = SAME_MODELS if len(by_recipe) == 1 else RECIPE
    seed_parts = [v.var(ddof=1) / len(v) for v in by_recipe.values() if len(v) > 1] if kind == RECIPE else []
    seed_df = [len(v) - 1 for v in by_recipe.values() if len(v) > 1] if kind == RECIPE else []
    variance = sampling_variance + float(sum(seed_parts))
    df = welch_df(variance, seed_parts, seed_df)
    covered = kind == SAME_MODELS or all(n > 1 for n in seeds)
    return Contrast(delta, *_wald(delta, variance, df), kind=kind, seeds=seeds, seed_variance=covered)


def difference(row: RowScores, reference: RowScores, *, sampling_variance: float | None = None) -> Contrast:
    """row - reference."""
    return contrast([(1.0, row), (-1.0, reference)], sampling_variance=sampling_variance)


def interaction(a: RowScores, a_reference: RowScores, b: RowScores, b_reference: RowScores) -> Contrast:
    """(a - a_reference) - (b - b_reference): a difference of two contrasts, e.g. what a codec costs model A
    beyond what it costs model B, or subgroup S beyond the rest (rows scored on the subgroup's images)."""
    return contrast([(1.0, a), (-1.0, a_reference), (-1.0, b), (1.0, b_reference)])


def welch_df(variance: float, seed_parts: Sequence[float], seed_df: Sequence[int]) -> float:
    """Welch-Satterthwaite degrees of freedom of `variance`, whose estimated parts `seed_parts` have `seed_df`
    degrees of freedom each and whose rest is known (infinite df); inf without a seed part."""
    denominator = sum(part**2 / df for part, df in zip(seed_parts, seed_df, strict=True))
    if denominator <= 0 or not np.isfinite(variance):
        return np.inf
    return float(variance**2 / denominator)


def _wald(delta: float, variance: float, df: float) -> tuple[float, float, float, float, float]:
    """(se, df, low, high, p) of the estimate `delta` with `variance` against t(df) (normal for inf df). A zero
    variance (identical scores) gives p = 1 for Δ = 0, else 0; NaN where the variance is unknown."""
    if not np.isfinite(variance) or not np.isfinite(delta):
        return np.nan, df, np.nan, np.nan, np.nan
    se = float(np.sqrt(max(variance, 0.0)))
    if variance < _ZERO_VARIANCE:
        return se, df, delta, delta, 1.0 if abs(delta) < 1e-12 else 0.0
    z = abs(delta) / se
    if np.isinf(df):
        quantile, p = ndtri(0.975), 2.0 * ndtr(-z)
    else:
        quantile, p = stdtrit(df, 0.975), 2.0 * stdtr(df, -z)
    return se, df, delta - quantile * se, delta + quantile * se, float(p)


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
