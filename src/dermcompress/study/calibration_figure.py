"""The reliability diagram of an experiment, from its table CSV (the rows, their runs and test ECE) and the runs'
predictions: are the test probabilities of each setting probabilities?

One panel per model; in it the test split's reliability curve (calibration.reliability: accuracy against mean
confidence per equal-width confidence bin, the seeds' predictions pooled) of its reference row and of the rows
with the largest test ECE (at most MAX_LINES in all; the title says how many of how many), against the diagonal
of perfect calibration. Each line's label gives the row and its ECE.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dermcompress.data import integrity

from .aggregate import DIMS, RUNS_SEPARATOR
from .calibration import BINNING, reliability
from .figures import DPI, _colors, _title, describe
from .rate_figures import read_table_csv

log = logging.getLogger(__name__)

MAX_LINES = 6


def _pooled_test(runs: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(labels as class indices, probabilities) of the test rows of every run in a table cell, pooled over
    seeds. The columns are metrics.py's (prob_<CLASS>), read here without learn.metrics, whose scikit-learn
    import would double this drawing job's start-up."""
    frames = [integrity.read_frame(Path(run) / "predictions.parquet") for run in runs.split(RUNS_SEPARATOR)]
    test = pd.concat([f[f["split"] == "test"] for f in frames], ignore_index=True)
    labels = pd.Categorical(test["label"].astype(str), categories=classes)
    if (labels.codes < 0).any():
        raise ValueError(
            f"{runs}: labels {sorted(set(test['label'].astype(str)) - set(classes))} not in {classes}"
        )
    return labels.codes.astype(np.int64), test[[f"prob_{c}" for c in classes]].to_numpy(float)


def shown_rows(table: pd.DataFrame) -> list[int]:
    """Per model, in table order: its reference rows and the rows with the largest test ECE, MAX_LINES at most."""
    chosen = []
    for _, rows in table.groupby("model", sort=False):
        references = rows.index[rows["reference"]].tolist() if "reference" in rows else []
        worst = rows.drop(index=references).sort_values("ece_mean", ascending=False, kind="stable")
        keep = set(references[:MAX_LINES]) | set(worst.index[: max(MAX_LINES - len(references), 0)])
        chosen += [k for k in rows.index if k in keep]
    return chosen


def plot_reliability(table: pd.DataFrame, classes: list[str], title: str) -> Figure:
    """The experiment's reliability diagram (module docstring)."""
    dims = [d for d in DIMS if d in table.columns and d != "model"]
    models = list(dict.fromkeys(table["model"]))
    fig, axes = plt.subplots(
        1, len(models), figsize=(4.6 * len(models) + 0.6, 5.2), squeeze=False, layout="constrained"
    )
    shown = shown_rows(table)
    labels = {
        k: describe(dims, tuple(table.loc[k, d] for d in dims)) or str(table.loc[k, "model"]) for k in shown
    }
    colors = _colors(list(dict.fromkeys(labels.values())))
    for ax, model in zip(axes[0], models, strict=True):
        rows = [k for k in shown if table.loc[k, "model"] == model]
        ax.plot([0, 1], [0, 1], ls=":", color="0.4", lw=1, label="perfect calibration", zorder=0)
        for k in rows:
            points = reliability(*_pooled_test(table.loc[k, "runs"], classes))
            prefix = "reference: " if bool(table.loc[k].get("reference", False)) else ""
            label = f"{prefix}{labels[k]} (ECE {table.loc[k, 'ece_mean']:.3f})"
            ax.plot(
                points["confidence"],
                points["accuracy"],
                marker="o",
                ms=4,
                color=colors[labels[k]],
                label=label,
            )
        total = int((table["model"] == model).sum())
        ax.set_title(f"{model}: {len(rows)} of {total} rows", fontsize=10)
        ax.set_xlabel("mean confidence (top class)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(1 / len(classes) - 0.02, 1.02)  # a top class has at least 1/C of the probability
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.supxlabel(
        f"Test split, seeds pooled; {BINNING}; the reference rows and the least calibrated", fontsize=8
    )
    _title(fig, title, width=40 * len(models) + 20)
    return fig


def run_reliability_figure(*, table_csv: str, classes: list[str], title: str, out: str) -> None:
    """The reliability diagram of one experiment from its table CSV and its runs' predictions."""
    table = read_table_csv(table_csv)
    fig = plot_reliability(table, classes, title)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    log.info("%s: reliability diagram of %d table rows", out, len(table))
