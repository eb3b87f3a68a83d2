"""Clustered ROC (Obuchowski 1997): placements against an O(M·N) double loop, the singleton case against a
by-hand DeLong, the clustered variance against a by-hand per-cluster Obuchowski, its size against a cluster
bootstrap, and the calibration of its test under the null on clustered data (where DeLong is too liberal)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from dermcompress.study.clustered_roc import auc_difference, auc_difference_test, placements


def psi(x: float, y: float) -> float:
    """The Mann-Whitney kernel: 1 if the positive outscores the negative, ties half."""
    return 1.0 if x > y else 0.5 if x == y else 0.0


def loop_placements(y: np.ndarray, scores: np.ndarray) -> tuple[list[float], list[float]]:
    """V10 per positive and V01 per negative by explicit loops over pairs, averaged over seeds."""
    rows = np.atleast_2d(scores)
    pos = [j for j in range(len(y)) if y[j]]
    neg = [j for j in range(len(y)) if not y[j]]
    v10 = [0.0] * len(pos)
    v01 = [0.0] * len(neg)
    for s in rows:
        for p, j in enumerate(pos):
            v10[p] += sum(psi(s[j], s[k]) for k in neg) / len(neg) / len(rows)
        for q, k in enumerate(neg):
            v01[q] += sum(psi(s[j], s[k]) for j in pos) / len(pos) / len(rows)
    return v10, v01


def tied_data(rng: np.random.Generator, n: int, n_seeds_a: int, n_seeds_b: int):
    """Labels and integer-valued scores (many ties); (N,) scores for a seed count of 0."""
    y = rng.random(n) < 0.4
    y[:2], y[2:4] = True, False

    def draw(seeds: int) -> np.ndarray:
        shape = (n,) if seeds == 0 else (seeds, n)
        return np.round(y + rng.normal(0, 1.2, shape) * 2) / 2

    return y, draw(n_seeds_a), draw(n_seeds_b)


@pytest.mark.parametrize(("seeds_a", "seeds_b"), [(0, 0), (3, 0), (2, 5), (1, 4)])
def test_placements_and_delta_match_double_loop(seeds_a, seeds_b):
    y, a, b = tied_data(np.random.default_rng(seeds_a * 10 + seeds_b), 23, seeds_a, seeds_b)
    assert len(np.unique(a)) < a.size  # ties present
    for scores in (a, b):
        v10, v01 = placements(y, scores)
        e10, e01 = loop_placements(y, scores)
        assert v10.shape == (y.sum(),) and v01.shape == ((~y).sum(),)
        np.testing.assert_allclose(v10, e10, rtol=0, atol=1e-13)
        np.testing.assert_allclose(v01, e01, rtol=0, atol=1e-13)
        assert np.mean(e10) == pytest.approx(np.mean(e01), abs=1e-13)
    delta, _ = auc_difference(y.astype(int), a, b)
    expected = np.mean(loop_placements(y, a)[0]) - np.mean(loop_placements(y, b)[0])
    assert delta == pytest.approx(expected, abs=1e-13)
    # Δ is the difference of the seed-averaged AUCs.
    auc_a, auc_b = (np.mean([roc_auc_score(y, r) for r in np.atleast_2d(s)]) for s in (a, b))
    assert delta == pytest.approx(auc_a - auc_b, abs=1e-13)


def delong_by_hand(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """DeLong et al. (1988): Var(θ_a - θ_b) = L S L' with S = S10 / m + S01 / n, S10 and S01 the 2×2
    covariance matrices (ddof 1) of the two modalities' placements, by explicit loops."""
    comps = [loop_placements(y, s) for s in (a, b)]
    m, n = len(comps[0][0]), len(comps[0][1])
    theta = [sum(c[0]) / m for c in comps]
    s = [[0.0, 0.0], [0.0, 0.0]]
    for r in range(2):
        for t in range(2):
            s10 = sum((comps[r][0][j] - theta[r]) * (comps[t][0][j] - theta[t]) for j in range(m)) / (m - 1)
            s01 = sum((comps[r][1][k] - theta[r]) * (comps[t][1][k] - theta[t]) for k in range(n)) / (n - 1)
            s[r][t] = s10 / m + s01 / n
    return s[0][0] + s[1][1] - 2 * s[0][1]


def test_singleton_clusters_are_delong():
    rng = np.random.default_rng(7)
    y, a, _ = tied_data(rng, 60, 0, 0)
    b = np.round(0.6 * a + rng.normal(0, 1, 60) * 2) / 2  # correlated with a, with ties
    expected = delong_by_hand(y, a, b)
    ids = [f"IL_{i:07d}" for i in range(60)]
    for groups in (None, ids, np.arange(60)[::-1]):
        delta, variance = auc_difference(y, a, b, groups=groups)
        assert variance == pytest.approx(expected, rel=1e-12)
        _, p = auc_difference_test(y, a, b, groups=groups)
        assert p == pytest.approx(2 * norm.sf(abs(delta) / np.sqrt(expected)), rel=1e-10)
    assert 0 < p < 1


def obuchowski_by_hand(y: np.ndarray, a: np.ndarray, b: np.ndarray, groups: list[str]) -> tuple[float, float]:
    """Obuchowski (1997) per modality and across modalities, by loops over clusters: the cluster sums of
    placements V10_i., V01_i.; S10, S01, S11 for (a, a), (b, b), (a, b) and (b, a); then
    V(θ_k) = S10/M + S01/N + 2 S11/(MN), Cov(θ_a, θ_b) = S10^ab/M + S01^ab/N + (S11^ab + S11^ba)/(MN).
    Returns (Var(θ_a - θ_b), the part of it due to S11, i.e. to clusters holding both classes)."""
    clusters = sorted(set(groups))
    comps = [loop_placements(y, s) for s in (a, b)]
    pos = [j for j in range(len(y)) if y[j]]
    neg = [j for j in range(len(y)) if not y[j]]
    big_m, big_n = len(pos), len(neg)
    theta = [sum(c[0]) / big_m for c in comps]
    xs = {r: [] for r in range(2)}  # per modality: X_i - m_i θ per cluster
    ys = {r: [] for r in range(2)}
    i10 = i01 = 0
    for cluster in clusters:
        mine_pos = [p for p, j in enumerate(pos) if groups[j] == cluster]
        mine_neg = [q for q, k in enumerate(neg) if groups[k] == cluster]
        i10 += bool(mine_pos)
        i01 += bool(mine_neg)
        for r in range(2):
            xs[r].append(sum(comps[r][0][p] for p in mine_pos) - len(mine_pos) * theta[r])
            ys[r].append(sum(comps[r][1][q] for q in mine_neg) - len(mine_neg) * theta[r])
    k = len(clusters)

    def s10(r, t):
        return i10 / ((i10 - 1) * big_m) * sum(u * v for u, v in zip(xs[r], xs[t], strict=True))

    def s01(r, t):
        return i01 / ((i01 - 1) * big_n) * sum(u * v for u, v in zip(ys[r], ys[t], strict=True))

    def s11(r, t):
        return k / (k - 1) * sum(u * v for u, v in zip(xs[r], ys[t], strict=True))

    mn = big_m * big_n
    var = [s10(r, r) / big_m + s01(r, r) / big_n + 2 * s11(r, r) / mn for r in range(2)]
    cov = s10(0, 1) / big_m + s01(0, 1) / big_n + (s11(0, 1) + s11(1, 0)) / mn
    s11_part = (2 * s11(0, 0) + 2 * s11(1, 1) - 2 * (s11(0, 1) + s11(1, 0))) / mn
    return var[0] + var[1] - 2 * cov, s11_part


def clustered_tied_data(rng: np.random.Generator, seeds_a: int, seeds_b: int):
    """~40 clusters of 1-5 images: all-positive, all-negative and mixed clusters; a cluster effect; ties."""
    kinds = ["pos", "neg", "mixed"] * 14
    sizes = rng.integers(1, 6, len(kinds))
    groups, labels = [], []
    for c, (kind, size) in enumerate(zip(kinds, sizes, strict=True)):
        size = max(size, 2) if kind == "mixed" else size
        lab = (
            [True] * size
            if kind == "pos"
            else [False] * size
            if kind == "neg"
            else [True] + [False] * (size - 1)
        )
        groups += [f"IL_{c * 7919 % 100000:07d}"] * size
        labels += lab
    y, cl = np.array(labels), np.unique(groups, return_inverse=True)[1]
    effect = rng.normal(0, 1.0, (2, cl.max() + 1))

    def draw(seeds: int, r: int) -> np.ndarray:
        shape = (len(y),) if seeds == 0 else (seeds, len(y))
        return np.round(2 * (y + effect[r][cl] + rng.normal(0, 0.7, shape))) / 2

    return y, draw(seeds_a, 0), draw(seeds_b, 1), groups


@pytest.mark.parametrize(("seeds_a", "seeds_b"), [(0, 0), (3, 2)])
def test_clustered_variance_matches_by_hand_obuchowski(seeds_a, seeds_b):
    rng = np.random.default_rng(11 + seeds_a)
    y, a, b, groups = clustered_tied_data(rng, seeds_a, seeds_b)
    expected, s11_part = obuchowski_by_hand(y, a, b, groups)
    delta, variance = auc_difference(y, a, b, groups=groups)
    assert variance == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # The data exercise every term: S11 matters, and clustering moves the variance off DeLong's.
    assert abs(s11_part) > 0.02 * expected
    assert abs(auc_difference(y, a, b)[1] - variance) > 0.05 * variance
    # Image order and the spelling of the ids do not matter.
    perm = rng.permutation(len(y))
    renamed = np.array([g[::-1] for g in groups])
    d2, v2 = auc_difference(y[perm], a[..., perm], b[..., perm], groups=renamed[perm])
    assert (d2, v2) == pytest.approx((delta, variance), rel=1e-12)


def simulate_clustered(
    rng: np.random.Generator,
    n_clusters: int,
    sizes: np.ndarray,
    sd_shared: float,
    sd_own: float,
    sd_noise: float,
    shift_b: float = 1.0,
    flip: float = 0.1,
):
    """Clustered images: a lesion label per cluster (a few images flipped), a cluster effect shared by both
    score vectors, one of each vector's own, and image noise."""
    cluster = np.repeat(np.arange(n_clusters), sizes)
    y = (rng.random(n_clusters) < 0.35)[cluster] ^ (rng.random(len(cluster)) < flip)
    shared, own = rng.standard_normal(n_clusters), rng.standard_normal((2, n_clusters))
    base = sd_shared * shared[cluster]
    a = y + base + sd_own * own[0][cluster] + sd_noise * rng.standard_normal(len(cluster))
    b = shift_b * y + base + sd_own * own[1][cluster] + sd_noise * rng.standard_normal(len(cluster))
    return y, a, b, cluster


def test_variance_agrees_with_cluster_bootstrap():
    rng = np.random.default_rng(2024)
    k = 600
    y, a, b, cluster = simulate_clustered(rng, k, rng.integers(1, 5, k), 1.0, 0.8, 0.6, shift_b=0.7)
    delta, variance = auc_difference(y, a, b, groups=cluster)
    # Both AUCs in one call (two label columns, average=None); undrawn images (weight 0) left out, for speed.
    labels, scores = np.column_stack([y, y]), np.column_stack([a, b])
    deltas = []
    for _ in range(2000):
        weight = np.bincount(rng.integers(0, k, k), minlength=k)[cluster]
        drawn = weight > 0
        auc = roc_auc_score(labels[drawn], scores[drawn], sample_weight=weight[drawn], average=None)
        deltas.append(auc[0] - auc[1])
    boot_sd = np.std(deltas, ddof=1)
    assert abs(np.mean(deltas) - delta) < 0.1 * boot_sd
    # Over seeds 1-5 and 2024, sqrt(variance) / boot_sd was 0.966-1.006, DeLong's 0.716-0.751.
    assert np.sqrt(variance) == pytest.approx(boot_sd, rel=0.10)
    # The clustering matters here: DeLong's image-level variance is clearly off the bootstrap's.
    assert np.sqrt(auc_difference(y, a, b)[1]) < 0.85 * boot_sd


def test_null_calibration_under_clustering():
    """Same AUC for a and b; 300 clusters of 3 images with strong per-vector cluster effects. Over 20 seeds
    (0-9, 100-109) the clustered test rejected 3.0-7.25% of 400 nulls at 0.05 (mean 4.8%) and DeLong
    (groups=None) 14.5-20% (mean 17.2%), never less than 2.66 times the clustered rate; seed 3: 5.25%, 18%."""
    rng = np.random.default_rng(3)
    k, size = 300, 3
    p_clustered, p_delong = [], []
    for _ in range(400):
        y, a, b, cluster = simulate_clustered(rng, k, np.full(k, size), 0.0, 1.5, 0.5)
        p_clustered.append(auc_difference_test(y, a, b, groups=cluster)[1])
        p_delong.append(auc_difference_test(y, a, b)[1])
    clustered, delong = np.mean(np.array(p_clustered) < 0.05), np.mean(np.array(p_delong) < 0.05)
    assert clustered < 0.09
    assert delong > 2.0 * clustered and delong > 0.12


def test_errors_and_degenerate_cases():
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.arange(6.0)
    for bad in (
        [0, 1, 2, 1, 0, 1],
        ["a", "b", "a", "b", "a", "b"],
        [0, 0.5, 1, 1, 0, 0],
        [[0, 1, 0, 1, 1, 0]],
    ):
        with pytest.raises(ValueError, match="y_true"):
            auc_difference(bad, s, s)
    for bad in (np.arange(5.0), np.zeros((2, 7)), np.zeros((2, 3, 6)), np.zeros((0, 6))):
        with pytest.raises(ValueError, match=rf"shape \({', '.join(map(str, bad.shape))},?\).*\(6,\)"):
            auc_difference_test(y, s, bad)
    with pytest.raises(ValueError, match=r"groups has shape \(5,\)"):
        auc_difference(y, s, s, groups=[1, 2, 3, 4, 5])
    # Identical scores: Δ = 0, p = 1, clustered or not, whatever the seed counts.
    two = np.stack([s, s])
    assert auc_difference_test(y, s, s) == (0.0, 1.0)
    assert auc_difference_test(y.astype(bool), two, s, groups=["g1", "g1", "g2", "g2", "g3", "g3"]) == (
        0.0,
        1.0,
    )
    # Zero variance with Δ ≠ 0 (a separates perfectly, b is constant): p = 0.
    assert auc_difference_test(y, y * 2.0, np.ones(6)) == (0.5, 0.0)
    # One class only: nothing to estimate.
    for labels in (np.zeros(6, int), np.ones(6, bool)):
        assert all(np.isnan(auc_difference(labels, s, s[::-1])))
        assert all(np.isnan(auc_difference_test(labels, s, s[::-1])))
    # All positives in one cluster: Δ is defined, its variance is not.
    delta, variance = auc_difference(y, s, s[::-1], groups=["p", "p", "n1", "p", "p", "n2"])
    assert np.isfinite(delta) and np.isnan(variance)
    assert np.isnan(auc_difference_test(y, s, s[::-1], groups=["p", "p", "n1", "p", "p", "n2"])[1])
