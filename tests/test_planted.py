"""The whole pipeline against a known answer (conftest PLANTED_STUDY): on data with effects of known size, real
Snakemake finds the planted costs of compression and of resolution, the table's interaction (a codec's cost at
32 px beyond its cost at 16 px) and the subgroup analysis find the planted differences of costs, and the null arm
finds nothing.

The null arm: codecs against clean at 16 px, with the trained model held fixed (same-model, evaluation-time
contrasts). At 16 px the fine sign the codecs would take is in no image of either class (its 10 periods per
side are above Nyquist), and the model trained there never saw it. Checked over generator seeds 0-4 (the
margins are in the issue's note); seed 0 is the one tested.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from dermcompress.study.contrasts import holm

pytestmark = pytest.mark.workflow

ALPHA = 0.05
SAME_MODELS = "paired group bootstrap, models fixed (z)"


@pytest.fixture(scope="module")
def codecs(planted_study: Path) -> pd.DataFrame:
    """The codec table by (res, eval_variant), with each row's position (the subgroup table's `row`)."""
    frame = pd.read_csv(planted_study / "results/tables/planted_codecs.csv")
    return frame.assign(position=range(len(frame))).set_index(["res", "eval_variant"])


@pytest.fixture(scope="module")
def resolution(planted_study: Path) -> pd.DataFrame:
    """The resolution table (clean test images only) by res."""
    return pd.read_csv(planted_study / "results/tables/planted_resolution.csv").set_index("res")


def test_compression_costs_what_was_planted(codecs):
    """At 32 px, where the fine sign is visible, JPEG q30 (which removes it) lowers the AUC of the same model:
    Holm-adjusted p < 0.05, by the same-models test."""
    row = codecs.loc[(32, "jpeg_q30")]
    assert row["contrast"] == "same models" and row["test"] == SAME_MODELS
    assert row["delta_auc"] < -0.05 and row["delta_auc_high"] < 0
    assert row["delta_auc_p_holm"] < ALPHA and row["family_size"] == 2
    assert bool(codecs.loc[(32, "clean"), "reference"])


def test_the_lowest_resolution_costs_what_was_planted(resolution):
    """Trained and evaluated at 16 px, where the fine sign is gone, the model's AUC is lower than at 32 px."""
    row = resolution.loc[16]
    assert row["contrast"] == "recipe"
    assert row["delta_auc"] < -0.05 and row["delta_auc_p_holm"] < ALPHA


def test_subgroup_interaction_is_flagged(planted_study, codecs):
    """JPEG q30 costs women's lesions (every MEL with the fine sign, none with the veil) more than men's: the
    interaction's Holm-adjusted p < 0.05."""
    subgroups = pd.read_csv(
        planted_study / "results/tables/planted_codecs_subgroups.csv", keep_default_na=False
    )
    row = subgroups["row"] == codecs.loc[(32, "jpeg_q30"), "position"]
    lines = subgroups[(subgroups["column"] == "sex") & row].set_index("subgroup")
    women, men = lines.loc["female"], lines.loc["male"]
    assert women["untested"] == "" and men["untested"] == ""
    assert float(women["delta_auc"]) < float(men["delta_auc"]) - 0.1
    assert float(women["interaction_auc_p_holm"]) < ALPHA
    assert women["interaction_test"] == f"interaction: {SAME_MODELS}"


def test_the_tables_interaction_finds_the_codecs_cost_at_32_px_beyond_16_px(codecs, planted_study):
    """planted_codecs declares `interaction: {res: 16}`: the 32 px codec rows get (codec - clean at 32 px) -
    (codec - clean at 16 px), through the table rule's params; JPEG q30 costs 32 px more (the texture it
    removes is only visible there). The two resolutions are two trainings of one seed: the test says seed
    variance is not covered. Rows without an interaction (references, the 16 px rows) are empty."""
    row = codecs.loc[(32, "jpeg_q30")]
    assert row["interaction_with"] == "tiny, 16, jpeg_q30"
    by_hand = row["delta_auc"] - codecs.loc[(16, "jpeg_q30"), "delta_auc"]
    assert row["interaction_auc"] == pytest.approx(by_hand, abs=1e-9)
    assert row["interaction_auc"] < -0.05 and row["interaction_auc_high"] < 0
    assert row["interaction_auc_p_holm"] < ALPHA and row["interaction_family_size"] == 2
    assert row["interaction_test"] == "group bootstrap, 1 seed: seed variance not covered (z)"
    empty = codecs.loc[[(32, "clean"), (16, "clean"), (16, "jpeg_q75"), (16, "jpeg_q30")]]
    assert empty["interaction_auc"].isna().all() and empty["interaction_with"].isna().all()
    md = (planted_study / "results/tables/planted_codecs.md").read_text()
    assert "p interaction Δ AUC, bootstrap (Holm, m)" in md


def test_null_arm_finds_nothing(codecs):
    """Codecs at 16 px, the model held fixed: nothing is significant, by the very test that finds the cost at
    32 px (above), on as many images."""
    null = codecs.loc[[(16, "jpeg_q75"), (16, "jpeg_q30")]]
    assert (null["test"] == SAME_MODELS).all()
    assert (null["delta_auc_p_holm"] > ALPHA).all(), null[["delta_auc", "delta_auc_p", "delta_auc_p_holm"]]
    assert (null["delta_balanced_accuracy_p_holm"] > ALPHA).all()
    # The table's Holm is the family's (the 16 px rows share their reference): recomputed here.
    assert null["delta_auc_p_holm"].to_numpy() == pytest.approx(holm(null["delta_auc_p"].to_numpy()))
