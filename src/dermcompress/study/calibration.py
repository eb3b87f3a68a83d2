"""Calibration of a run's predicted probabilities: expected calibration error and the Brier score, per split.

AUC and balanced accuracy say whether a model ranks and labels images well, not whether its probabilities can be
read as probabilities; compression and downsizing can move calibration without moving AUC.

- ECE (expected calibration error, Guo et al. 2017, "On calibration of modern neural networks"), top-label: each
  image's confidence is its largest class probability and it is correct when that class is its label; images
  are put in BINS equal-width confidence bins over [0, 1] (bin k holds (k/BINS, (k+1)/BINS], the first also 0),
  and ECE is the image-weighted mean over the bins of |accuracy - mean confidence|. The binning is part of the
  number (another binning gives another ECE), so tables name it (BINNING).
- Brier score: scikit-learn's brier_score_loss, the mean squared error of the probabilities against the one-hot
  label; for two classes that of the positive class's probability (0 perfect, 0.25 a constant 0.5), for more
  the sum over classes (0 to 2).
- Temperature scaling (Guo et al. 2017): one temperature T fitted on the validation split by minimising the
  negative log-likelihood of softmax(log p / T), then applied to the test probabilities; `ece_ts` is the test
  ECE after it. It reads only val to fit, so it never selects on test. It changes no ranking (AUC) and no
  prediction: it says how much of a row's miscalibration one number would repair.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

BINS = 15
BINNING = f"top-label, {BINS} equal-width confidence bins"
SPLITS = {"test": "", "val": "val_"}  # split -> prefix of its columns
TEMPERATURES = (0.05, 20.0)  # the search range of the temperature
EPS = 1e-12  # probabilities are clipped here before their log


def _confidence(
    y_true: np.ndarray, probs: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: its confidence, whether its top class is right, and its confidence bin."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    return confidence, correct, bins


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = BINS) -> float:
    """Top-label ECE with `n_bins` equal-width bins (module docstring); NaN without images."""
    if len(y_true) == 0:
        return float("nan")
    confidence, correct, bins = _confidence(np.asarray(y_true), np.asarray(probs, dtype=float), n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    gap = np.bincount(
        bins, weights=correct - confidence, minlength=n_bins
    )  # Σ (correct - confidence) per bin
    return float(np.abs(gap).sum() / counts.sum())


def reliability(y_true: np.ndarray, probs: np.ndarray, n_bins: int = BINS) -> pd.DataFrame:
    """The reliability diagram's points: per non-empty bin its bounds, images, mean confidence and accuracy."""
    confidence, correct, bins = _confidence(np.asarray(y_true), np.asarray(probs, dtype=float), n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    used = np.flatnonzero(counts)
    return pd.DataFrame(
        {
            "lower": used / n_bins,
            "upper": (used + 1) / n_bins,
            "n": counts[used],
            "confidence": np.bincount(bins, weights=confidence, minlength=n_bins)[used] / counts[used],
            "accuracy": np.bincount(bins, weights=correct, minlength=n_bins)[used] / counts[used],
        }
    )


def brier_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """scikit-learn's Brier score: of the positive class for two classes, summed over classes for more."""
    from sklearn.metrics import (
        brier_score_loss,  # here: the reliability figure's job needs none of it (0.8 s)
    )

    probs = np.asarray(probs, dtype=float)
    if probs.shape[1] == 2:
        return float(brier_score_loss(np.asarray(y_true) == 1, probs[:, 1]))
    return float(brier_score_loss(y_true, probs, labels=list(range(probs.shape[1]))))


def temperature_scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T), row-wise: the probabilities at temperature T (T = 1 leaves them as they are)."""
    logits = np.log(np.clip(np.asarray(probs, dtype=float), EPS, 1)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def fit_temperature(y_true: np.ndarray, probs: np.ndarray) -> float:
    """The T in TEMPERATURES that minimises the mean negative log-likelihood of temperature_scaled(probs, T)
    (scipy's bounded scalar search over log T); NaN without images."""
    from scipy.optimize import minimize_scalar

    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return float("nan")

    def nll(log_t: float) -> float:
        scaled = temperature_scaled(probs, float(np.exp(log_t)))
        return float(-np.log(np.clip(scaled[np.arange(len(y_true)), y_true], EPS, 1)).mean())

    bounds = tuple(np.log(TEMPERATURES))
    return float(np.exp(minimize_scalar(nll, bounds=bounds, method="bounded", options={"xatol": 1e-4}).x))


def calibration_metrics(predictions: pd.DataFrame, classes: list[str]) -> dict[str, float]:
    """ECE and Brier of each split in `predictions` (metrics.py's format): `ece`, `brier` (test) and `val_ece`,
    `val_brier`; NaN for a split without rows."""
    from dermcompress.learn.metrics import class_indices, prob_columns  # scikit-learn: only where scored

    out, scored = {}, {}
    for split, prefix in SPLITS.items():
        rows = predictions[predictions["split"] == split]
        y = class_indices(rows["label"], classes, "label")
        probs = rows[prob_columns(classes)].to_numpy(dtype=float)
        out[f"{prefix}ece"] = expected_calibration_error(y, probs)
        out[f"{prefix}brier"] = brier_score(y, probs) if len(rows) else float("nan")
        scored[split] = (y, probs)
    out["temperature"] = fit_temperature(*scored["val"])
    y, probs = scored["test"]
    out["ece_ts"] = (
        expected_calibration_error(y, temperature_scaled(probs, out["temperature"]))
        if np.isfinite(out["temperature"])
        else float("nan")
    )
    return out
