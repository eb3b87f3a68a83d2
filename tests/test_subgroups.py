"""Subgroup analysis: subgroups from the manifest's metadata (missing -> 'unknown'), each row's metrics and Δ per
subgroup recomputed with scikit-learn from the predictions joined to the manifest, the interaction test against
a planted subgroup difference and its type-I error under the null, untested subgroups, and the figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from test_compare import BINARY, binary_frame, grouped_data, table_of

from dermcompress.study import aggregate, subgroup_figure, subgroups
from dermcompress.study.compare import interaction_comparison
from dermcompress.study.contrasts import holm

# --------------------------------------------------------------------------------------------- subgroups


def test_missing_metadata_is_unknown_and_ages_fall_in_their_bands():
    manifest = pd.DataFrame(
        {
            "image_id": [f"ISIC_{i}" for i in range(7)],
            "sex": ["male", " Female ", None, np.nan, "unknown", "", "female"],  # HAM10000 writes 'unknown'
            "age_approx": [10.0, 39.9, 40.0, 59.0, 60.0, np.nan, 85.0],
            "anatom_site_general": [
                "anterior torso",
                "unknown",
                None,
                "",
                "head/neck",
                np.nan,
                "palms/soles",
            ],
        }
    )
    got = subgroups.assign_subgroups(manifest, [40, 60])
    assert got["sex"].tolist() == ["male", "female", "unknown", "unknown", "unknown", "unknown", "female"]
    assert got["age_band"].tolist() == ["<40", "<40", "40-59", "40-59", "60+", "unknown", "60+"]
    assert got["site"].tolist()[:4] == ["anterior torso", "unknown", "unknown", "unknown"]
    assert got.index.tolist() == manifest["image_id"].tolist()
    # A source without the column at all: everyone unknown.
    assert set(subgroups.assign_subgroups(manifest.drop(columns="sex"), [40, 60])["sex"]) == {"unknown"}
    # Skin type only where the manifest gives some image one (the ISIC Archive's fitzpatrick_skin_type).
    assert "skin_type" not in got.columns
    typed = manifest.assign(fitzpatrick_skin_type=["II", None, "iv", "", "VI", "II", np.nan])
    assert subgroups.assign_subgroups(typed, [40, 60])["skin_type"].tolist() == [
        "II", "unknown", "IV", "unknown", "VI", "II", "unknown",
    ]  # fmt: skip
    none_known = manifest.assign(fitzpatrick_skin_type=None)
    assert "skin_type" not in subgroups.assign_subgroups(none_known, [40, 60]).columns
    assert subgroups.age_band_labels([30, 50, 70]) == ["<30", "30-49", "50-69", "70+"]
    with pytest.raises(ValueError, match="strictly increasing"):
        subgroups.age_band_labels([60, 40])


# ----------------------------------------------------------------------------------- a small experiment


def lesion_metadata(groups: np.ndarray, labels: np.ndarray, rng) -> pd.DataFrame:
    """Per image, its lesion's sex, age and site (some missing); 'oral/genital' only on NV lesions, 'palms/soles'
    on a few lesions."""
    n_groups = groups.max() + 1
    sex = rng.choice(["male", "female", None], n_groups, p=[0.47, 0.47, 0.06])
    age = rng.choice([25.0, 45.0, 70.0, np.nan], n_groups, p=[0.3, 0.3, 0.35, 0.05])
    site = rng.choice(["anterior torso", "head/neck", "unknown"], n_groups, p=[0.5, 0.45, 0.05]).astype(
        object
    )
    nv_lesions = np.unique(groups[labels == 1])
    site[nv_lesions[:25]] = "oral/genital"
    site[nv_lesions[25:29]] = "palms/soles"
    return pd.DataFrame({"sex": sex[groups], "age_approx": age[groups], "anatom_site_general": site[groups]})


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """Three rows at two resolutions, two seeds each: the 64 px clean reference, the same models on a codec
    (same-models contrast), 32 px clean (recipe contrast). Written as runs, a table CSV and a manifest, then
    analysed by subgroup (run_subgroups)."""
    root = tmp_path_factory.mktemp("subgroups")
    rng = np.random.default_rng(5)
    y, groups = grouped_data(rng, 300)
    noise = [rng.normal(size=len(y)) for _ in range(2)]
    rows = [
        ({"eval_variant": "clean"}, [binary_frame(y, 1.6 * y + e, groups) for e in noise], 0.9),
        ({"eval_variant": "jpeg"}, [binary_frame(y, 1.0 * y + e, groups) for e in noise], 0.9),
        ({"res": 32}, [binary_frame(y, 1.2 * y + rng.normal(size=len(y)), groups) for _ in range(2)], 0.9),
    ]
    table_of(root, rows, {"res": 64, "eval_variant": "clean"}, n_bootstrap=50)
    manifest = lesion_metadata(groups, y, rng).assign(image_id=rows[0][1][0]["image_id"], status="ok")
    manifest.to_parquet(root / "manifest.parquet")
    out = {ext: str(root / f"s.{ext}") for ext in ("csv", "md", "html")}
    frame = subgroups.run_subgroups(
        table_csv=str(root / "t.csv"),
        manifest=str(root / "manifest.parquet"),
        classes=BINARY,
        min_images=30,
        age_bands=[40, 60],
        n_bootstrap=200,
        title="t",
        **out,
    )
    return root, frame, manifest


def joined(root, k: int, manifest: pd.DataFrame) -> list[pd.DataFrame]:
    """Row k's test predictions per seed, joined to the manifest's metadata."""
    table = pd.read_csv(root / "t.csv")
    runs = table[aggregate.RUNS_COLUMN].iloc[k].split(aggregate.RUNS_SEPARATOR)
    frames = [pd.read_parquet(f"{run}/predictions.parquet") for run in sorted(runs)]
    return [f[f["split"] == "test"].merge(manifest, on="image_id", validate="1:1") for f in frames]


def by_hand(frame: pd.DataFrame, column: str, name: str) -> pd.Series:
    """Whether each image is in the subgroup, from the raw metadata."""
    if column == "sex":
        return frame["sex"].fillna("unknown") == name
    if column == "site":
        return frame["anatom_site_general"] == name
    age = frame["age_approx"]
    bands = {"<40": age < 40, "40-59": (age >= 40) & (age < 60), "60+": age >= 60, "unknown": age.isna()}
    return bands[name]


# scikit-learn warns of a subgroup with one class (its balanced accuracy is that class's recall).
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true", "ignore:A single label was found")
def test_subgroup_metrics_and_deltas_are_sklearns_on_the_subgroups_images(experiment):
    root, frame, manifest = experiment
    per_row = {k: joined(root, k, manifest) for k in range(3)}
    checked = 0
    for _, line in frame.iterrows():
        seeds = [f[by_hand(f, line["column"], line["subgroup"]).to_numpy()] for f in per_row[line["row"]]]
        assert line["n_images"] == len(seeds[0])
        assert line["n_lesions"] == seeds[0]["group_id"].nunique()
        accuracy = np.mean([balanced_accuracy_score(s["label"], s["pred"]) for s in seeds])
        assert line["balanced_accuracy"] == pytest.approx(accuracy, abs=1e-12)
        if seeds[0]["label"].nunique() < 2:
            assert np.isnan(line["auc"])
            continue
        auc = np.mean([roc_auc_score(s["label"] == "NV", s["prob_NV"]) for s in seeds])
        assert line["auc"] == pytest.approx(auc, abs=1e-12)
        assert line["auc_low"] <= line["auc"] + 1e-9 and line["auc"] <= line["auc_high"] + 1e-9
        if line["compared"]:
            ref = [f[by_hand(f, line["column"], line["subgroup"]).to_numpy()] for f in per_row[0]]
            reference = np.mean([roc_auc_score(s["label"] == "NV", s["prob_NV"]) for s in ref])
            assert line["delta_auc"] == pytest.approx(auc - reference, abs=1e-12)
            checked += 1
    assert checked >= 10
    compared = frame[frame["compared"]]
    assert set(compared["row"]) == {1, 2} and set(compared["compared_with"]) == {"m, 64, clean"}
    assert set(compared.loc[compared["row"] == 1, "test"]) == {"paired group bootstrap, models fixed (z)"}
    assert set(compared.loc[compared["row"] == 2, "test"]) == {"group bootstrap + seed variance (Welch t)"}
    tested = compared[compared["untested"] == ""]
    assert tested["interaction_test"].str.startswith("interaction: ").all()
    assert frame.loc[frame["reference"], "untested"].eq("reference row").all()


def test_interaction_is_compare_interaction_comparison_holm_adjusted_within_row_and_column(experiment):
    root, frame, manifest = experiment
    table = subgroups.read_table(str(root / "t.csv"))
    rows, recipes = aggregate.row_predictions(table)
    assigned = subgroups.assign_subgroups(manifest, [40, 60]).loc[rows[0][0]["image_id"]]
    line = frame[(frame["row"] == 2) & (frame["column"] == "age_band") & (frame["subgroup"] == "60+")].iloc[0]
    mask = (assigned["age_band"] == "60+").to_numpy()
    got = interaction_comparison(
        [rows[2], rows[0], rows[2], rows[0]],
        [recipes[2], recipes[0], recipes[2], recipes[0]],
        BINARY,
        images=[mask, mask, ~mask, ~mask],
        n_bootstrap=200,
        seed=0,
    )
    for metric in ("auc", "balanced_accuracy"):
        assert line[f"interaction_{metric}"] == pytest.approx(got[metric].delta, abs=1e-12)
        assert line[f"interaction_{metric}_p"] == pytest.approx(got[metric].p, rel=1e-9)
    for (_, _), family in frame[frame["interaction_auc_p"].notna()].groupby(["row", "column"]):
        np.testing.assert_allclose(
            family["interaction_auc_p_holm"], holm(family["interaction_auc_p"].to_numpy())
        )
        assert (family["family_size"] == len(family)).all()


def test_small_unknown_and_one_class_subgroups_are_shown_but_not_tested(experiment):
    root, frame, _ = experiment
    compared = frame[frame["compared"]].set_index(["row", "column", "subgroup"])
    small = compared.loc[(1, "site", "palms/soles")]
    assert small["n_images"] < 30 and small["untested"] == "below 30 images"
    assert np.isnan(small["delta_auc_p"]) and np.isnan(small["interaction_auc_p"])
    assert np.isfinite(small["balanced_accuracy"])  # shown where computable
    one_class = compared.loc[(1, "site", "oral/genital")]
    assert one_class["n_images"] >= 30 and one_class["untested"] == "no MEL image"
    assert np.isnan(one_class["auc"]) and np.isnan(one_class["delta_auc_p"])
    for column in ("sex", "age_band", "site"):
        unknown = compared.loc[(1, column, "unknown")]
        assert unknown["untested"] == "unknown: never tested" and np.isnan(unknown["delta_auc_p"])
    big = compared.loc[(1, "sex", "female")]
    assert big["untested"] == "" and 0 <= big["delta_auc_p"] <= 1 and 0 <= big["interaction_auc_p_holm"] <= 1
    md = (root / "s.md").read_text()
    assert "Holm-adjusted within each row and subgroup column" in md and "<40, 40-59, 60+" in md
    assert "at least 30 test images" in md and "Welch t" in md
    assert list(pd.read_csv(root / "s.csv").columns) == list(subgroups.CSV_COLUMNS)


# ------------------------------------------------------------------------------------ the interaction test


def codec_experiment(rng, cost_female: float, cost_male: float, n_groups: int = 120, lesion_sd: float = 0.5):
    """Lesion groups of 1-3 images with a lesion effect, half female; one model scored clean and through a
    codec that lowers the separation by `cost_*` per sex. Returns (table, rows, recipes, subgroups)."""
    y, groups = grouped_data(rng, n_groups)
    female = (rng.random(n_groups) < 0.5)[groups]
    base = rng.normal(size=len(y)) + lesion_sd * rng.normal(size=n_groups)[groups]
    clean = binary_frame(y, 1.5 * y + base, groups)
    codec = binary_frame(y, (1.5 - np.where(female, cost_female, cost_male)) * y + base, groups)
    table = pd.DataFrame(
        {
            "eval_variant": ["clean", "codec"],
            "reference": [True, False],
            "compared_with_row": [0, 0],
            "compared_with": ["clean", "clean"],
            "untested": ["", ""],
        }
    )
    sex = pd.DataFrame({"sex": np.where(female, "female", "male")}, index=clean["image_id"])
    return table, [[clean], [codec]], ["m", "m"], sex


def interaction_p(rng, cost_female: float, cost_male: float, **kwargs) -> float:
    table, rows, recipes, sex = codec_experiment(rng, cost_female, cost_male, **kwargs)
    frame = subgroups.subgroup_analysis(
        table, rows, recipes, sex, BINARY, min_images=30, age_edges=[40, 60], n_bootstrap=200, seed=0
    )
    line = frame[(frame["row"] == 1) & (frame["subgroup"] == "female")].iloc[0]
    return float(line["interaction_auc_p"])


def test_interaction_finds_a_planted_subgroup_difference():
    """The codec costs women's images 0.5 of the separation, men's 0.2 (Δ AUC about -0.13 and -0.03) in 150
    lesions: found (in all of 40 such simulated test sets, median p 5e-5)."""
    rng = np.random.default_rng(20)
    assert interaction_p(rng, 0.5, 0.2) < 0.05


def test_interaction_keeps_its_type_one_error_under_the_null():
    """The same cost for both sexes, lesion clustering, 200 simulated test sets: about 5% rejected."""
    rng = np.random.default_rng(21)
    p = np.array([interaction_p(rng, 0.6, 0.6) for _ in range(200)])
    rate = np.mean(p < 0.05)
    assert 0.01 <= rate <= 0.10, rate


# ------------------------------------------------------------------------------------------------ figure


def test_figure_renders_from_the_csv_and_says_when_nothing_is_compared(experiment, tmp_path):
    import matplotlib.pyplot as plt

    root, frame, _ = experiment
    out = tmp_path / "f.png"
    subgroup_figure.run_subgroup_figure(subgroups_csv=str(root / "s.csv"), title="t", out=str(out))
    assert out.read_bytes()[:4] == b"\x89PNG"
    fig = subgroup_figure.plot_subgroups(subgroup_figure.read_subgroups_csv(str(root / "s.csv")), "t")
    assert [ax.get_title() for ax in fig.axes] == ["Sex", "Age band", "Site"]
    assert "female (n=" in " ".join(t.get_text() for t in fig.axes[0].get_yticklabels())
    plt.close(fig)
    none = frame.assign(compared=False)
    fig = subgroup_figure.plot_subgroups(none, "t")
    assert any("no Δ to show" in t.get_text() for t in fig.axes[0].texts)
    plt.close(fig)
