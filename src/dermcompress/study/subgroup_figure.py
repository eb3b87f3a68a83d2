"""The "Δ AUC by subgroup" figure of an experiment, from its subgroup table CSV (subgroups.py): does a row lose
(or gain) the same against its reference row in every sex, age band and anatomical site?

One panel per subgroup column, its subgroups on the y axis (with their test images); per compared row (at most
MAX_ROWS: those with the smallest interaction p first), Δ test AUC on each subgroup's images with its 95%
interval, a marker and colour per row, and the line at 0. Filled points are tested subgroups; hollow grey ones
are not ('unknown', too few images, a class missing: the table says why). Where the subgroup's interaction
(its Δ minus the rest's, Holm-adjusted within the row and column) has p < 0.05, its p is written beside it.
Read without subgroups.py, whose statistics import scikit-learn and scipy: a drawing job starts fast.
"""

from __future__ import annotations

import logging
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .figures import DPI, _colors, _title

log = logging.getLogger(__name__)

MAX_ROWS = 6
MARKERS = "osD^vPX"
SIGNIFICANT = 0.05
UNTESTED = "0.6"
TEXT_COLUMNS = ("row_label", "compared_with", "column", "subgroup", "test", "interaction_test", "untested")
NO_ROWS = "No row of this experiment is compared with a reference row and tested:\nno Δ to show by subgroup."


def read_subgroups_csv(path: str) -> pd.DataFrame:
    """The subgroup table CSV with its text columns as text ('' where empty)."""
    frame = pd.read_csv(path, dtype=dict.fromkeys(TEXT_COLUMNS, str))
    frame[list(TEXT_COLUMNS)] = frame[list(TEXT_COLUMNS)].fillna("")
    return frame


def shown_rows(frame: pd.DataFrame) -> list[int]:
    """The compared rows drawn, in table order: at most MAX_ROWS, those with the smallest Holm-adjusted
    interaction p of AUC first (ties and rows without one: the largest |Δ AUC| on a subgroup)."""
    compared = frame[frame["compared"].astype(bool)]
    if compared.empty:
        return []
    per_row = compared.groupby("row").agg(
        p=("interaction_auc_p_holm", "min"), delta=("delta_auc", lambda d: d.abs().max())
    )
    ranked = per_row.assign(p=per_row["p"].fillna(np.inf), delta=-per_row["delta"].fillna(0))
    return sorted(ranked.sort_values(["p", "delta"], kind="stable").index[:MAX_ROWS].tolist())


def plot_subgroups(frame: pd.DataFrame, title: str) -> Figure:
    """The experiment's Δ AUC by subgroup (module docstring); a panel that says so when no row is compared."""
    rows = shown_rows(frame)
    if not rows:
        fig, ax = plt.subplots(figsize=(8, 2.5), layout="constrained")
        ax.text(0.5, 0.5, NO_ROWS, ha="center", va="center", fontsize=10, transform=ax.transAxes)
        ax.set_axis_off()
        _title(fig, f"{title}: Δ AUC by subgroup", width=80)
        return fig
    columns = list(dict.fromkeys(frame["column"]))
    subgroups = {c: list(dict.fromkeys(frame.loc[frame["column"] == c, "subgroup"])) for c in columns}
    sizes = [len(subgroups[c]) for c in columns]
    fig, axes = plt.subplots(
        len(columns),
        1,
        figsize=(9, 2.0 + 0.3 * sum(sizes) * max(1, len(rows) / 3)),
        height_ratios=[s + 1 for s in sizes],
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    labels = {k: _row_label(frame, k) for k in rows}
    colors = _colors(list(labels.values()))
    offsets = np.linspace(-0.3, 0.3, len(rows)) if len(rows) > 1 else [0.0]
    for ax, column in zip(axes[:, 0], columns, strict=True):
        names = subgroups[column]
        part = frame[frame["column"] == column]
        counts = part.groupby("subgroup")["n_images"].first()
        for offset, marker, k in zip(offsets, MARKERS, rows, strict=False):
            lines = part[part["row"] == k].set_index("subgroup").reindex(names)
            for y, (_, line) in enumerate(lines.iterrows()):
                _point(ax, line, y + offset, marker, colors[labels[k]])
        ax.axvline(0, color="0.3", lw=0.9, zorder=1)
        ax.set_yticks(range(len(names)), [f"{name} (n={counts[name]})" for name in names], fontsize=8)
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.set_title(column.replace("_", " ").capitalize(), fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    axes[-1, 0].set_xlabel("Δ test AUC vs the row's reference, on the subgroup's images (95% CI)")
    handles = [
        plt.Line2D([], [], marker=m, color=colors[labels[k]], ls="", label=labels[k])
        for m, k in zip(MARKERS, rows, strict=False)
    ]
    handles.append(plt.Line2D([], [], marker="o", mfc="white", mec=UNTESTED, ls="", label="not tested"))
    total = frame.loc[frame["compared"].astype(bool), "row"].nunique()
    shown = f"{len(rows)} of {total} compared rows (smallest interaction p first)"
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=2,
        fontsize=8,
        title=textwrap.fill(
            f"{shown}. Each row's test as in the table; p: the interaction (the subgroup's Δ minus the rest's), "
            f"Holm-adjusted within row and column, shown where < {SIGNIFICANT}",
            110,
        ),
        title_fontsize=8,
    )
    _title(fig, f"{title}: Δ AUC by subgroup", width=90)
    return fig


def _row_label(frame: pd.DataFrame, k: int) -> str:
    line = frame[frame["row"] == k].iloc[0]
    return f"{line['row_label']} vs {line['compared_with']}"


def _point(ax: plt.Axes, line: pd.Series, y: float, marker: str, color) -> None:
    """One row's Δ AUC on one subgroup: filled in its colour if tested, hollow grey if not; its interaction p
    beside it where significant."""
    if np.isnan(line["delta_auc"]):
        return
    tested = line["untested"] == ""
    shade = color if tested else UNTESTED
    err = np.clip(
        [[line["delta_auc"] - line["delta_auc_low"]], [line["delta_auc_high"] - line["delta_auc"]]], 0, None
    )
    ax.errorbar(
        [line["delta_auc"]],
        [y],
        xerr=np.nan_to_num(err),
        fmt=marker,
        color=shade,
        mfc=shade if tested else "white",
        mec=shade,
        ms=5,
        capsize=2,
        zorder=3,
    )
    p = line["interaction_auc_p_holm"]
    if tested and p < SIGNIFICANT:
        text = "p<0.001" if p < 0.001 else f"p={p:.3f}"
        ax.annotate(
            text,
            (line["delta_auc_high"], y),
            xytext=(4, 0),
            textcoords="offset points",
            fontsize=7,
            va="center",
            color=color,
        )


def run_subgroup_figure(*, subgroups_csv: str, title: str, out: str) -> None:
    """The Δ AUC by subgroup figure of one experiment from its subgroup table CSV."""
    frame = read_subgroups_csv(subgroups_csv)
    fig = plot_subgroups(frame, title)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    log.info("%s: Δ AUC by subgroup of %d compared rows", out, len(shown_rows(frame)))
