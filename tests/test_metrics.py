"""Metrics against hand computations on tiny examples, and the files they are read from and written to."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from dermcompress.learn import bootstrap
from dermcompress.learn.metrics import (
    EXTRA_KEYS,
    METRIC_KEYS,
    VAL_PREFIX,
    compute_metrics,
    compute_run_metrics,
    metrics_from_file,
    predictions_frame,
    write_metrics,
)

BINARY = ["MEL", "NV"]
THREE = ["A", "B", "C"]


def frame(labels, probs, classes, groups=None):
    """A test split's predictions; each image its own lesion group unless `groups` says otherwise."""
    labels = np.asarray(labels)
    ids = [f"ISIC_{i:07d}" for i in range(len(labels))]
    groups = ids if groups is None else [f"IL_{g:07d}" for g in groups]
    return predictions_frame(ids, labels, np.asarray(probs), classes, group_ids=groups, split="test")


def one_hot_probs(preds, n_classes, confidence=0.9):
    """Probabilities whose argmax is `preds`."""
    probs = np.full((len(preds), n_classes), (1 - confidence) / (n_classes - 1))
    probs[np.arange(len(preds)), preds] = confidence
    return probs


def random_predictions(n=300, classes=BINARY, seed=1):
    """Scores that are informative but imperfect."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(classes), n)
    logits = rng.normal(size=(n, len(classes)))
    logits[np.arange(n), labels] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


def test_perfect_predictions():
    m = compute_metrics(frame([0, 0, 1, 1], one_hot_probs([0, 0, 1, 1], 2), BINARY), BINARY, n_bootstrap=50)
    assert set(m) == set(METRIC_KEYS)
    assert m["accuracy"] == m["f1_macro"] == m["f1_weighted"] == m["auc"] == m["balanced_accuracy"] == 1.0
    assert m["per_class_recall"] == {"MEL": 1.0, "NV": 1.0}
    assert m["confusion_matrix"] == [[2, 0], [0, 2]]
    assert m["n_eval"] == 4
    assert m["accuracy_ci95"] == [1.0, 1.0]


def test_all_wrong():
    m = compute_metrics(frame([0, 0, 1, 1], one_hot_probs([1, 1, 0, 0], 2), BINARY), BINARY, n_bootstrap=50)
    assert m["accuracy"] == m["f1_macro"] == m["f1_weighted"] == m["auc"] == m["balanced_accuracy"] == 0.0
    assert m["confusion_matrix"] == [[0, 2], [2, 0]]
    assert m["per_class_recall"] == {"MEL": 0.0, "NV": 0.0}


def test_known_confusion_matrix_three_classes():
    # true A A A B B C, predicted A A B B C C
    m = compute_metrics(
        frame([0, 0, 0, 1, 1, 2], one_hot_probs([0, 0, 1, 1, 2, 2], 3), THREE), THREE, n_bootstrap=20
    )
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_recall"] == pytest.approx({"A": 2 / 3, "B": 1 / 2, "C": 1.0})
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # precision A 1, B 1/2, C 1/2 -> F1 A 0.8, B 0.5, C 2/3
    assert m["f1_macro"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["f1_weighted"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)


def test_f1_averages_over_the_classes_present_in_labels_or_predictions():
    # Three classes, C in neither the labels nor the predictions: true A A A B B, predicted A A B B B.
    labels, preds = [0, 0, 0, 1, 1], [0, 0, 1, 1, 1]
    m = compute_metrics(frame(labels, one_hot_probs(preds, 3), THREE), THREE, n_bootstrap=0)
    # F1 A = 2*2 / (3 + 2) = 0.8, F1 B = 2*2 / (2 + 3) = 0.8; C has none (0/0) and is left out of the means.
    assert m["f1_macro"] == pytest.approx(0.8)
    assert m["f1_macro"] == pytest.approx(f1_score(labels, preds, labels=[0, 1], average="macro"))
    assert m["f1_weighted"] == pytest.approx(f1_score(labels, preds, labels=[0, 1], average="weighted"))
    # A class only predicted counts (its F1 is 0): true A A B, predicted A C B.
    m = compute_metrics(frame([0, 0, 1], one_hot_probs([0, 2, 1], 3), THREE), THREE, n_bootstrap=0)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["per_class_recall"] == {"A": 0.5, "B": 1.0, "C": None}


def test_known_auc_from_four_points():
    # P(NV) = 0.1, 0.4 for the MEL images and 0.35, 0.8 for the NV ones: 3 of 4 pairs ranked right.
    p_nv = np.array([0.1, 0.4, 0.35, 0.8])
    m = compute_metrics(frame([0, 0, 1, 1], np.stack([1 - p_nv, p_nv], 1), BINARY), BINARY, n_bootstrap=0)
    assert m["auc"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.75)  # argmax: MEL, MEL, MEL, NV
    assert m["accuracy_ci95"] is None and m["auc_ci95"] is None


def test_multiclass_auc_is_one_vs_rest_macro():
    labels, probs = random_predictions(200, THREE)
    m = compute_metrics(frame(labels, probs, THREE), THREE, n_bootstrap=0)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def test_balanced_accuracy_matches_sklearn():
    labels, probs = random_predictions(250, THREE, seed=4)
    m = compute_metrics(frame(labels, probs, THREE), THREE, n_bootstrap=0)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, probs.argmax(1)))
    assert m["balanced_accuracy"] == pytest.approx(np.mean(list(m["per_class_recall"].values())))


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    preds = frame(*random_predictions(), BINARY)
    a = compute_metrics(preds, BINARY, n_bootstrap=200, seed=7)
    b = compute_metrics(preds, BINARY, n_bootstrap=200, seed=7)
    c = compute_metrics(preds, BINARY, n_bootstrap=200, seed=8)
    assert a == b
    assert a["accuracy_ci95"] != c["accuracy_ci95"]
    for key in ("accuracy", "auc"):
        low, high = a[f"{key}_ci95"]
        assert low < a[key] < high
        assert high - low < 0.25  # 300 images: a few points either side, not the whole range


def test_single_class_labels_give_null_auc():
    preds = frame([1, 1, 1], one_hot_probs([1, 0, 1], 2), BINARY)
    m = compute_metrics(preds, BINARY, n_bootstrap=20)
    assert m["auc"] is None and m["auc_ci95"] is None
    assert m["per_class_recall"] == {"MEL": None, "NV": pytest.approx(2 / 3)}
    assert m["accuracy"] == pytest.approx(2 / 3)
    json.dumps(m, allow_nan=False)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        frame([0, 1], [[0.5, 0.6], [0.5, 0.5]], BINARY)
    with pytest.raises(ValueError, match="class indices"):
        frame([0, 2], one_hot_probs([0, 1], 2), BINARY)
    preds = frame([0, 1], one_hot_probs([0, 1], 2), BINARY)
    preds.loc[0, "label"] = "BCC"
    with pytest.raises(ValueError, match="BCC"):
        compute_metrics(preds, BINARY)
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics(preds.iloc[:0], BINARY)


def test_predictions_frame_round_trips_through_parquet(tmp_path):
    labels, probs = random_predictions(40, THREE)
    preds = frame(labels, probs.astype(np.float32), THREE)  # float32 rounding is renormalised away
    assert list(preds.columns) == [
        *("split", "image_id", "group_id", "label", "pred"),
        *("prob_A", "prob_B", "prob_C"),
    ]
    assert (preds["label"] == np.asarray(THREE)[labels]).all()
    assert (preds["pred"] == np.asarray(THREE)[probs.argmax(1)]).all()
    path = tmp_path / "predictions.parquet"
    preds.to_parquet(path, index=False)
    back = pd.read_parquet(path)
    pd.testing.assert_frame_equal(back, preds)
    np.testing.assert_allclose(back[["prob_A", "prob_B", "prob_C"]].sum(axis=1), 1.0, atol=1e-12)
    assert metrics_from_file(path, THREE, n_bootstrap=30) == compute_metrics(preds, THREE, n_bootstrap=30)


def test_run_metrics_hold_test_and_val_scores():
    labels, probs = random_predictions(120, BINARY, seed=5)
    test = frame(labels[:80], probs[:80], BINARY)
    val = frame(labels[80:], probs[80:], BINARY).assign(split="val")
    scores = compute_run_metrics(pd.concat([test, val], ignore_index=True), BINARY, n_bootstrap=30)
    assert {k: scores[k] for k in METRIC_KEYS} == compute_metrics(test, BINARY, n_bootstrap=30)
    assert {k: scores[f"{VAL_PREFIX}{k}"] for k in METRIC_KEYS} == compute_metrics(
        val, BINARY, n_bootstrap=30
    )
    assert scores["n_eval"] == 80 and scores["val_n_eval"] == 40
    with pytest.raises(ValueError, match="train"):
        compute_run_metrics(test.assign(split="train"), BINARY)


def grouped_predictions(n_groups=80, seed=2):
    """A test split of lesion groups of 1-4 images each; images of a group share label and, roughly, score."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_groups)
    group_labels = rng.integers(0, 2, n_groups)
    group_scores = rng.normal(size=n_groups) + group_labels
    groups = np.repeat(np.arange(n_groups), sizes)
    labels = group_labels[groups]
    p_nv = 1 / (1 + np.exp(-(group_scores[groups] + 0.3 * rng.normal(size=len(groups)))))
    return frame(labels, np.stack([1 - p_nv, p_nv], 1), BINARY, groups=groups)


def test_bootstrap_resamples_lesion_groups_not_images():
    """Duplicating every image within its lesion adds no evidence: the group-bootstrap intervals stay exactly
    the same, while an image bootstrap (every image its own group) would take the copies as new data and
    shrink them."""
    preds = grouped_predictions()
    copies = preds.assign(image_id=preds["image_id"] + "_copy")
    doubled = pd.concat([preds, copies], ignore_index=True)
    once = compute_metrics(preds, BINARY, n_bootstrap=400, seed=3)
    twice = compute_metrics(doubled, BINARY, n_bootstrap=400, seed=3)
    assert once["n_groups"] == twice["n_groups"] == 80 and twice["n_eval"] == 2 * once["n_eval"]
    for key in ("accuracy", "auc", "balanced_accuracy"):
        assert twice[key] == pytest.approx(once[key])
        np.testing.assert_allclose(twice[f"{key}_ci95"], once[f"{key}_ci95"], rtol=0, atol=1e-12)

    def width(m, key):
        return m[f"{key}_ci95"][1] - m[f"{key}_ci95"][0]

    by_image = compute_metrics(doubled.assign(group_id=doubled["image_id"]), BINARY, n_bootstrap=400, seed=3)
    for key in ("accuracy", "auc"):
        assert width(by_image, key) < 0.85 * width(once, key)


def test_weighted_auc_matches_sklearn_sample_weights():
    """The vectorised weighted AUC of each resample equals scikit-learn's roc_auc_score(sample_weight=...),
    ties included (scores rounded to force them)."""
    rng = np.random.default_rng(0)
    labels, probs = random_predictions(90, THREE, seed=6)
    probs = np.round(probs, 1)
    probs /= probs.sum(axis=1, keepdims=True)
    weights = bootstrap.group_weights(rng.integers(0, 30, 90), 25, seed=1)
    binary = bootstrap.weighted_binary_auc(labels == 1, probs[:, 1], weights)
    macro = bootstrap.weighted_auc(labels, probs, weights)
    for b, w in enumerate(weights):
        assert binary[b] == pytest.approx(roc_auc_score(labels == 1, probs[:, 1], sample_weight=w))
        present = [c for c in range(3) if w[labels == c].sum() > 0]
        expected = np.mean([roc_auc_score(labels == c, probs[:, c], sample_weight=w) for c in present])
        assert macro[b] == pytest.approx(expected)


def test_write_metrics_nulls_nan_and_keeps_extras(tmp_path):
    m = compute_metrics(frame([0, 1, 1], one_hot_probs([0, 1, 0], 2), BINARY), BINARY, n_bootstrap=20)
    m["f1_macro"] = float("nan")
    extra = dict.fromkeys(EXTRA_KEYS, 1.5) | {
        "peak_train_mem_mb": None,
        "peak_eval_mem_mb": np.float32("nan"),
        "gmacs": np.float64(17.56),
        "effective_input_px": np.int64(224),
    }
    path = tmp_path / "run" / "metrics.json"
    write_metrics(path, m, extra)
    text = path.read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert set(data) == set(METRIC_KEYS) | set(EXTRA_KEYS)
    assert data["f1_macro"] is None and data["peak_eval_mem_mb"] is None and data["peak_train_mem_mb"] is None
    assert data["gmacs"] == 17.56 and data["effective_input_px"] == 224 and data["train_img_per_s"] == 1.5
    assert data["confusion_matrix"] == m["confusion_matrix"]
    assert not list(path.parent.glob("*.tmp"))
    with pytest.raises(ValueError, match="accuracy"):
        write_metrics(path, m, {"accuracy": 0.5})
