"""Paired comparisons: the contrasts' statistics by hand, each row against its own model's reference row, tests
that fit the kind of contrast (same models: bootstrap z; recipe: + seed variance, Welch t), no p-value floor,
declared Holm families, unselected rows without a p, interactions, and coverage on simulated clustered data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from scipy.stats import t as student_t
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from dermcompress.learn import bootstrap
from dermcompress.learn.metrics import predictions_frame
from dermcompress.learn.runs import Evaluation, Run
from dermcompress.study import aggregate, tables
from dermcompress.study.clustered_roc import auc_difference_test
from dermcompress.study.compare import interaction_comparison, paired_comparison
from dermcompress.study.contrasts import RECIPE, SAME_MODELS, RowScores, contrast, difference, holm

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


def grouped_data(rng, n_groups=150, prevalence=0.4):
    """Lesion groups of 1-3 images, one label per group; returns (labels, groups) per image."""
    sizes = rng.integers(1, 4, n_groups)
    group_labels = (rng.random(n_groups) < prevalence).astype(int)
    groups = np.repeat(np.arange(n_groups), sizes)
    return group_labels[groups], groups


def auc(frame: pd.DataFrame) -> float:
    return roc_auc_score(frame["label"] == "NV", frame["prob_NV"])


def bacc(frame: pd.DataFrame) -> float:
    return balanced_accuracy_score(frame["label"], frame["pred"])


# --- contrasts by hand ------------------------------------------------------------------------------------


def scores(rng, n_seeds, recipe, center=0.8, seed_sd=0.0, b=200) -> RowScores:
    point = center + seed_sd * rng.normal(size=n_seeds)
    return RowScores(point, point[:, None] + 0.01 * rng.normal(size=(n_seeds, b)), recipe)


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm(np.array([0.01, 0.04, 0.03, 0.005])), [0.03, 0.06, 0.06, 0.02])
    # NaNs stay put and do not count: m = 2 here.
    np.testing.assert_allclose(holm(np.array([np.nan, 0.02, 0.6, np.nan])), [np.nan, 0.04, 0.6, np.nan])
    np.testing.assert_allclose(holm(np.array([0.5, 0.7, 0.9])), [1.0, 1.0, 1.0])  # capped
    assert holm(np.array([])).shape == (0,)


def test_same_models_contrast_is_the_paired_bootstrap_with_a_normal_p():
    rng = np.random.default_rng(0)
    a, b = scores(rng, 3, "r"), scores(rng, 3, "r", center=0.78)
    got = difference(a, b)
    resampled = a.resampled.mean(axis=0) - b.resampled.mean(axis=0)
    se = resampled.std(ddof=1)
    delta = a.point.mean() - b.point.mean()
    assert got.kind == SAME_MODELS and got.df == np.inf and got.seed_variance
    assert got.delta == pytest.approx(delta) and got.se == pytest.approx(se)
    assert got.p == pytest.approx(2 * norm.sf(abs(delta) / se))
    assert [got.low, got.high] == pytest.approx([delta - 1.959964 * se, delta + 1.959964 * se])
    assert "models fixed" in got.test


def test_recipe_contrast_adds_both_recipes_seed_variance_with_welch_df():
    rng = np.random.default_rng(1)
    a, b = scores(rng, 5, "a", seed_sd=0.02), scores(rng, 4, "b", center=0.78, seed_sd=0.03)
    got = difference(a, b)
    boot = (a.resampled.mean(axis=0) - b.resampled.mean(axis=0)).var(ddof=1)
    parts = [a.point.var(ddof=1) / 5, b.point.var(ddof=1) / 4]
    variance = boot + sum(parts)
    df = variance**2 / (parts[0] ** 2 / 4 + parts[1] ** 2 / 3)
    assert got.kind == RECIPE and got.seeds == (5, 4) and got.seed_variance
    assert got.se == pytest.approx(np.sqrt(variance)) and got.df == pytest.approx(df)
    t = abs(got.delta) / got.se
    assert got.p == pytest.approx(2 * student_t.sf(t, df))
    assert got.high - got.delta == pytest.approx(student_t.ppf(0.975, df) * got.se)
    # An analytic sampling variance replaces the bootstrap's; the seed part stays.
    analytic = difference(a, b, sampling_variance=1e-4)
    assert analytic.se == pytest.approx(np.sqrt(1e-4 + sum(parts)))


def test_one_seed_recipe_says_seed_variance_is_not_covered():
    rng = np.random.default_rng(2)
    got = difference(scores(rng, 1, "a"), scores(rng, 1, "b"))
    assert got.kind == RECIPE and not got.seed_variance and got.df == np.inf
    assert "not covered" in got.test


def test_a_contrast_refuses_rows_of_one_recipe_with_other_seed_counts():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="recipe r: rows with 2 and 3 seeds"):
        contrast([(1.0, scores(rng, 2, "r")), (-1.0, scores(rng, 3, "r"))])


# --- paired_comparison ------------------------------------------------------------------------------------


def test_identical_rows_give_zero_delta_and_p_one():
    rng = np.random.default_rng(1)
    y, groups = grouped_data(rng)
    ref = [binary_frame(y, noisy_scores(y, rng), groups) for _ in range(2)]
    other = [binary_frame(y, noisy_scores(y, rng, 0.5), groups)]
    table = paired_comparison(
        [ref, [f.copy() for f in ref], other],
        [0, 0, 0],
        BINARY,
        recipes=["r", "r", "other"],
        n_bootstrap=300,
        seed=0,
    )
    assert table["reference"].tolist() == [True, False, False]
    assert table["compared_with"].tolist() == [0, 0, 0]
    assert table["contrast"].tolist() == ["", SAME_MODELS, RECIPE]
    for metric in ("auc", "balanced_accuracy"):
        col = f"delta_{metric}"
        assert table.loc[0, [col, f"{col}_low", f"{col}_high"]].tolist() == [0.0, 0.0, 0.0]
        assert np.isnan(table.loc[0, [f"{col}_p", f"{col}_p_holm"]].to_numpy(float)).all()
        assert table.loc[1, [col, f"{col}_low", f"{col}_high", f"{col}_p"]].tolist() == [0.0, 0.0, 0.0, 1.0]
        assert table.loc[1, f"{col}_p_holm"] == 1.0
    assert table.loc[1, "obuchowski_p"] == 1.0 and np.isnan(table.loc[0, "obuchowski_p"])
    # The weaker model: clearly worse (1 vs 2 seeds: no seed variance to estimate on its side), and its Holm p
    # is its raw p times the family's two tests, made monotone.
    assert table.loc[2, "delta_auc_high"] < 0 and table.loc[2, "delta_auc_p"] < 0.05
    assert table.loc[2, "delta_auc_p_holm"] == pytest.approx(min(1, 2 * table.loc[2, "delta_auc_p"]))
    assert table["family_size"].tolist() == [0, 2, 2]


def test_alignment_on_image_id_and_mismatched_images():
    rng = np.random.default_rng(2)
    y, groups = grouped_data(rng, 80)
    rows = [[binary_frame(y, noisy_scores(y, rng, d), groups) for _ in range(2)] for d in (1.0, 0.7, 1.3)]
    kwargs = {"recipes": ["a", "b", "c"], "n_bootstrap": 200, "seed": 4}
    want = paired_comparison(rows, [1, 1, 1], BINARY, **kwargs)
    shuffled = [[f.sample(frac=1, random_state=i) for i, f in enumerate(frames)] for frames in rows]
    # Only rows after the first permuted: bit-identical; the first too: the same up to rounding.
    partly = [rows[0], shuffled[1], shuffled[2]]
    pd.testing.assert_frame_equal(paired_comparison(partly, [1, 1, 1], BINARY, **kwargs), want)
    got = paired_comparison(shuffled, [1, 1, 1], BINARY, **kwargs)
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-12, atol=1e-12)

    dropped = [rows[0], rows[1], [rows[2][0], rows[2][1].iloc[1:]]]
    with pytest.raises(ValueError, match=r"row 2 .*missing \['ISIC_0000000'\]"):
        paired_comparison(dropped, [1, 1, 1], BINARY, **kwargs)
    renamed = rows[1][0].assign(image_id=rows[1][0]["image_id"].str.replace("ISIC_0000003", "ISIC_X"))
    with pytest.raises(ValueError, match=r"row 1 .*extra \['ISIC_X'\]"):
        paired_comparison([rows[0], [renamed], rows[2]], [1, 1, 1], BINARY, **kwargs)


def test_seed_averaged_delta_and_the_obuchowski_column():
    rng = np.random.default_rng(3)
    y, groups = grouped_data(rng, 100)
    ref = [binary_frame(y, noisy_scores(y, rng, 1.0), groups) for _ in range(2)]
    row = [binary_frame(y, noisy_scores(y, rng, 0.6), groups) for _ in range(2)]
    table = paired_comparison([row, ref], [1, 1], BINARY, recipes=["r", "r"], n_bootstrap=100, seed=0)
    for name, score in (("auc", auc), ("balanced_accuracy", bacc)):
        per_seed = [score(r) - score(f) for r, f in zip(row, ref, strict=True)]
        assert table.loc[0, f"delta_{name}"] == pytest.approx(np.mean(per_seed), abs=1e-12)
        assert (
            table.loc[0, f"delta_{name}_low"]
            <= table.loc[0, f"delta_{name}"]
            <= table.loc[0, f"delta_{name}_high"]
        )
    # Same models: Obuchowski's clustered test on the seed-averaged AUCs, as clustered_roc computes it.
    stacked = [np.stack([f["prob_NV"].to_numpy() for f in fs]) for fs in (row, ref)]
    delta, p = auc_difference_test(y, *stacked, groups=groups)
    assert delta == pytest.approx(table.loc[0, "delta_auc"], abs=1e-12)
    assert table.loc[0, "obuchowski_p"] == pytest.approx(p, rel=1e-9)


def test_multiclass_uses_macro_auc_and_no_obuchowski():
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
    table = paired_comparison([[a], [b]], [1, 1], THREE, recipes=["a", "b"], n_bootstrap=100, seed=0)
    want = roc_auc_score(y, pa, multi_class="ovr") - roc_auc_score(y, pb, multi_class="ovr")
    assert table.loc[0, "delta_auc"] == pytest.approx(want, abs=1e-12)
    assert table["obuchowski_p"].isna().all() and table["obuchowski_p_holm"].isna().all()


def seeded_models(rng, y, groups, n_seeds, shift, seed_sd):
    """Runs of one recipe: scores shift * y + lesion effect + noise, the shift moved per seed by seed_sd."""
    lesion = 0.5 * rng.normal(size=groups.max() + 1)[groups]
    return [
        (shift + seed_sd * rng.normal()) * y + lesion + 0.8 * rng.normal(size=len(y)) for _ in range(n_seeds)
    ]


def test_recipe_interval_widens_when_seeds_disagree_and_same_models_does_not():
    """Two data sets alike but for how much the five seeds of each recipe disagree: the recipe contrast's
    interval (seed variance added) widens a lot; the same-models contrast (the reference's own models on
    another test condition, models held fixed) stays about as wide."""
    rng = np.random.default_rng(7)
    y, groups = grouped_data(rng, 400)
    widths = {}
    for seed_sd in (0.0, 0.6):
        reference = seeded_models(rng, y, groups, 5, 1.2, seed_sd)
        condition = [s + 0.3 * rng.normal(size=len(y)) for s in reference]  # same models, another condition
        other = seeded_models(rng, y, groups, 5, 1.2, seed_sd)  # another recipe
        frames = [[binary_frame(y, s, groups) for s in side] for side in (reference, condition, other)]
        table = paired_comparison(
            frames, [0, 0, 0], BINARY, recipes=["ref", "ref", "other"], n_bootstrap=400, seed=1
        )
        assert table["contrast"].tolist() == ["", SAME_MODELS, RECIPE]
        widths[seed_sd] = (table["delta_auc_high"] - table["delta_auc_low"]).to_numpy()[1:]
    same, recipe = widths[0.6] / widths[0.0]
    assert recipe > 2.0 and 0.7 < same < 1.4, widths


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
        seed = int(rng.integers(1 << 31))
        row = paired_comparison([[a], [b]], [1, 1], BINARY, recipes=["a", "b"], n_bootstrap=500, seed=seed)
        row = row.loc[0]
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


# --- interactions -----------------------------------------------------------------------------------------


def test_interaction_of_two_models_codec_costs_recovers_the_planted_difference():
    """Binormal scores with unit noise shared by a model's two conditions: AUC = Φ(d / √2) exactly. A codec
    lowers model A's separation from 1.5 to 0.8 and model B's from 1.2 to 1.1: the interaction (A's cost
    minus B's) is known; three seeds per model."""
    rng = np.random.default_rng(11)
    n = 3000
    y = rng.integers(0, 2, n)
    true = (norm.cdf(0.8 / np.sqrt(2)) - norm.cdf(1.5 / np.sqrt(2))) - (
        norm.cdf(1.1 / np.sqrt(2)) - norm.cdf(1.2 / np.sqrt(2))
    )

    def model(clean, codec):
        noise = [rng.normal(size=n) for _ in range(3)]
        return [[binary_frame(y, d * y + e) for e in noise] for d in (codec, clean)]

    a_codec, a_clean = model(1.5, 0.8)
    b_codec, b_clean = model(1.2, 1.1)
    got = interaction_comparison(
        [a_codec, a_clean, b_codec, b_clean], ["A", "A", "B", "B"], BINARY, n_bootstrap=400, seed=0
    )["auc"]
    assert got.kind == RECIPE and got.seeds == (3, 3)
    by_hand = np.mean([auc(c) - auc(r) for c, r in zip(a_codec, a_clean, strict=True)]) - np.mean(
        [auc(c) - auc(r) for c, r in zip(b_codec, b_clean, strict=True)]
    )
    assert got.delta == pytest.approx(by_hand, abs=1e-12)
    assert got.low <= true <= got.high and abs(got.delta - true) < 3 * got.se
    assert got.p < 1e-6 and got.se < 0.02
    # The same cost for both models: no interaction to find.
    b_codec, b_clean = model(1.5, 0.8)
    null = interaction_comparison(
        [a_codec, a_clean, b_codec, b_clean], ["A", "A", "B", "B"], BINARY, n_bootstrap=400, seed=0
    )["auc"]
    assert null.low <= 0 <= null.high and null.p > 0.05


def test_interaction_by_hand_on_a_tiny_case():
    """Two models' codec costs on four hand-written rows (2 and 3 seeds, 3 resamples): the estimate, standard
    error, df and p recomputed by plain arithmetic. A wrong sign (b's cost added), a wrong coefficient in the
    resamples or a missing seed part each moves one of them."""
    from statistics import mean, variance

    from dermcompress.study.contrasts import interaction

    def row(point, resampled, recipe):
        return RowScores(np.array(point), np.array(resampled), recipe)

    a = row([0.80, 0.84], [[0.79, 0.82, 0.80], [0.83, 0.86, 0.85]], "A")
    a_ref = row([0.90, 0.92], [[0.91, 0.90, 0.89], [0.92, 0.93, 0.90]], "A")
    b = row([0.85, 0.86, 0.90], [[0.84, 0.86, 0.85], [0.87, 0.85, 0.86], [0.90, 0.91, 0.88]], "B")
    b_ref = row([0.88, 0.88, 0.91], [[0.89, 0.88, 0.87], [0.88, 0.89, 0.90], [0.91, 0.90, 0.92]], "B")
    cost_a = [0.80 - 0.90, 0.84 - 0.92]  # per seed: -0.10, -0.08
    cost_b = [0.85 - 0.88, 0.86 - 0.88, 0.90 - 0.91]  # -0.03, -0.02, -0.01
    estimate = mean(cost_a) - mean(cost_b)  # A loses 0.07 more than B
    per_resample = [
        mean(r[j] for r in a.resampled)
        - mean(r[j] for r in a_ref.resampled)
        - mean(r[j] for r in b.resampled)
        + mean(r[j] for r in b_ref.resampled)
        for j in range(3)
    ]
    seed_a, seed_b = variance(cost_a) / 2, variance(cost_b) / 3
    total = variance(per_resample) + seed_a + seed_b
    df = total**2 / (seed_a**2 / 1 + seed_b**2 / 2)
    got = interaction(a, a_ref, b, b_ref)
    assert got.delta == pytest.approx(-0.07, abs=1e-12) and got.delta == pytest.approx(estimate, abs=1e-12)
    assert got.se == pytest.approx(total**0.5, rel=1e-9) and got.df == pytest.approx(df, rel=1e-9)
    assert got.p == pytest.approx(2 * student_t.sf(0.07 / total**0.5, df), rel=1e-9)
    assert got.kind == RECIPE and got.seeds == (2, 3) and "Welch t" in got.test
    # Swapping the models flips the sign and nothing else.
    swapped = interaction(b, b_ref, a, a_ref)
    assert swapped.delta == pytest.approx(-got.delta) and swapped.se == pytest.approx(got.se)
    assert swapped.p == pytest.approx(got.p)


def test_subgroup_interaction_compares_a_codecs_cost_within_and_outside_the_subgroup():
    """One model, two test conditions; in subgroup S the codec removes more of the signal. Rows restricted to
    S and to the rest by image masks: Δ of Δ equals the recomputation on each subset, with models fixed."""
    rng = np.random.default_rng(12)
    n = 2000
    y = rng.integers(0, 2, n)
    subgroup = rng.random(n) < 0.5
    noise = rng.normal(size=n)
    clean = binary_frame(y, 1.5 * y + noise)
    codec = binary_frame(y, np.where(subgroup, 0.6, 1.3) * y + noise)
    got = interaction_comparison(
        [[codec], [clean], [codec], [clean]],
        ["m"] * 4,
        BINARY,
        images=[subgroup, subgroup, ~subgroup, ~subgroup],
        n_bootstrap=400,
        seed=0,
    )

    def cost(mask):
        return auc(codec[mask]) - auc(clean[mask])

    assert got["auc"].kind == SAME_MODELS
    assert got["auc"].delta == pytest.approx(cost(subgroup) - cost(~subgroup), abs=1e-12)
    assert got["auc"].high < 0 and got["auc"].p < 1e-6


# --- tables: references, families, selection ---------------------------------------------------------------


def write_runs(root: Path, rows: list[tuple[dict, list[pd.DataFrame], float]]) -> list[str]:
    """Evaluation folders (metrics.json, predictions.parquet) for (grid point, per-seed test frames, val AUC)."""
    base = {
        "model": "m",
        "res": 64,
        "train_variant": "clean",
        "mode": "finetune",
        "lr": "0.001",
        "schedule": "cosine",
        "epochs": 2,
        "label_fraction": "1",
    }
    metrics = []
    for point, frames, val_auc in rows:
        for seed, frame in enumerate(frames):
            fields = {**base, **point, "seed": seed}
            eval_variant = fields.pop("eval_variant", "clean")
            folder = root / Evaluation(Run(**fields), eval_variant).eval_dir
            folder.mkdir(parents=True, exist_ok=True)
            frame.to_parquet(folder / "predictions.parquet")
            values = {"auc": auc(frame), "balanced_accuracy": bacc(frame), "accuracy": bacc(frame)}
            values |= {"f1_macro": 0.5, "val_auc": val_auc, "val_balanced_accuracy": 0.5, "val_accuracy": 0.5}
            (folder / "metrics.json").write_text(json.dumps(values))
            metrics.append(str(folder / "metrics.json"))
    return metrics


def table_of(tmp_path: Path, rows, reference: dict, **kwargs) -> pd.DataFrame:
    out = {ext: str(tmp_path / f"t.{ext}") for ext in ("csv", "md", "tex", "html")}
    metrics = write_runs(tmp_path, rows)
    return tables.run_table(
        metrics=metrics, title="t", label="t", classes=BINARY, reference=reference, **out, **kwargs
    )


def test_thirty_large_effects_stay_significant_after_holm_with_1000_resamples(tmp_path):
    """29 test conditions of the same models, each with a large loss of AUC, against clean: Holm multiplies
    the smallest p by 29, and a p read off 1000 resamples could not go below 2/1001 (29 x 2/1001 = 0.058)."""
    rng = np.random.default_rng(30)
    y, groups = grouped_data(rng, 300)
    noise = rng.normal(size=len(y))
    rows = [({"eval_variant": "clean"}, [binary_frame(y, 2.0 * y + noise, groups)], 0.9)]
    rows += [
        (
            {"eval_variant": f"v{k:02d}"},
            [binary_frame(y, 0.3 * y + noise + rng.normal(size=len(y)), groups)],
            0.9,
        )
        for k in range(29)
    ]
    table = table_of(tmp_path, rows, {"eval_variant": "clean"}, n_bootstrap=1000)
    others = table.iloc[1:]
    assert (others["delta_auc"] < -0.2).all()
    assert (others["delta_auc_p_holm"] < 0.05).all() and (
        others["delta_balanced_accuracy_p_holm"] < 0.05
    ).all()
    assert (others["family_size"] == 29).all()


def test_each_row_is_compared_with_its_own_models_reference(tmp_path):
    """Three models at two resolutions, reference {res: 64}: every row's Δ is against its own model's 64 px row,
    never another model's."""
    rng = np.random.default_rng(31)
    y, groups = grouped_data(rng, 200)
    rows = []
    for model, skill in (("a", 2.0), ("b", 1.0), ("c", 0.5)):
        for res, loss in ((64, 0.0), (32, 0.3)):
            frames = [binary_frame(y, (skill - loss) * y + rng.normal(size=len(y)), groups) for _ in range(2)]
            rows.append(({"model": model, "res": res}, frames, 0.8))
    table = table_of(tmp_path, rows, {"res": 64}, n_bootstrap=200)
    for _, row in table.iterrows():
        own = table[(table["model"] == row["model"]) & (table["res"] == 64)].iloc[0]
        assert row["compared_with"] == f"{row['model']}, 64"
        assert row["delta_auc"] == pytest.approx(row["auc_mean"] - own["auc_mean"], abs=1e-12)
        assert row["reference"] == (row["res"] == 64)
    # A family per model: each 32 px row is tested alone (m = 1), a recipe contrast with 2 vs 2 seeds.
    assert table.loc[table["res"] == 32, "family_size"].tolist() == [1, 1, 1]
    assert set(table.loc[table["res"] == 32, "contrast"]) == {RECIPE}
    assert set(table.loc[table["res"] == 32, "seeds"]) == {"2 vs 2"}
    # Declared otherwise, the whole table is one family: Holm's m is 3.
    whole = table_of(tmp_path / "whole", rows, {"res": 64}, family="table", n_bootstrap=200)
    assert whole.loc[whole["res"] == 32, "family_size"].tolist() == [3, 3, 3]
    # A cross-model contrast when the reference names a model.
    cross = table_of(tmp_path / "cross", rows, {"model": "a", "res": 64}, n_bootstrap=200)
    assert set(cross.loc[cross["model"] != "a", "compared_with"]) == {"a, 64"}


def test_models_paired_by_name_are_compared_pair_by_pair(tmp_path):
    """reference {model: {a_derm: a, b_derm: b}}: each domain model's rows against its own init's at the same
    label fraction, the inits' rows their own references; a model's family is its pairing's."""
    rng = np.random.default_rng(34)
    y, groups = grouped_data(rng, 150)
    rows = []
    for model, skill in (("a", 1.0), ("a_derm", 1.5), ("b", 0.6), ("b_derm", 0.7)):
        for fraction in ("0.1", "1"):
            frames = [binary_frame(y, skill * y + rng.normal(size=len(y)), groups) for _ in range(2)]
            rows.append(({"model": model, "label_fraction": fraction}, frames, 0.8))
    pairs = {"model": {"a_derm": "a", "b_derm": "b"}}
    table = table_of(tmp_path, rows, pairs, n_bootstrap=100)
    for _, row in table.iterrows():
        init = {"a_derm": "a", "b_derm": "b"}.get(row["model"], row["model"])
        own = table[(table["model"] == init) & (table["label_fraction"] == row["label_fraction"])].iloc[0]
        assert row["compared_with"] == f"{init}, {row['label_fraction']}"
        assert row["reference"] == (init == row["model"])
        assert row["delta_auc"] == pytest.approx(row["auc_mean"] - own["auc_mean"], abs=1e-12)
    assert set(table.loc[~table["reference"], "contrast"]) == {RECIPE}


def test_an_interaction_is_each_rows_contrast_minus_its_counterparts(tmp_path):
    """Models a (plain) and b (compression-aware), each on clean and two codecs, reference {eval_variant:
    clean}, interaction {model: a}: b's codec rows get (b codec - b clean) - (a codec - a clean) with its
    interval and a p (Holm over the table's 2 interactions); the codecs cost a more than b, so it is positive
    and found. a's rows and the reference rows get none: empty, not zero."""
    rng = np.random.default_rng(35)
    y, groups = grouped_data(rng, 300)
    rows = []
    for model, costs in (
        ("a", {"clean": 2.0, "jpeg": 0.6, "webp": 0.8}),
        ("b", {"clean": 2.0, "jpeg": 1.8, "webp": 1.9}),
    ):
        noise = [rng.normal(size=len(y)) for _ in range(2)]  # the same trained models on every variant
        for variant, separation in costs.items():
            frames = [
                binary_frame(y, separation * y + e + 0.3 * rng.normal(size=len(y)), groups) for e in noise
            ]
            rows.append(({"model": model, "eval_variant": variant}, frames, 0.8))
    table = table_of(tmp_path, rows, {"eval_variant": "clean"}, interaction={"model": "a"}, n_bootstrap=200)
    table = table.set_index(["model", "eval_variant"])
    for variant in ("jpeg", "webp"):
        row, counterpart = table.loc[("b", variant)], table.loc[("a", variant)]
        assert row["interaction_with"] == f"a, {variant}"
        assert row["interaction_auc"] == pytest.approx(row["delta_auc"] - counterpart["delta_auc"], abs=1e-12)
        assert row["interaction_auc"] > 0.1 and row["interaction_auc_low"] > 0
        assert row["interaction_auc_p_holm"] < 0.05 and row["interaction_family_size"] == 2
        assert row["interaction_contrast"] == RECIPE and row["interaction_seeds"] == "2 vs 2"
        assert row["interaction_test"] == "group bootstrap + seed variance (Welch t)"
    for key in (("a", "clean"), ("a", "jpeg"), ("a", "webp"), ("b", "clean")):
        assert table.loc[key, "interaction_with"] == "" and np.isnan(table.loc[key, "interaction_auc"]), key
    csv = pd.read_csv(tmp_path / "t.csv", keep_default_na=False)
    assert (csv["interaction_auc"] == "").sum() == 4  # empty cells, not 0
    md = (tmp_path / "t.md").read_text()
    for words in (
        "Interaction Δ AUC [95% CI]",
        "p interaction Δ AUC, bootstrap (Holm, m)",
        "Interaction with",
        "Interaction (a difference of contrasts)",
        "Welch-Satterthwaite",
    ):
        assert words in md, words
    # Without an interaction the table has no such columns.
    plain = table_of(tmp_path / "plain", rows, {"eval_variant": "clean"}, n_bootstrap=50)
    assert "interaction_auc" not in plain.columns


def test_rows_validation_did_not_select_carry_no_p(tmp_path):
    """An lr sweep at two resolutions: the val-selected lr of each resolution is the reference (64 px) or is
    tested against it (32 px); the other lrs show their Δ and interval but no p, and say why."""
    rng = np.random.default_rng(32)
    y, groups = grouped_data(rng, 200)
    rows = []
    for res in (64, 32):
        for lr, val_auc in (("0.01", 0.7), ("0.001", 0.9), ("0.0001", 0.8)):
            frames = [binary_frame(y, rng.uniform(0.5, 2) * y + rng.normal(size=len(y)), groups)]
            rows.append(({"res": res, "lr": lr}, frames, val_auc))
    table = table_of(tmp_path, rows, {"res": 64}, n_bootstrap=200)
    selected = table[table[aggregate.SELECTED]]
    assert list(selected[["res", "lr"]].itertuples(index=False, name=None)) == [(64, "0.001"), (32, "0.001")]
    assert table.loc[table["reference"], "lr"].tolist() == ["0.001"] and table["reference"].sum() == 1
    unselected = table[~table[aggregate.SELECTED]]
    assert unselected["delta_auc"].notna().all() and unselected["delta_auc_low"].notna().all()
    for column in ("delta_auc_p", "delta_auc_p_holm", "delta_balanced_accuracy_p_holm", "obuchowski_p_holm"):
        assert unselected[column].isna().all(), column
    assert set(unselected["untested"]) == {"not selected by validation"}
    tested = table[table[aggregate.SELECTED] & ~table["reference"]]
    assert (
        len(tested) == 1 and tested["delta_auc_p_holm"].notna().all() and (tested["family_size"] == 1).all()
    )
    md = Path(tmp_path / "t.md").read_text()
    assert "— (not selected by validation)" in md and "(m=1)" in md


def test_a_table_names_the_test_of_each_comparison_column(tmp_path):
    rng = np.random.default_rng(33)
    y, groups = grouped_data(rng, 120)
    rows = [
        ({"eval_variant": v}, [binary_frame(y, s * y + rng.normal(size=len(y)), groups)], 0.8)
        for v, s in (("clean", 1.5), ("jpeg", 1.0))
    ]
    table_of(tmp_path, rows, {"eval_variant": "clean"}, n_bootstrap=100)
    md = (tmp_path / "t.md").read_text()
    for words in (
        "p Δ AUC, bootstrap (Holm, m)",
        "p Δ AUC, Obuchowski (Holm, m)",
        "Contrast",
        "Compared with",
    ):
        assert words in md, words
    assert "same models, 1 vs 1 seeds" in md and "Welch" in md and "Obuchowski 1997" in md
    csv = pd.read_csv(tmp_path / "t.csv")
    assert csv.loc[1, "test"] == "paired group bootstrap, models fixed (z)"


def test_the_error_rate_benchmark_runs_every_scenario_and_test(capsys):
    """benchmarks/stats.py on a handful of data sets: every scenario, every test, and the verdict (the real run,
    2,000 nulls a scenario, is the benchmark's; its output is quoted in the README's Statistics section)."""
    import importlib.util
    import sys

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("stats_benchmark", REPO / "benchmarks/stats.py")
    stats = sys.modules["stats_benchmark"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stats)
    code = stats.main(["--sims", "3", "--power-sims", "2", "--bootstrap", "20", "--workers", "1"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("same models", "recipe"))]
    assert len(lines) == (len(stats.NULLS) + len(stats.POWER)) * (len(stats.OFFERED) + len(stats.BEFORE))
    # The interaction (a difference of contrasts): its own nulls and planted effects.
    interactions = [line for line in out.splitlines() if line.startswith("interaction ")]
    assert len(interactions) == (len(stats.INTERACTION_NULLS) + len(stats.INTERACTION_POWER)) * (
        len(stats.INTERACTION_OFFERED) + len(stats.INTERACTION_BEFORE)
    )
    assert out.count(" ok") + out.count(" FAILS") == len(stats.NULLS) * len(stats.OFFERED) + len(
        stats.INTERACTION_NULLS
    ) * len(stats.INTERACTION_OFFERED)
    assert code == (1 if " FAILS" in out else 0)
