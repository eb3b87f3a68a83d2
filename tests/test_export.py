"""export-isic: a run's test predictions as an ISIC 2019 submission, and the ground truth to score them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermcompress.cli import main
from dermcompress.learn import metrics
from dermcompress.study.export import ISIC2019_CLASSES, resolve_evaluation, run_export

CLASSES = ["MEL", "NV"]
RUN = "results/runs/vit_b16/224px/clean/finetune/lr1e-05_linear_3ep/labels1/seed0"
# (image, label index, P(MEL)) per split; no row ties, so the scorer's argmax is ours.
TEST = [
    ("ISIC_0000004", 0, 0.9),
    ("ISIC_0000001", 1, 0.2),
    ("ISIC_0000007", 0, 0.4),
    ("ISIC_0000002", 1, 0.3),
]
TEST += [("ISIC_0000009", 1, 0.65), ("ISIC_0000005", 0, 0.75)]
VAL = [("ISIC_0000003", 0, 0.6), ("ISIC_0000008", 1, 0.1)]


def split_frame(rows, split: str) -> pd.DataFrame:
    ids, labels, p_mel = zip(*rows, strict=True)
    probs = np.column_stack([p_mel, 1 - np.asarray(p_mel)])
    groups = [f"g{i}" for i in range(len(ids))]
    return metrics.predictions_frame(
        list(ids), np.array(labels), probs, CLASSES, group_ids=groups, split=split
    )


def predictions() -> pd.DataFrame:
    return pd.concat([split_frame(VAL, "val"), split_frame(TEST, "test")], ignore_index=True)


def make_run(root: Path, frame: pd.DataFrame | None = None, variants=("clean", "jpeg_q50")) -> Path:
    """A run folder holding one evaluation per variant, each predictions.parquet in the real format."""
    run = root / RUN
    for variant in variants:
        out = run / "eval" / variant
        out.mkdir(parents=True)
        (frame if frame is not None else predictions()).to_parquet(out / "predictions.parquet", index=False)
    return run


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


def test_submission_has_the_nine_columns_and_the_runs_test_probabilities(tmp_path):
    run = make_run(tmp_path)
    counts = run_export(run, tmp_path / "sub.csv")
    sub = read(tmp_path / "sub.csv")
    assert list(sub.columns) == ["image", *ISIC2019_CLASSES]
    assert counts["images"] == len(sub) == len(TEST) and counts["val_rows_left_out"] == len(VAL)
    assert sorted(sub["image"]) == sorted(i for i, _, _ in TEST)
    assert not set(sub["image"]) & {i for i, _, _ in VAL}
    assert all(sub[c].dtype == np.float64 for c in ISIC2019_CLASSES)
    expected = {i: p for i, _, p in TEST}
    by_image = sub.set_index("image")
    for image, p_mel in expected.items():
        assert by_image.at[image, "MEL"] == pytest.approx(p_mel, abs=1e-12)
        assert by_image.at[image, "NV"] == pytest.approx(1 - p_mel, abs=1e-12)
    assert (by_image[[c for c in ISIC2019_CLASSES if c not in CLASSES]] == 0.0).all().all()
    assert ((by_image >= 0) & (by_image <= 1)).all().all()
    # Written as floats: the scorer rejects a column that parses as integers.
    assert "0.0" in (tmp_path / "sub.csv").read_text().splitlines()[1].split(",")


def test_ground_truth_is_one_hot_of_the_classes_present_without_unk(tmp_path):
    counts = run_export(make_run(tmp_path), tmp_path / "sub.csv")
    truth = read(tmp_path / "sub_GroundTruth.csv")
    assert counts["ground_truth"] == str(tmp_path / "sub_GroundTruth.csv")
    assert list(truth.columns) == ["image", "MEL", "NV"] == ["image", *counts["ground_truth_classes"]]
    labels = {i: CLASSES[label] for i, label, _ in TEST}
    for row in truth.itertuples(index=False):
        expected = (1.0, 0.0) if labels[row.image] == "MEL" else (0.0, 1.0)
        assert expected == (row.MEL, row.NV)
    # The scorer's copy: the same images and probabilities, the ground truth's columns only.
    scoring = read(tmp_path / "sub_Scoring.csv")
    assert list(scoring.columns) == list(truth.columns) and list(scoring["image"]) == list(truth["image"])
    assert scoring.equals(read(tmp_path / "sub.csv")[list(truth.columns)])


def test_run_folder_and_its_clean_evaluation_export_the_same(tmp_path):
    run = make_run(tmp_path)
    assert resolve_evaluation(run) == resolve_evaluation(run / "eval" / "clean") == run / "eval" / "clean"
    assert resolve_evaluation(run, "jpeg_q50") == run / "eval" / "jpeg_q50"
    run_export(run, tmp_path / "a.csv")
    run_export(run / "eval" / "clean", tmp_path / "b.csv", ground_truth=tmp_path / "truth" / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a_GroundTruth.csv").read_bytes() == (tmp_path / "truth" / "b.csv").read_bytes()


def test_missing_eval_variant_names_the_variants_present(tmp_path):
    run = make_run(tmp_path, variants=("jpeg_q50", "blur"))
    with pytest.raises(ValueError, match=r"no evaluation 'clean'.*eval variants present: blur, jpeg_q50"):
        resolve_evaluation(run)
    with pytest.raises(ValueError, match="is the evaluation 'blur', not 'jpeg_q50'"):
        resolve_evaluation(run / "eval" / "blur", "jpeg_q50")
    with pytest.raises(ValueError, match="neither an evaluation folder"):
        resolve_evaluation(tmp_path)


def test_a_class_outside_isic_2019_is_an_error_naming_it(tmp_path):
    frame = predictions().rename(columns={"prob_NV": "prob_BENIGN"})
    with pytest.raises(ValueError, match=r"not in ISIC 2019.*\['BENIGN'\]"):
        run_export(make_run(tmp_path, frame), tmp_path / "sub.csv")
    assert not (tmp_path / "sub.csv").exists()


def test_nan_is_an_error_naming_the_image_and_rounding_is_clipped(tmp_path):
    frame = predictions()
    test = frame.index[frame["split"] == "test"]
    frame.loc[test[0], "prob_MEL"] = 1 + 1e-9
    frame.loc[test[0], "prob_NV"] = -1e-9
    run_export(make_run(tmp_path / "a", frame), tmp_path / "a.csv")
    sub = read(tmp_path / "a.csv").set_index("image")
    assert (sub.at["ISIC_0000004", "MEL"], sub.at["ISIC_0000004", "NV"]) == (1.0, 0.0)

    frame.loc[test[1], "prob_NV"] = np.nan
    with pytest.raises(ValueError, match="prob_NV is NaN for image ISIC_0000001"):
        run_export(make_run(tmp_path / "b", frame), tmp_path / "b.csv")
    frame.loc[test[1], "prob_NV"] = 1.5
    with pytest.raises(ValueError, match=r"prob_NV is 1\.5 for image ISIC_0000001"):
        run_export(make_run(tmp_path / "c", frame), tmp_path / "c.csv")


def test_cli_end_to_end(tmp_path, capsys):
    run = make_run(tmp_path)
    out = tmp_path / "export" / "run.csv"
    assert main(["export-isic", str(run), str(out), "--eval-variant", "jpeg_q50"]) == 0
    printed = capsys.readouterr().out
    truth, scoring = tmp_path / "export" / "run_GroundTruth.csv", tmp_path / "export" / "run_Scoring.csv"
    assert f"isic-challenge-scoring classification {truth} {scoring}" in printed
    assert list(read(out).columns) == ["image", *ISIC2019_CLASSES] and len(read(out)) == len(TEST)
    assert list(read(truth).columns) == ["image", "MEL", "NV"]

    gt = tmp_path / "gt.csv"
    assert main(["export-isic", str(run / "eval" / "clean"), str(out), "--ground-truth", str(gt)]) == 0
    assert gt.is_file()
    with pytest.raises(
        SystemExit, match=r"^dermcompress export-isic: .*eval variants present: clean, jpeg_q50"
    ):
        main(["export-isic", str(run), str(out), "--eval-variant", "blur"])


def scorer() -> str | None:
    """The official scorer's command: $ISIC_CHALLENGE_SCORING, or isic-challenge-scoring on PATH.

    isic-challenge-scoring 5.6.0 (the latest) calls DataFrame.applymap, which pandas 3 removed, so it does not run
    next to this project's pandas; point the variable at one installed with a pandas 2 to run this test.
    """
    return os.environ.get("ISIC_CHALLENGE_SCORING") or shutil.which("isic-challenge-scoring")


@pytest.mark.skipif(scorer() is None, reason="isic-challenge-scoring not installed (see scorer())")
def test_official_scorer_accepts_the_export_and_agrees_with_metrics(tmp_path):
    run_export(make_run(tmp_path), tmp_path / "sub.csv")
    truth, scoring = tmp_path / "sub_GroundTruth.csv", tmp_path / "sub_Scoring.csv"
    cmd = [scorer(), "-o", "json", "classification", str(truth), str(scoring)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    score = json.loads(proc.stdout)
    ours = metrics.compute_metrics(split_frame(TEST, "test"), CLASSES, n_bootstrap=0)
    assert score["overall"] == pytest.approx(ours["balanced_accuracy"])
    assert score["per_category"]["auc"]["MEL"] == pytest.approx(ours["auc"])

    # Why the scorer's copy exists: against this ground truth the nine-column submission has extra columns.
    nine = subprocess.run([*cmd[:-1], str(tmp_path / "sub.csv")], capture_output=True, text=True, timeout=120)
    assert nine.returncode != 0 and "Extra columns in CSV" in nine.stderr + nine.stdout


# --- each source in its challenge's format ------------------------------------------------------------------

ISIC2018_COLUMNS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def check_class_format(sub: Path, truth: Path, scoring: Path, columns: list[str]) -> None:
    """The rules the ISIC 2018 and 2019 scorer applies (module docstring of study/export.py): `image`, then the
    challenge's class columns in its order; floats in [0, 1], no NaN, images unique and those of the ground
    truth; the ground truth one-hot over challenge classes, each with positives and negatives; the scorer's
    copy with exactly the ground truth's columns."""
    submission, gt, copy = read(sub), read(truth), read(scoring)
    assert list(submission.columns) == ["image", *columns]
    values = submission[columns]
    assert all(values[c].dtype == np.float64 for c in columns) and not values.isna().any().any()
    assert ((values >= 0) & (values <= 1)).all().all()
    assert submission["image"].is_unique and set(submission["image"]) == set(gt["image"])
    assert gt.columns[0] == "image" and set(gt.columns[1:]) <= set(columns)
    assert (gt[gt.columns[1:]].sum(axis=1) == 1).all()
    assert all(0 < gt[c].sum() < len(gt) for c in gt.columns[1:])
    assert list(copy.columns) == list(gt.columns)


def check_isic2020_format(sub: Path, truth: Path) -> None:
    """ISIC 2020's (SIIM-ISIC) rules: the header `image_name,target`, a probability of melanoma per image, images
    unique and those of the ground truth, itself `image_name,target` with 0 and 1 (an AUC needs both)."""
    assert sub.read_text().splitlines()[0] == "image_name,target"
    submission, gt = read(sub), read(truth)
    assert submission["target"].dtype == np.float64 and submission["target"].between(0, 1).all()
    assert submission["image_name"].is_unique and set(submission["image_name"]) == set(gt["image_name"])
    assert list(gt.columns) == ["image_name", "target"] and set(gt["target"]) == {0, 1}


def with_manifest(root: Path, source: str) -> None:
    """The workflow's manifest, recording its data source as ingest does (schema metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "results" / "data").mkdir(parents=True)
    table = pa.table({"image_id": ["x"]}).replace_schema_metadata({"source": source})
    pq.write_table(table, root / "results" / "data" / "manifest.parquet")


def three_class_predictions() -> pd.DataFrame:
    """A MEL / NV / AK run (HAM10000's akiec is the study's AK)."""
    rows = [("ISIC_1", 0), ("ISIC_2", 1), ("ISIC_3", 2), ("ISIC_4", 2), ("ISIC_5", 0), ("ISIC_6", 1)]
    ids, labels = zip(*rows, strict=True)
    probs = np.full((len(ids), 3), 0.2)
    probs[np.arange(len(ids)), labels] = 0.6
    return metrics.predictions_frame(
        list(ids), np.array(labels), probs, ["MEL", "NV", "AK"], group_ids=list(ids), split="test"
    )


@pytest.mark.parametrize("source", ["isic2019", "isic2020", "ham10000", "isic_archive"])
def test_each_source_is_exported_in_its_challenges_format(tmp_path, source):
    """The source is the one the workflow's manifest records; the submission and ground truth pass the rules of
    that source's challenge: ISIC 2019's for isic2019 and the Archive, ISIC 2018 task 3's for HAM10000 (AK is
    AKIEC), ISIC 2020's `image_name,target` for ISIC 2020."""
    with_manifest(tmp_path, source)
    frame = three_class_predictions() if source == "ham10000" else None
    run = make_run(tmp_path, frame, variants=("clean",))
    out = tmp_path / "sub.csv"
    counts = run_export(run, out)
    truth, scoring = tmp_path / "sub_GroundTruth.csv", tmp_path / "sub_Scoring.csv"
    assert counts["source"] == source
    if source == "isic2020":
        check_isic2020_format(out, truth)
        expected = dict(zip([t[0] for t in TEST], [t[2] for t in TEST], strict=True))
        assert read(out).set_index("image_name")["target"].to_dict() == pytest.approx(expected)
    elif source == "ham10000":
        check_class_format(out, truth, scoring, ISIC2018_COLUMNS)
        assert list(read(truth).columns) == ["image", "MEL", "NV", "AKIEC"]
        assert (read(out).set_index("image").loc[["ISIC_3", "ISIC_4"], "AKIEC"] == 0.6).all()
    else:
        check_class_format(out, truth, scoring, list(ISIC2019_CLASSES))
    # --source overrides what the manifest says
    assert run_export(run, tmp_path / "as2019.csv", source="isic2019")["format"] == "ISIC 2019"
