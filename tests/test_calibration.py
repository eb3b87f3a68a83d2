"""Calibration: ECE and Brier against hand computations, ECE near 0 for a calibrated simulated model and far from
it for an overconfident one, the reliability diagram's points, and temperature scaling fitted on val only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dermcompress.learn.metrics import predictions_frame
from dermcompress.study.calibration import (
    BINS,
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    reliability,
    temperature_scaled,
)


def test_ece_by_hand_with_four_bins():
    # Confidences 0.9, 0.8 (bin 4 of 4: (0.75, 1]) and 0.6, 0.55 (bin 3: (0.5, 0.75]); correct, wrong, right, right.
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.4, 0.6], [0.55, 0.45]])
    y = np.array([1, 1, 1, 0])
    # bin 4: accuracy 1/2, confidence 0.85 -> |gap| 0.35 x 2 images; bin 3: accuracy 1, confidence 0.575 -> 0.425 x 2.
    assert expected_calibration_error(y, probs, n_bins=4) == pytest.approx((2 * 0.35 + 2 * 0.425) / 4)
    # A confidence on a bin's upper edge belongs to that bin: 0.75 is in (0.5, 0.75].
    edge = expected_calibration_error(np.array([1]), np.array([[0.25, 0.75]]), n_bins=4)
    assert edge == pytest.approx(0.25)
    assert np.isnan(expected_calibration_error(np.array([], dtype=int), np.zeros((0, 2))))


def test_brier_by_hand_for_two_and_three_classes():
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.4, 0.6]])
    y = np.array([1, 1, 0])
    assert brier_score(y, probs) == pytest.approx(((0.9 - 1) ** 2 + (0.2 - 1) ** 2 + 0.6**2) / 3)
    three = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    want = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.9**2 + 0.8**2)) / 2  # label 0, then label 1
    assert brier_score(np.array([0, 1]), three) == pytest.approx(want)


def test_a_calibrated_model_has_ece_near_zero_and_an_overconfident_one_does_not():
    rng = np.random.default_rng(0)
    n = 20_000
    p = rng.uniform(0, 1, n)
    y = (rng.random(n) < p).astype(int)  # P(positive) is exactly p: calibrated
    calibrated = expected_calibration_error(y, np.stack([1 - p, p], axis=1))
    sharp = np.clip(0.5 + 2 * (p - 0.5), 0, 1)  # the same ranking, probabilities pushed to 0 and 1
    overconfident = expected_calibration_error(y, np.stack([1 - sharp, sharp], axis=1))
    assert calibrated < 0.015 and overconfident > 0.1


def test_reliability_points_are_the_bins_means():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, 500)
    y = (rng.random(500) < p).astype(int)
    probs = np.stack([1 - p, p], axis=1)
    points = reliability(y, probs)
    assert points["n"].sum() == 500 and len(points) <= BINS
    confidence = probs.max(axis=1)
    inside = (confidence > points["lower"].iloc[-1]) & (confidence <= points["upper"].iloc[-1])
    assert points["confidence"].iloc[-1] == pytest.approx(confidence[inside].mean())
    assert points["accuracy"].iloc[-1] == pytest.approx((probs.argmax(axis=1) == y)[inside].mean())
    weights = points["n"] / points["n"].sum()
    ece = float((weights * (points["accuracy"] - points["confidence"]).abs()).sum())
    assert ece == pytest.approx(expected_calibration_error(y, probs))


def test_calibration_metrics_per_split():
    rng = np.random.default_rng(2)
    p = rng.uniform(0, 1, 40)
    y = (rng.random(40) < p).astype(int)
    probs = np.stack([1 - p, p], axis=1)
    ids = [f"ISIC_{i:07d}" for i in range(40)]
    test = predictions_frame(ids[:25], y[:25], probs[:25], ["MEL", "NV"], group_ids=ids[:25], split="test")
    val = predictions_frame(ids[25:], y[25:], probs[25:], ["MEL", "NV"], group_ids=ids[25:], split="val")
    got = calibration_metrics(pd.concat([test, val]), ["MEL", "NV"])
    assert got["ece"] == pytest.approx(expected_calibration_error(y[:25], probs[:25]))
    assert got["val_brier"] == pytest.approx(np.mean((p[25:] - y[25:]) ** 2))
    only_test = calibration_metrics(test, ["MEL", "NV"])
    assert np.isnan(only_test["val_ece"]) and np.isnan(only_test["val_brier"])


def test_reliability_figure_draws_each_models_reference_and_least_calibrated_rows(tmp_path):
    """Two models, eight eval variants each, calibration worsening with the variant: each panel draws the
    diagonal, the model's reference and its MAX_LINES - 1 least calibrated rows, with their table ECE."""
    import matplotlib.pyplot as plt
    from test_compare import BINARY, binary_frame, grouped_data, table_of

    from dermcompress.study import calibration_figure

    rng = np.random.default_rng(3)
    y, groups = grouped_data(rng, 120)
    rows = []
    for model in ("a", "b"):
        for k in range(8):
            scores = (1 + k) * (1.5 * y - 0.75 + rng.normal(scale=0.6, size=len(y)))  # sharper: overconfident
            rows.append(({"model": model, "eval_variant": f"v{k}"}, [binary_frame(y, scores, groups)], 0.8))
    table_of(tmp_path, rows, {"eval_variant": "v0"}, n_bootstrap=20)
    csv = tmp_path / "t.csv"
    table = calibration_figure.read_table_csv(str(csv))
    fig = calibration_figure.plot_reliability(table, BINARY, "t")
    for ax, model in zip(fig.axes, ("a", "b"), strict=True):
        mine = table[table["model"] == model]
        labels = [line.get_label() for line in ax.lines]
        assert labels[0] == "perfect calibration" and len(labels) == 1 + calibration_figure.MAX_LINES
        assert sum(label.startswith("reference: ") for label in labels) == 1
        worst = mine[~mine["reference"]].nlargest(calibration_figure.MAX_LINES - 1, "ece_mean")
        for _, row in worst.iterrows():
            assert any(
                f"evaluated on {row['eval_variant']} (ECE {row['ece_mean']:.3f})" in lab for lab in labels
            )
    plt.close(fig)
    out = tmp_path / "r.png"
    calibration_figure.run_reliability_figure(table_csv=str(csv), classes=BINARY, title="t", out=str(out))
    assert out.read_bytes()[:4] == b"\x89PNG"


def _overconfident(n: int, seed: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from calibrated logits, and probabilities at those logits x `temperature` (too sharp)."""
    rng = np.random.default_rng(seed)
    logit = rng.normal(0, 2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    sharp = 1 / (1 + np.exp(-temperature * logit))
    return y, np.stack([1 - sharp, sharp], axis=1)


def test_temperature_scaling_recovers_the_temperature_and_repairs_ece():
    y, probs = _overconfident(20_000, 3, temperature=3.0)
    t = fit_temperature(y, probs)
    assert t == pytest.approx(3.0, rel=0.05)
    assert temperature_scaled(probs, 1.0) == pytest.approx(probs)
    repaired = expected_calibration_error(y, temperature_scaled(probs, t))
    assert expected_calibration_error(y, probs) > 0.1 and repaired < 0.015
    # Scaling keeps the ranking: the positive class's probability is a monotone function of the original.
    order = np.argsort(probs[:, 1], kind="stable")
    assert np.all(np.diff(temperature_scaled(probs, t)[order, 1]) >= 0)


def test_temperature_is_fitted_on_val_and_never_on_test():
    y_val, p_val = _overconfident(4000, 4, temperature=3.0)
    y_test, p_test = _overconfident(4000, 5, temperature=3.0)
    ids = [f"ISIC_{i:07d}" for i in range(8000)]
    classes = ["MEL", "NV"]

    def metrics(test_probs: np.ndarray) -> dict:
        val = predictions_frame(ids[:4000], y_val, p_val, classes, group_ids=ids[:4000], split="val")
        test = predictions_frame(ids[4000:], y_test, test_probs, classes, group_ids=ids[4000:], split="test")
        return calibration_metrics(pd.concat([val, test]), classes)

    got = metrics(p_test)
    assert got["temperature"] == pytest.approx(fit_temperature(y_val, p_val))
    assert got["ece_ts"] == pytest.approx(
        expected_calibration_error(y_test, temperature_scaled(p_test, got["temperature"]))
    )
    assert got["ece_ts"] < 0.03 < got["ece"]
    # Other test probabilities move ece_ts but not the temperature: test is never looked at to fit.
    assert metrics(p_test[::-1].copy())["temperature"] == got["temperature"]
