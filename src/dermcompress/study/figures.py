"""The study's figures, from the runs' own outputs (history.csv, metrics.json), one PNG per figure.

    curves            training loss, eval accuracy and eval loss per epoch (the study's Figures 1-11): one column
                      per model x resolution, one line per setting of the other dimensions that vary (resolution
                      itself when it is the only one), mean over seeds with a ± std band.
    cost              accuracy against GMACs and against peak GPU memory: the cost-accuracy trade-off.
    robustness        accuracy heat map, trained-on x evaluated-on data variant.
    label_efficiency  accuracy and AUC against the share of training labels (log scale).

Which figures an experiment gets follows from its grid (experiments.figure_kinds); those drawn from its table
(rate-accuracy, forest) are rate_figures.py's, which shares this module's labels, colours and titles.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .aggregate import CPU_NOTE, load_runs, summarize, varying_dims

log = logging.getLogger(__name__)

CURVES = (("train_loss", "training loss"), ("eval_accuracy", "eval accuracy"), ("eval_loss", "eval loss"))
PANEL_DIMS = ("model", "res")
SEEDS_NOTE = "mean ± std over seeds"
DPI = 120


def describe(dims: list[str], values: tuple) -> str:
    """A setting in words: '112 px, lr 1e-05', 'trained on clean', '10% labels'."""
    words = []
    for dim, v in zip(dims, values, strict=True):
        if dim == "res":
            words.append(f"{v} px")
        elif dim in ("lr", "schedule", "epochs") and str(v) in ("", "0"):
            continue  # a probe takes none from the grid
        elif dim == "lr":
            words.append(f"lr {v}")
        elif dim == "epochs":
            words.append(f"{v} epochs")
        elif dim == "label_fraction":
            words.append(f"{float(v) * 100:g}% labels")
        elif dim == "train_variant":
            words.append(f"trained on {v}")
        elif dim == "eval_variant":
            words.append(f"evaluated on {v}")
        else:
            words.append(str(v))
    return ", ".join(words)


def _varying(runs: pd.DataFrame, exclude: tuple[str, ...] = ()) -> list[str]:
    """The grid dimensions with more than one value among the runs, in column order."""
    return [d for d in varying_dims(runs) if d not in exclude and runs[d].nunique() > 1]


def _groups(frame: pd.DataFrame, dims: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """(label, rows) per setting of `dims`, in grid order; one unlabelled group when there are none."""
    if not dims:
        return [("", frame)]
    return [(describe(dims, key), part) for key, part in frame.groupby(dims, sort=False)]


def _colors(labels: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _title(fig: Figure, title: str, width: int) -> None:
    fig.suptitle(textwrap.fill(title, width), fontsize=11)


# ------------------------------------------------------------------------------------------------ curves


def _split_dims(runs: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(panel dims, line dims): panels per model x resolution; lines per the other varying dims (or resolution
    when nothing else varies, as in the study's Figures 1-3)."""
    dims = _varying(runs) or ["model"]
    panels = [d for d in PANEL_DIMS if d in dims]
    lines = [d for d in dims if d not in panels]
    if not lines:
        lines, panels = panels[-1:], panels[:-1]
    return panels, lines


def _seed_band(histories: list[pd.DataFrame], column: str) -> pd.DataFrame:
    """Mean and std over seeds of `column` per epoch (only the rows that report it; none for kNN runs)."""
    if not histories:
        return pd.DataFrame(columns=["epoch", "mean", "std", "size"])
    rows = pd.concat([h[["epoch", column]].dropna() for h in histories])
    return rows.groupby("epoch")[column].agg(["mean", "std", "size"]).reset_index()


def plot_curves(runs: pd.DataFrame, histories: dict[str, pd.DataFrame], title: str) -> Figure:
    """`histories`: history.csv per run folder (`train_run`); a run evaluated on several variants is one curve."""
    runs = runs.drop_duplicates("train_run")
    panels, lines = _split_dims(runs)
    panel_groups = _groups(runs, panels)
    colors = _colors([label for label, _ in _groups(runs, lines)])
    fig, axes = plt.subplots(
        len(CURVES),
        len(panel_groups),
        figsize=(4.2 * len(panel_groups) + 0.6, 2.4 * len(CURVES) + 1.2),
        squeeze=False,
        sharex="col",
        layout="constrained",
    )
    for col, (panel_label, panel) in enumerate(panel_groups):
        axes[0, col].set_title(panel_label or describe(["model"], (runs["model"].iloc[0],)), fontsize=10)
        for row, (column, name) in enumerate(CURVES):
            ax = axes[row, col]
            for line_label, part in _groups(panel, lines):
                band = _seed_band([histories[r] for r in part["train_run"] if r in histories], column)
                if band.empty:
                    continue
                color = colors[line_label]
                marker = "o" if len(band) == 1 else None  # a single evaluation (a probe's)
                ax.plot(band["epoch"], band["mean"], color=color, marker=marker, label=line_label, lw=1.4)
                if band["size"].max() > 1:
                    low, high = band["mean"] - band["std"], band["mean"] + band["std"]
                    ax.fill_between(band["epoch"], low, high, color=color, alpha=0.2, lw=0)
            if not ax.lines:
                ax.text(0.5, 0.5, "not recorded (kNN trains nothing)", ha="center", transform=ax.transAxes)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        axes[-1, col].set_xlabel("epoch")
    legend = {}  # every line once
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    n_seeds = runs.groupby([*panels, *lines], sort=False).size().max()
    width = fig.get_figwidth()
    fig.legend(
        legend.values(),
        legend.keys(),
        loc="outside lower center",
        ncols=max(1, min(len(legend), int(width // 2.4))),  # about 2.4 inches per entry: the legend fits
        fontsize=8,
        title=f"mean over {n_seeds} seeds, band ± std" if n_seeds > 1 else "one seed",
        title_fontsize=8,
    )
    _title(fig, title, width=32 * len(panel_groups) + 20)
    return fig


# ------------------------------------------------------------------------------ summaries over seeds


def _errorbar_lines(
    ax, table: pd.DataFrame, x: str, y: str, lines: list[str], colors: dict, annotate: str = ""
):
    """One line per setting of `lines`: y mean ± std against x, points labelled by their `annotate` value."""
    for label, part in _groups(table, lines):
        part = part.dropna(subset=[x, f"{y}_mean"]).sort_values(x)
        if part.empty:
            continue
        yerr = part[f"{y}_std"].fillna(0)
        ax.errorbar(
            part[x], part[f"{y}_mean"], yerr=yerr, color=colors[label], marker="o", capsize=3, label=label
        )
        for _, row in part.iterrows() if annotate else ():
            text = describe([annotate], (row[annotate],))
            ax.annotate(
                text, (row[x], row[f"{y}_mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
            )


def plot_cost(runs: pd.DataFrame, title: str) -> Figure:
    """Accuracy against GMACs and against peak train memory; one line per model (and other varying dims)."""
    table = summarize(runs)
    lines = _varying(runs, exclude=("res",)) or ["model"]
    colors = _colors([label for label, _ in _groups(table, lines)])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    for ax, x, xlabel in (
        (axes[0], "gmacs", "GMACs per image (log scale)"),
        (axes[1], "peak_train_mem_mb", "peak GPU memory in training, MB (log scale)"),
    ):
        if table[x].notna().any():
            _errorbar_lines(ax, table, x, "accuracy", lines, colors, annotate="res")
            ax.set_xscale("log")
        else:  # CPU runs
            ax.text(
                0.5, 0.5, CPU_NOTE.replace(" (n/a)", ""), ha="center", va="center", transform=ax.transAxes
            )
            ax.set_xticks([])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title=SEEDS_NOTE, title_fontsize=8)
    _title(fig, title, width=110)
    return fig


def _matrix(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """`column` as a trained-on x evaluated-on matrix, variants in grid order (NaN where the grid has no pair)."""
    rows, cols = table["train_variant"].unique(), table["eval_variant"].unique()
    matrix = table.set_index(["train_variant", "eval_variant"])[column].unstack()
    return matrix.reindex(index=rows, columns=cols)


def plot_robustness(runs: pd.DataFrame, title: str) -> Figure:
    """Mean test accuracy per (trained on, evaluated on) variant pair, one heat map per other setting."""
    pair = ("train_variant", "eval_variant")
    other = _varying(runs, exclude=pair)
    table = summarize(runs, dims=["model", *(d for d in other if d != "model"), *pair])
    panels = _groups(table, other)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels) + 1.6, 4.6), squeeze=False, layout="constrained"
    )
    # From chance (binary) or below, up to 1: colours compare across panels and experiments.
    low, high = min(0.5, table["accuracy_mean"].min()), 1.0
    image = None
    for ax, (label, part) in zip(axes[0], panels, strict=True):
        mean, std = (_matrix(part, f"accuracy_{stat}").to_numpy(dtype=float) for stat in ("mean", "std"))
        image = ax.imshow(mean, cmap="viridis", vmin=low, vmax=high, aspect="auto")
        for (i, j), value in np.ndenumerate(mean):
            if np.isnan(value):  # a pair the grid does not have
                continue
            text = f"{value:.3f}" + (f"\n± {std[i, j]:.3f}" if not np.isnan(std[i, j]) else "")
            shade = "black" if value > low + 0.6 * (high - low) else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=shade)
        labels = _matrix(part, "accuracy_mean")
        ax.set_xticks(range(len(labels.columns)), labels.columns, rotation=30, ha="right")
        ax.set_yticks(range(len(labels.index)), labels.index)
        ax.set_xlabel("evaluated on")
        ax.set_ylabel("trained on")
        ax.set_title(label or describe(["model"], (runs["model"].iloc[0],)), fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), label="test accuracy (mean over seeds)")
    _title(fig, title, width=40 * len(panels) + 20)
    return fig


def plot_label_efficiency(runs: pd.DataFrame, title: str) -> Figure:
    """Accuracy and AUC against the share of training labels; one line per other setting."""
    table = summarize(runs).assign(percent=lambda t: t["label_fraction"].astype(float) * 100)
    lines = _varying(runs, exclude=("label_fraction",)) or ["model"]
    colors = _colors([label for label, _ in _groups(table, lines)])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    ticks = sorted(table["percent"].unique())
    for ax, metric, name in ((axes[0], "accuracy", "test accuracy"), (axes[1], "auc", "test AUC")):
        _errorbar_lines(ax, table, "percent", metric, lines, colors)
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("share of training labels (whole groups, log scale)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title=SEEDS_NOTE, title_fontsize=8)
    _title(fig, title, width=110)
    return fig


PLOTS: dict[str, Callable[..., Figure]] = {
    "cost": plot_cost,
    "robustness": plot_robustness,
    "label_efficiency": plot_label_efficiency,
}


def run_figure(*, kind: str, metrics: list[str], title: str, out: str) -> None:
    """One figure of one experiment from its runs' folders (the parents of `metrics`)."""
    runs = load_runs([str(Path(m).parent) for m in metrics])
    if kind == "curves":
        files = {run: Path(run) / "history.csv" for run in runs["train_run"].unique()}
        histories = {run: pd.read_csv(path) for run, path in files.items() if path.is_file()}  # kNN: none
        fig = plot_curves(runs, histories, title)
    else:
        fig = PLOTS[kind](runs, title)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    log.info("%s: %s figure of %d runs", out, kind, len(runs))
