"""A whole (small) study end to end with real Snakemake: runs -> tables, figures and the HTML report.

Every table number is recomputed here from the runs' predictions.parquet with scikit-learn, independently of the
package's own metrics code; the report must exist and name every figure.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import copy_workflow, snakemake, write_config
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from dermcompress.learn.runs import parse_eval_dir
from dermcompress.study.experiments import expand, figure_kinds, format_number

pytestmark = pytest.mark.workflow

GRID = {
    "models": ["tiny_cnn"],
    "resolutions": [32],
    "train_variants": ["degraded"],
    "eval_variants": ["clean"],
    "modes": ["finetune"],
    "lr": [1.0e-3],
    "seeds": [0],
    "reference": {"res": 32},
}
OVERLAY = {
    "data": {"synthetic": {"n": 400, "seed": 1}},
    "resize": {"resolutions": [32, 16]},
    "cache": {"rows_per_shard": 64, "row_group_size": 16},
    "models": {"tiny_cnn": {"source": "timm:resnet10t", "pretrained": False}},
    "training": {
        "batch_size": 16,
        "epochs": 2,
        "log_every": 1,
        "n_bootstrap": 20,
        "knn": {"k": [3, 5]},
        "probe": {"iterations": 50, "batch_size": 16},
    },
    "experiments": {
        "sweep": {**GRID, "description": "A resolution sweep", "resolutions": [32, 16], "seeds": [0, 1]},
        "modes": {
            **GRID,
            "modes": ["linear", "knn", "finetune"],
            "lr": {"finetune": [1.0e-3]},
            "reference": {"mode": "finetune"},
        },
        "labels": {
            **GRID,
            "modes": ["knn"],
            "label_fractions": [0.25, 1.0],
            "reference": {"label_fraction": 1.0},
        },
        "robust": {
            **GRID,
            "resolutions": [16],
            "train_variants": ["clean"],
            "eval_variants": ["clean", "jpeg_only"],
            "reference": {"eval_variant": "clean"},
        },
    },
    # Named: Snakemake merges overlays into config.yaml, whose own study experiments stay defined.
    "run_experiments": ["sweep", "modes", "labels", "robust"],
}
# What each table shows, recomputed from the predictions (probability of the second class scores the AUC).
RECOMPUTE = {
    "accuracy": lambda y, p, prob: accuracy_score(y, p),
    "balanced_accuracy": lambda y, p, prob: balanced_accuracy_score(y, p),
    "f1_macro": lambda y, p, prob: f1_score(y, p, average="macro"),
    "auc": lambda y, p, prob: roc_auc_score(y == "NV", prob),
    "brier": lambda y, p, prob: np.mean((prob - (y == "NV")) ** 2),
    "ece": lambda y, p, prob: ece_by_hand(y == "NV", prob),
}


def ece_by_hand(positive: np.ndarray, prob: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE of binary predictions, bin by bin: confidence max(p, 1 - p), bins (k/15, (k+1)/15]."""
    confidence = np.maximum(prob, 1 - prob)
    correct = (prob > 0.5) == positive
    total = 0.0
    for k in range(bins):
        inside = (confidence > k / bins) & (confidence <= (k + 1) / bins)
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return total / len(prob)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("study"))
    write_config(workdir / "test.yaml", OVERLAY)
    snakemake(workdir, "--configfile", "test.yaml")
    snakemake(workdir, "--configfile", "test.yaml", "--report", "results/report.html")
    return workdir


def merged_config(workdir: Path) -> dict:
    import yaml

    config = yaml.safe_load((workdir / "config.yaml").read_text())
    for key, value in OVERLAY.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key != "experiments" else value
    return config


def spelt(value) -> str:
    """A grid value as the run's path spells it, however the CSV read it back (a probe's lr: empty)."""
    if (isinstance(value, float) and np.isnan(value)) or value == "":
        return ""
    return format_number(value) if isinstance(value, int | float) else str(value)


def test_each_table_number_equals_a_recomputation_from_the_predictions(study):
    config = merged_config(study)
    for name in OVERLAY["experiments"]:
        table = pd.read_csv(study / f"results/tables/{name}.csv")
        expected_runs = {e.eval_dir for e in expand(config)[1][name]}
        listed = [r for cell in table["runs"] for r in cell.split(";")]
        assert sorted(listed) == sorted(expected_runs), name  # every run in exactly one row
        for row in table.itertuples():
            runs = row.runs.split(";")
            assert row.n_runs == len(runs)
            # Test scores under the plain names, validation scores as val_* (where the table has them).
            for (split, prefix), (metric, score) in itertools.product(
                [("test", ""), ("val", "val_")], RECOMPUTE.items()
            ):
                column = f"{prefix}{metric}"
                if f"{column}_mean" not in table.columns:
                    continue
                values = []
                for run in runs:
                    predictions = pd.read_parquet(study / run / "predictions.parquet").query(
                        f"split == '{split}'"
                    )
                    y, pred = predictions["label"].to_numpy(), predictions["pred"].to_numpy()
                    values.append(score(y, pred, predictions["prob_NV"].to_numpy()))
                assert getattr(row, f"{column}_mean") == pytest.approx(np.mean(values), abs=1e-12), (
                    name,
                    column,
                )
                if len(values) > 1:
                    assert getattr(row, f"{column}_std") == pytest.approx(np.std(values, ddof=1), abs=1e-12)
                else:
                    assert np.isnan(getattr(row, f"{column}_std"))
            # The row's grid point is the one its runs' folders name.
            points = [parse_eval_dir(r).point() for r in runs]
            for dim in ("model", "res", "mode", "lr", "eval_variant", "label_fraction"):
                if dim in table.columns:
                    assert {spelt(p[dim]) for p in points} == {spelt(getattr(row, dim))}, (name, dim)
        assert {"val_auc_mean", "val_balanced_accuracy_mean", "auc_mean"} <= set(table.columns)
        md = (study / f"results/tables/{name}.md").read_text()
        assert len(re.findall(r"^\| ", md, flags=re.MULTILINE)) == len(table) + 1  # header + one line per row
        assert re.search(r"^\|.*\|\s+n \|\s+Val AUC\s.*\|\s+AUC\s", md, flags=re.MULTILINE), md
        assert "tabular" in (study / f"results/tables/{name}.tex").read_text()


def test_tables_have_the_varying_dimensions_and_costs(study):
    sweep = pd.read_csv(study / "results/tables/sweep.csv")
    assert list(sweep["res"]) == [32, 16] and set(sweep["n_runs"]) == {2}
    assert (sweep["gmacs"].iloc[0] > sweep["gmacs"].iloc[1] > 0) and sweep["peak_train_mem_mb"].isna().all()
    modes = pd.read_csv(study / "results/tables/modes.csv", keep_default_na=False)
    assert list(zip(modes["mode"], modes["lr"].astype(str), strict=True)) == [
        ("linear", ""),
        ("knn", ""),
        ("finetune", "0.001"),
    ]
    robust = pd.read_csv(study / "results/tables/robust.csv")
    assert list(robust["eval_variant"]) == ["clean", "jpeg_only"]


def test_tables_carry_the_bytes_of_the_test_images_each_row_scores(study):
    """kB per image and bits per pixel of a row: the mean over its eval cache's test images (their PNGs for
    clean, their JPEGs for jpeg_only), recomputed here from the shards' encoded_bytes."""
    robust = pd.read_csv(study / "results/tables/robust.csv")
    for row in robust.itertuples():
        shards = sorted((study / f"results/cache/16px/{row.eval_variant}/test").glob("*.parquet"))
        sent = pd.concat(pd.read_parquet(s, columns=["encoded_bytes", "codec"]) for s in shards)
        assert row.kb_per_image == pytest.approx(sent["encoded_bytes"].mean() / 1000)
        assert row.bpp == pytest.approx(sent["encoded_bytes"].mean() * 8 / (16 * 16))
        assert row.codec == {"clean": "png", "jpeg_only": "jpeg"}[row.eval_variant]
    # Every table row has its reference row's paired difference (the reference row's own: 0).
    assert robust["delta_auc"].iloc[0] == 0


def test_tables_compare_each_row_within_its_model_and_name_family_and_test(study):
    """Every table row is compared with the reference row of its own model, by the test its contrast calls for
    (the sweep's resolutions: other trainings, 2 vs 2 seeds, Welch t; robust's jpeg_only: the same models), and
    every p stands beside its Holm family's size; the Markdown says which test each column is."""
    expected = {
        "sweep": ("recipe", "2 vs 2", "group bootstrap + seed variance (Welch t)"),
        "modes": ("recipe", "1 vs 1", "group bootstrap, 1 seed: seed variance not covered (z)"),
        "labels": ("recipe", "1 vs 1", "group bootstrap, 1 seed: seed variance not covered (z)"),
        "robust": ("same models", "1 vs 1", "paired group bootstrap, models fixed (z)"),
    }
    for name, (kind, seeds, test) in expected.items():
        table = pd.read_csv(study / f"results/tables/{name}.csv", keep_default_na=False)
        compared = table[~table["reference"]]
        assert len(compared) >= 1 and table["reference"].sum() == 1, name
        assert set(compared["contrast"]) == {kind} and set(compared["seeds"]) == {seeds}, name
        assert set(compared["test"]) == {test}, name
        reference = table[table["reference"]].iloc[0]
        for _, row in compared.iterrows():
            assert row["compared_with"].startswith(f"{row['model']}, ") and row["model"] == reference["model"]
            assert float(row["delta_auc"]) == pytest.approx(row["auc_mean"] - reference["auc_mean"], abs=1e-9)
            assert row["family_size"] == len(compared) and 0 <= float(row["delta_auc_p_holm"]) <= 1
        md = (study / f"results/tables/{name}.md").read_text()
        assert "p Δ AUC, bootstrap (Holm, m)" in md and f"(m={len(compared)})" in md, name
        assert "Welch-Satterthwaite" in md and "Obuchowski 1997" in md and "Holm: adjusted within" in md


def test_label_fraction_trains_on_a_grouped_subset(study):
    splits = pd.read_parquet(study / "results/data/splits.parquet")
    n_train = int((splits["split"] == "train").sum())
    (evaluation,) = [e for e in expand(merged_config(study))[1]["labels"] if e.run.label_fraction == "0.25"]
    run = evaluation.run
    metrics = json.loads((study / evaluation.eval_dir / "metrics.json").read_text())
    log = study / "results/logs/runs" / run.run_dir.removeprefix("results/runs/") / "evaluate.log"
    used, total = map(
        int, re.search(r"label fraction 0.25 \(seed 0\): (\d+) of (\d+)", log.read_text()).groups()
    )
    assert total == n_train and 0.2 * n_train <= used <= 0.4 * n_train
    assert metrics["train_images"] == used  # the kNN bank: the subset


def test_figures_exist_and_the_report_names_every_one(study):
    config = merged_config(study)
    evaluations = expand(config)[1]
    expected = {
        f"{name}_{kind}.png" for name in OVERLAY["experiments"] for kind in figure_kinds(evaluations[name])
    }
    assert expected == {
        "sweep_curves.png",
        "sweep_cost.png",
        "sweep_rate_accuracy.png",  # resolution varies: accuracy against the bytes of each size's PNGs
        "modes_curves.png",
        "labels_curves.png",
        "labels_label_efficiency.png",
        "robust_curves.png",
        "robust_robustness.png",
        "robust_rate_accuracy.png",
        # Every table compares its rows with a reference row; its forest plot shows the differences.
        *(f"{name}_forest.png" for name in ("sweep", "modes", "labels", "robust")),
        # Every experiment: the calibration of its test probabilities.
        *(f"{name}_reliability.png" for name in ("sweep", "modes", "labels", "robust")),
        # Every experiment: each compared row's Δ AUC by sex, age band and site.
        *(f"{name}_subgroups.png" for name in ("sweep", "modes", "labels", "robust")),
    }
    on_disk = {p.name for p in (study / "results/figures").glob("*.png")}
    assert on_disk == expected
    for name in expected:
        assert (study / "results/figures" / name).read_bytes()[:4] == b"\x89PNG"
    report = (study / "results/report.html").read_text()
    for name in expected:
        assert name in report, name
    for name in OVERLAY["experiments"]:
        assert f"{name}.html" in report and f"{name}_subgroups.html" in report
    assert "summary.html" in report and "SYNTHETIC" in report


def test_data_summary_counts_the_manifest(study):
    manifest = pd.read_parquet(study / "results/data/manifest.parquet")
    summary = (study / "results/data/summary.md").read_text()
    ok = int((manifest["status"] == "ok").sum())
    assert re.search(rf"\| listed\s+\|\s+{len(manifest)} \|", summary)
    assert re.search(rf"\| ok\s+\|\s+{ok} \|", summary)
    assert re.search(rf"\| quarantined\s+\|\s+{len(manifest) - ok} \|", summary)


def test_rerun_plans_nothing_and_unselected_experiments_build_nothing(study):
    proc = snakemake(study, "--dry-run", "--configfile", "test.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr
    write_config(study / "one.yaml", {**OVERLAY, "run_experiments": ["modes"]})
    proc = snakemake(study, "--dry-run", "--forceall", "--configfile", "one.yaml")
    planned = proc.stdout + proc.stderr
    assert "results/tables/modes.csv" in planned and "results/figures/modes_curves.png" in planned
    for other in ("sweep", "labels", "robust"):
        assert f"results/tables/{other}.csv" not in planned
        assert f"results/runs/{other}/" not in planned
