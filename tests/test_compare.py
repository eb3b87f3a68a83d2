"""Paired comparisons: DeLong against a by-hand O(n²) computation, Holm by hand, and the paired group
bootstrap's coverage of a known Δ AUC on simulated clustered data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from dermcompress.learn import bootstrap
from dermcompress.learn.metrics import predictions_frame
from dermcompress.study.compare import delong_test, holm, paired_comparison

BINARY = ["MEL", "NV"]
THREE = ["A", "B", "C"]


def binary_frame(labels, scores, groups=None) -> pd.DataFrame:
    """Test-split predictions with P(NV) = sigmoid(score) (monotone: the AUC is the scores')."""
    labels = np.asarray(labels)
    ids = [f"ISIC_{i:07d}" for i in range(len(labels))]
    groups = ids if groups is None else [f"IL_{g:07d}" for g in groups]
    p_nv = 1 / (1 + np.exp(-np.asarray(scores, dtype=float)))
    probs = np.stack([1 - p_nv, p_nv], axis=1)
    return predictions_frame(ids, labels, probs, BINARY, group_ids=groups, split="test")


def noisy_scores(labels, rng, shift=1.0, noise=1.0):
    return shift * np.asarray(labels) + noise * rng.normal(size=len(labels))


# --- DeLong against an independent computation ------------------------------------------------------------


def psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def delong_by_hand(y, a, b):
    """DeLong, DeLong & Clarke-Pearson (1988) with explicit loops; a, b are (n_seeds, N), seed-averaged."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m, n = len(pos), len(neg)
    v10 = np.zeros((2, m))
    v01 = np.zeros((2, n))
    for r, s in enumerate((a, b)):
        for seed_scores in s:
            for i, pi in enumerate(pos):
                for j, nj in enumerate(neg):
                    k = psi(seed_scores[pi], seed_scores[nj])
                    v10[r, i] += k / n / len(s)
                    v01[r, j] += k / m / len(s)
    theta = v10.mean(axis=1)
    s10 = np.array(
        [[np.sum((v10[r] - theta[r]) * (v10[q] - theta[q])) / (m - 1) for q in (0, 1)] for r in (0, 1)]
    )
    s01 = np.array(
        [[np.sum((v01[r] - theta[r]) * (v01[q] - theta[q])) / (n - 1) for q in (0, 1)] for r in (0, 1)]
    )
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    delta = theta[0] - theta[1]
    return delta, 2 * norm.sf(abs(delta) / np.sqrt(var))


@pytest.mark.parametrize(("seeds_a", "seeds_b"), [(1, 1), (2, 3)])
def test_delong_matches_by_hand_computation(seeds_a, seeds_b):
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 70)
    # Rounded scores: many ties, within a model and across the classes.
    a = np.round(np.stack([noisy_scores(y, rng, 1.2) for _ in range(seeds_a)]), 1)
    b = np.round(np.stack([noisy_scores(y, rng, 0.8) for _ in range(seeds_b)]), 1)
    delta, p = delong_test(y, a if seeds_a > 1 else a[0], b if seeds_b > 1 else b[0])
    want_delta, want_p = delong_by_hand(y, a, b)
    assert delta == pytest.approx(want_delta, abs=1e-10)
    assert p == pytest.approx(want_p, abs=1e-10)
    sk = np.mean([roc_auc_score(y, s) for s in a]) - np.mean([roc_auc_score(y, s) for s in b])
    assert delta == pytest.approx(sk, abs=1e-12)
    assert 0 < p < 1


def test_delong_identical_scores_and_bad_labels():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    s = noisy_scores(y, rng)
    assert delong_test(y.astype(bool), s, s.copy()) == (0.0, 1.0)
    with pytest.raises(ValueError, match="binary"):
        delong_test(np.array([0, 1, 2]), np.zeros(3), np.zeros(3))


def test_delong_p_is_roughly_uniform_under_the_null():
    rng = np.random.default_rng(5)
    ps = []
    for _ in range(300):
        y = rng.random(120) < 0.4
        shared = rng.normal(size=120)  # correlated models of equal skill
        ps.append(delong_test(y, y + shared + rng.normal(size=120), y + shared + rng.normal(size=120))[1])
    ps = np.array(ps)
    print(
        f"DeLong under the null: P(p < 0.05) = {np.mean(ps < 0.05):.3f}, P(p < 0.5) = {np.mean(ps < 0.5):.3f}"
    )
    assert 0.02 <= np.mean(ps < 0.05) <= 0.09
    assert 0.4 <= np.mean(ps < 0.5) <= 0.6


# --- Holm -------------------------------------------------------------------------------------------------


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm(np.array([0.01, 0.04, 0.03, 0.005])), [0.03, 0.06, 0.06, 0.02])
    # NaNs stay put and do not count: m = 2 here.
    np.testing.assert_allclose(holm(np.array([np.nan, 0.02, 0.6, np.nan])), [np.nan, 0.04, 0.6, np.nan])
    np.testing.assert_allclose(holm(np.array([0.5, 0.7, 0.9])), [1.0, 1.0, 1.0])  # capped
    assert holm(np.array([])).shape == (0,)


# --- paired_comparison ------------------------------------------------------------------------------------


def grouped_data(rng, n_groups=150, prevalence=0.4):
    """Lesion groups of 1-3 images, one label per group; returns (labels, groups) per image."""
    sizes = rng.integers(1, 4, n_groups)
    group_labels = (rng.random(n_groups) < prevalence).astype(int)
    groups = np.repeat(np.arange(n_groups), sizes)
    return group_labels[groups], groups


def test_identical_rows_give_zero_delta_and_p_one():
    rng = np.random.default_rng(1)
    y, groups = grouped_data(rng)
    ref = [binary_frame(y, noisy_scores(y, rng), groups) for _ in range(2)]
    other = [binary_frame(y, noisy_scores(y, rng, 0.5), groups)]
    table = paired_comparison([ref, [f.copy() for f in ref], other], 0, BINARY, n_bootstrap=300, seed=0)
    assert list(table.columns) == [
        "reference",
        *(f"delta_auc{s}" for s in ("", "_low", "_high", "_p", "_p_holm")),
        *(f"delta_balanced_accuracy{s}" for s in ("", "_low", "_high", "_p", "_p_holm")),
        "delong_p",
        "delong_p_holm",
    ]
    assert table["reference"].tolist() == [True, False, False]
    for metric in ("auc", "balanced_accuracy"):
        col = f"delta_{metric}"
        assert table.loc[0, [col, f"{col}_low", f"{col}_high"]].tolist() == [0.0, 0.0, 0.0]
        assert np.isnan(table.loc[0, [f"{col}_p", f"{col}_p_holm"]].to_numpy(float)).all()
        assert table.loc[1, [col, f"{col}_low", f"{col}_high", f"{col}_p"]].tolist() == [0.0, 0.0, 0.0, 1.0]
        assert table.loc[1, f"{col}_p_holm"] == 1.0
    assert table.loc[1, "delong_p"] == 1.0 and np.isnan(table.loc[0, "delong_p"])
    # The weaker model: clearly worse, and the Holm p is its raw p times the two tests, monotone.
    assert table.loc[2, "delta_auc_high"] < 0 and table.loc[2, "delta_auc_p"] < 0.05
    assert table.loc[2, "delta_auc_p_holm"] == pytest.approx(min(1, 2 * table.loc[2, "delta_auc_p"]))


def test_alignment_on_image_id_and_mismatched_images():
    rng = np.random.default_rng(2)
    y, groups = grouped_data(rng, 80)
    rows = [[binary_frame(y, noisy_scores(y, rng, d), groups) for _ in range(2)] for d in (1.0, 0.7, 1.3)]
    want = paired_comparison(rows, 1, BINARY, n_bootstrap=200, seed=4)
    shuffled = [[f.sample(frac=1, random_state=i) for i, f in enumerate(frames)] for frames in rows]
    # Only the non-reference rows permuted: bit-identical; the reference too: the same up to rounding.
    partly = [shuffled[0], rows[1], shuffled[2]]
    pd.testing.assert_frame_equal(paired_comparison(partly, 1, BINARY, n_bootstrap=200, seed=4), want)
    got = paired_comparison(shuffled, 1, BINARY, n_bootstrap=200, seed=4)
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-12, atol=1e-12)

    dropped = [rows[0], rows[1], [rows[2][0], rows[2][1].iloc[1:]]]
    with pytest.raises(ValueError, match=r"row 2 .*missing \['ISIC_0000000'\]"):
        paired_comparison(dropped, 1, BINARY, n_bootstrap=10, seed=0)
    renamed = rows[0][0].assign(image_id=rows[0][0]["image_id"].str.replace("ISIC_0000003", "ISIC_X"))
    with pytest.raises(ValueError, match=r"row 0 .*extra \['ISIC_X'\]"):
        paired_comparison([[renamed], rows[1]], 1, BINARY, n_bootstrap=10, seed=0)


def test_seed_averaging_of_the_point_delta():
    rng = np.random.default_rng(3)
    y, groups = grouped_data(rng, 100)
    ref = [binary_frame(y, noisy_scores(y, rng, 1.0), groups) for _ in range(2)]
    row = [binary_frame(y, noisy_scores(y, rng, 0.6), groups) for _ in range(2)]
    table = paired_comparison([row, ref], 1, BINARY, n_bootstrap=100, seed=0)

    def auc(f):
        return roc_auc_score(f["label"] == "NV", f["prob_NV"])

    def bacc(f):
        return balanced_accuracy_score(f["label"], f["pred"])

    for name, score in (("auc", auc), ("balanced_accuracy", bacc)):
        per_seed = [score(r) - score(f) for r, f in zip(row, ref, strict=True)]
        assert table.loc[0, f"delta_{name}"] == pytest.approx(np.mean(per_seed), abs=1e-12)
        assert (
            table.loc[0, f"delta_{name}_low"]
            <= table.loc[0, f"delta_{name}"]
            <= table.loc[0, f"delta_{name}_high"]
        )
    # DeLong's Δ is the same seed-averaged AUC difference.
    scores = [np.stack([f["prob_NV"].to_numpy() for f in fs]) for fs in (row, ref)]
    assert delong_test(y, *scores)[0] == pytest.approx(table.loc[0, "delta_auc"], abs=1e-12)


def test_multiclass_uses_macro_auc_and_no_delong():
    rng = np.random.default_rng(6)
    n = 150
    y = rng.integers(0, 3, n)
    ids = [f"ISIC_{i:07d}" for i in range(n)]

    def frame(skill):
        logits = rng.normal(size=(n, 3))
        logits[np.arange(n), y] += skill
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return predictions_frame(ids, y, probs, THREE, group_ids=ids, split="test"), probs

    (a, pa), (b, pb) = frame(1.5), frame(0.5)
    table = paired_comparison([[a], [b]], 1, THREE, n_bootstrap=100, seed=0)
    want = roc_auc_score(y, pa, multi_class="ovr") - roc_auc_score(y, pb, multi_class="ovr")
    assert table.loc[0, "delta_auc"] == pytest.approx(want, abs=1e-12)
    assert table["delong_p"].isna().all() and table["delong_p_holm"].isna().all()


def test_paired_bootstrap_covers_the_true_delta_auc():
    """Clustered scores: a group effect g shared by a lesion's images and by both models, plus image noise.
    A positive and a negative image are never of one group, so their score difference is N(d, 2 s²) and the
    true AUC is Φ(d / √(2 s²)); the paired 95% interval of Δ should cover Φ(d_A/√2s²) - Φ(d_B/√2s²) about 95% of
    the time. It is also narrower than the two models' own intervals combined as if independent."""
    rng = np.random.default_rng(20240601)
    d_a, d_b, sigma_g, sigma_e = 1.0, 0.6, 0.8, 0.6
    s = np.sqrt(2 * (sigma_g**2 + sigma_e**2))
    true_delta = norm.cdf(d_a / s) - norm.cdf(d_b / s)
    covered, narrower = [], []
    for _ in range(200):
        y, groups = grouped_data(rng)
        g = sigma_g * rng.normal(size=groups.max() + 1)[groups]
        a = binary_frame(y, d_a * y + g + sigma_e * rng.normal(size=len(y)), groups)
        b = binary_frame(y, d_b * y + g + sigma_e * rng.normal(size=len(y)), groups)
        row = paired_comparison([[a], [b]], 1, BINARY, n_bootstrap=500, seed=int(rng.integers(1 << 31))).loc[
            0
        ]
        covered.append(row["delta_auc_low"] <= true_delta <= row["delta_auc_high"])
        if len(narrower) < 20:  # each model's own group-bootstrap interval, from independent resamples
            widths = []
            for k, f in enumerate((a, b)):
                w = bootstrap.group_weights(groups, 500, k)
                low, high = bootstrap.percentile_ci(
                    bootstrap.weighted_auc(y, f[["prob_MEL", "prob_NV"]].to_numpy(), w)
                )
                widths.append(high - low)
            narrower.append(row["delta_auc_high"] - row["delta_auc_low"] < np.hypot(*widths))
    coverage = np.mean(covered)
    print(
        f"paired bootstrap: 95% interval covers the true Δ AUC {true_delta:.4f} in {coverage:.1%} of 200 data sets"
    )
    assert 0.90 <= coverage <= 0.99
    assert np.mean(narrower) >= 0.9
