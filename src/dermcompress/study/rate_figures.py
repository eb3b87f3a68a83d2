"""The study's rate figures, from an experiment's table CSV (aggregate; its rate and paired-comparison columns)
instead of its runs, one PNG per figure.

    rate_accuracy     test AUC and balanced accuracy against kB per image (log scale), one line per resolution x
                      codec, points labelled by codec quality; the Pareto frontier of each panel (dashed step,
                      ringed points) and the reference row (star, dotted level): what each byte budget keeps.
    forest            Δ AUC and Δ balanced accuracy against each row's reference row with their 95% intervals,
                      one line per table row; filled where the Holm-adjusted bootstrap p of the contrast's test
                      (compare.py) is < 0.05; rows without a p (not val-selected) say why.

Which figures an experiment gets follows from its grid (experiments.figure_kinds); the labels, colours and
titles are figures.py's, so both kinds of figure read alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .aggregate import DIMS
from .figures import DPI, SEEDS_NOTE, _colors, _groups, _title, describe

log = logging.getLogger(__name__)

KB = "kb_per_image"
# Display name, marker and colour map (shaded by resolution, darker for larger) per codec, in legend order.
CODECS = {
    "png": ("PNG", "s", "Greys"),
    "jpeg": ("JPEG", "o", "Blues"),
    "webp": ("WebP", "^", "Greens"),
    "avif": ("AVIF", "v", "Oranges"),
    "mixed": ("mixed", "D", "Purples"),
}
RATE_METRICS = (("auc", "test AUC"), ("balanced_accuracy", "test balanced accuracy"))
# Dimensions the rate figure draws within a panel (one line per resolution x codec, a point per eval variant).
RATE_LINE_DIMS = ("res", "eval_variant")
FRONTIER = "Pareto frontier (ringed)"
FRONTIER_COLOR = "0.45"
SIGNIFICANT = 0.05
# The forest figure's test, in its legend (compare.py, contrasts.py).
FOREST_TEST = (
    "Δ vs the row's reference (its own model's unless the experiment names one); 95% interval and p from the "
    "lesion-group bootstrap:\nsame models: paired, models fixed (z); other recipes: + seed-to-seed variance "
    "(Welch t); Holm within the rows sharing a reference"
)


def pareto_front(kb: np.ndarray, score: np.ndarray) -> np.ndarray:
    """True on the points no other point dominates (kB ≤ and score ≥, one of them strictly): the best score
    each byte budget can buy. Points with a NaN are never on the front and dominate nothing; equal points are
    both on it."""
    kb, score = np.asarray(kb, dtype=float), np.asarray(score, dtype=float)
    valid = ~(np.isnan(kb) | np.isnan(score))
    k, s = kb[valid], score[valid]
    # dominated[i, j]: point j dominates point i.
    no_worse = (k[None, :] <= k[:, None]) & (s[None, :] >= s[:, None])
    better = (k[None, :] < k[:, None]) | (s[None, :] > s[:, None])
    front = np.zeros(len(kb), dtype=bool)
    front[valid] = ~(no_worse & better).any(axis=1)
    return front


def _table_dims(table: pd.DataFrame, exclude: tuple[str, ...] = ()) -> list[str]:
    """The grid dimensions among the table's columns with more than one value, in grid order."""
    return [d for d in DIMS if d in table.columns and d not in exclude and table[d].nunique() > 1]


def _line_key(row) -> tuple:
    return (row["res"] if "res" in row.index else None, row["codec"])


def _line_label(key: tuple) -> str:
    res, codec = key
    name = CODECS.get(codec, (str(codec),))[0]
    return name if res is None else f"{res} px {name}"


def _line_keys(table: pd.DataFrame) -> list[tuple]:
    """Every resolution x codec of the table: largest resolution first, codecs in CODECS order."""
    keys = {_line_key(row) for _, row in table.iterrows()}
    order = list(CODECS)

    def rank(key):
        res, codec = key
        return (-(res or 0), order.index(codec) if codec in order else len(order), str(codec))

    return sorted(keys, key=rank)


def _line_colors(keys: list[tuple]) -> dict[tuple, tuple]:
    """A colour per codec, darker for larger resolutions; codecs CODECS does not know take tab10's."""
    resolutions = sorted({res or 0 for res, _ in keys}, reverse=True)
    levels = np.linspace(0.95, 0.5, len(resolutions)) if len(resolutions) > 1 else [0.8] * len(resolutions)
    shades = dict(zip(resolutions, levels, strict=True))
    others = _colors(sorted({str(codec) for _, codec in keys if codec not in CODECS}))
    colors = {}
    for res, codec in keys:
        known = codec in CODECS
        colors[res, codec] = plt.get_cmap(CODECS[codec][2])(shades[res or 0]) if known else others[str(codec)]
    return colors


def _reference(table: pd.DataFrame, panel: pd.DataFrame | None = None) -> pd.Series | None:
    """The row `panel`'s rows are compared with (the most common `compared_with_row` among them: each model
    has its own), else the table's first reference row; None without one."""
    if "reference" not in table.columns:
        return None
    if panel is not None and "compared_with_row" in panel.columns:
        compared = panel["compared_with_row"].dropna().astype(int)
        compared = compared[compared >= 0]
        if len(compared):
            return table.loc[compared.mode().iloc[0]]
    rows = table[table["reference"].fillna(False).astype(bool)]
    return rows.iloc[0] if len(rows) else None


def _kb_text(kb: float) -> str:
    return f"{kb:.3g} kB" if not np.isnan(kb) else ""


def _rate_panel(ax, panel: pd.DataFrame, metric: str, colors: dict, reference: pd.Series | None) -> None:
    """One panel: a line per resolution x codec (points sorted by kB, labelled by quality), the frontier over
    all the panel's points, the reference's level and, where it is in this panel, the reference itself."""
    mean, std = f"{metric}_mean", f"{metric}_std"
    panel = panel.dropna(subset=[mean])
    for key in _line_keys(panel):
        part = panel[[_line_key(row) == key for _, row in panel.iterrows()]].sort_values(KB)
        ax.errorbar(
            part[KB],
            part[mean],
            yerr=part[std].fillna(0),
            color=colors[key],
            marker=CODECS.get(key[1], ("", "o"))[1],
            ms=5,
            capsize=3,
            lw=1.3,
            label=_line_label(key),
            zorder=2,
        )
        for _, row in part.iterrows():
            if pd.notna(row.get("codec_quality", np.nan)):
                ax.annotate(
                    f"q{row['codec_quality']:g}",
                    (row[KB], row[mean]),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
    on_front = pareto_front(panel[KB].to_numpy(float), panel[mean].to_numpy(float))
    front = panel[on_front].sort_values([KB, mean])
    if len(front):
        ax.step(
            front[KB],
            front[mean],
            where="post",
            ls="--",
            color=FRONTIER_COLOR,
            lw=1.1,
            zorder=1,
            label=FRONTIER,
            gid="pareto_front",
        )
        ax.scatter(
            front[KB], front[mean], s=150, facecolors="none", edgecolors=FRONTIER_COLOR, lw=1.2, zorder=3
        )
    if reference is not None and pd.notna(reference[mean]):
        ax.axhline(reference[mean], color="0.3", ls=":", lw=0.9, zorder=0, label="reference level")
        if reference.name in panel.index:
            ax.scatter(
                [reference[KB]],
                [reference[mean]],
                marker="*",
                s=260,
                color="gold",
                edgecolors="black",
                lw=0.8,
                zorder=4,
                label="reference",
                gid="reference",
            )


def _kb_axis(ax: plt.Axes, kb: pd.Series) -> None:
    """A log kB axis labelled at 1, 2 and 5 times powers of ten (0.2, 0.5, 1, 2 kB), padded by a factor 1.6
    on each side so that even a narrow range shows a labelled tick, with unlabelled minor ticks."""
    ax.set_xscale("log")
    low, high = float(kb.min()), float(kb.max())
    if np.isfinite(low) and np.isfinite(high) and low > 0:
        ax.set_xlim(low / 1.6, high * 1.6)
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_rate_accuracy(table: pd.DataFrame, title: str) -> Figure:
    """Test AUC (top) and balanced accuracy (bottom), mean ± std over seeds, against kB per image (log scale);
    a column per setting of the varying dimensions other than resolution and eval variant (the model; a
    training arm); a line per resolution x codec within. Rows without a kB per image are left out."""
    missing = table[KB].isna() | (table[KB] <= 0)
    if missing.any():
        log.warning(
            "%s: %d row(s) without kB per image left out of the rate figure", title, int(missing.sum())
        )
    drawn = table[~missing]
    panels = _table_dims(drawn, exclude=RATE_LINE_DIMS)
    panel_groups = _groups(drawn, panels) if len(drawn) else [("no row has a kB per image", drawn)]
    colors = _line_colors(_line_keys(drawn))
    fig, axes = plt.subplots(
        len(RATE_METRICS),
        len(panel_groups),
        figsize=(4.8 * len(panel_groups) + 0.8, 3.2 * len(RATE_METRICS) + 1.6),
        squeeze=False,
        sharex="col",
        sharey="row",
        layout="constrained",
    )
    references = {}  # per panel: the row its rows are compared with
    for col, (panel_label, panel) in enumerate(panel_groups):
        axes[0, col].set_title(panel_label or describe(["model"], (table["model"].iloc[0],)), fontsize=10)
        reference = references[col] = _reference(table, panel)
        for row, (metric, name) in enumerate(RATE_METRICS):
            ax = axes[row, col]
            _rate_panel(ax, panel, metric, colors, reference)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3, which="both")
        _kb_axis(axes[-1, col], panel["kb_per_image"])  # the column shares it
        axes[-1, col].set_xlabel("kB per image (log scale)")
    found = {}  # every entry once: the lines in line order, then the frontier and the reference
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            found.setdefault(label, handle)
    order = [_line_label(key) for key in _line_keys(drawn)]
    legend = {label: found[label] for label in order if label in found}
    legend |= {label: handle for label, handle in found.items() if label not in order}
    distinct = {r.name: r for r in references.values() if r is not None}
    if len(distinct) == 1 and "reference" in legend:  # say which row it is
        (reference,) = distinct.values()
        words = [describe(panels, tuple(reference[d] for d in panels)) if panels else str(reference["model"])]
        words += [_line_label(_line_key(reference)), _kb_text(float(reference[KB]))]
        legend[f"reference: {', '.join(w for w in words if w)}"] = legend.pop("reference")
    elif len(distinct) > 1 and "reference" in legend:  # one per model: say what they share
        kinds = sorted({_line_label(_line_key(r)) for r in distinct.values()})
        legend[f"reference: each panel's own ({', '.join(kinds)})"] = legend.pop("reference")
    width = fig.get_figwidth()
    fig.legend(
        legend.values(),
        legend.keys(),
        loc="outside lower center",
        ncols=max(1, min(len(legend), int(width // 2.2))),
        fontsize=8,
        title=SEEDS_NOTE,
        title_fontsize=8,
    )
    _title(fig, title, width=34 * len(panel_groups) + 20)
    return fig


def plot_forest(table: pd.DataFrame, title: str) -> Figure:
    """Δ test AUC and Δ test balanced accuracy against each row's reference row, with 95% intervals, a line per
    table row (top to bottom in table order); filled and bold where the Holm-adjusted bootstrap p of the row's
    contrast < 0.05, hollow otherwise (and for rows without a p, whose label says why); the references at 0,
    marked. The legend names the test."""
    dims = _table_dims(table) or ["model"]
    reference = table["reference"].fillna(False).astype(bool).to_numpy() if "reference" in table else None
    if reference is None:
        reference = np.zeros(len(table), dtype=bool)
    keys = _line_keys(table) if "codec" in table.columns else []
    colors = _line_colors(keys)
    labels = []
    for is_reference, (_, row) in zip(reference, table.iterrows(), strict=True):
        words = [describe(dims, tuple(row[d] for d in dims))]
        if KB in row.index and pd.notna(row[KB]):
            words.append(f"{_kb_text(float(row[KB]))}/image")
        label = ", ".join(w for w in words if w)
        if str(row.get("untested", "") or "") not in ("", "nan"):
            label += f" (no p: {row['untested']})"
        labels.append(f"reference: {label}" if is_reference else label)
    n = len(table)
    y = np.arange(n)
    fig, axes = plt.subplots(
        1, 2, figsize=(11, 1.8 + 0.28 * max(n, 1)), sharey=True, squeeze=False, layout="constrained"
    )
    axes = axes[0]
    for ax, (metric, name) in zip(axes, RATE_METRICS, strict=True):
        delta = table[f"delta_{metric}"].to_numpy(float)
        low = table[f"delta_{metric}_low"].to_numpy(float)
        high = table[f"delta_{metric}_high"].to_numpy(float)
        p = table[f"delta_{metric}_p_holm"].to_numpy(float)  # the bootstrap test valid for the row's contrast
        for i, (_, row) in enumerate(table.iterrows()):
            if reference[i]:
                ax.plot([0], [i], marker="*", ms=13, color="gold", mec="black", mew=0.8, ls="", zorder=4)
                continue
            if np.isnan(delta[i]):
                continue
            color = colors.get(_line_key(row), "C0") if keys else "C0"
            significant = bool(p[i] < SIGNIFICANT)  # NaN: not
            err = np.clip([[delta[i] - low[i]], [high[i] - delta[i]]], 0, None)
            ax.errorbar(
                [delta[i]],
                [i],
                xerr=np.nan_to_num(err),
                fmt=CODECS.get(row.get("codec"), ("", "o"))[1],
                color=color,
                mfc=color if significant else "white",
                mec=color,
                ms=6 if significant else 5,
                elinewidth=2.2 if significant else 1.0,
                capsize=3,
                zorder=3,
            )
        ax.axvline(0, color="0.3", lw=0.9, zorder=1)
        ax.set_xlabel(f"Δ {name} vs reference (95% CI)")
        ax.set_title(f"Δ {name}", fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].set_ylim(n - 0.5, -0.5)  # table order, top to bottom
    proxies = [
        plt.Line2D([], [], marker="o", color="0.3", mfc="0.3", lw=2.2, label="Holm-adjusted p < 0.05"),
        plt.Line2D(
            [], [], marker="o", color="0.3", mfc="white", lw=1.0, label="Holm-adjusted p ≥ 0.05, or no p"
        ),
        plt.Line2D([], [], marker="*", ms=11, color="gold", mec="black", ls="", label="reference (Δ = 0)"),
    ]
    fig.legend(
        handles=proxies,
        loc="outside lower center",
        ncols=3,
        fontsize=8,
        title=FOREST_TEST,
        title_fontsize=8,
    )
    _title(fig, title, width=110)
    return fig


TABLE_PLOTS: dict[str, Callable[[pd.DataFrame, str], Figure]] = {
    "rate_accuracy": plot_rate_accuracy,
    "forest": plot_forest,
}


def read_table_csv(path: str) -> pd.DataFrame:
    """An experiment's table CSV as the aggregation wrote it: grid dimensions as text (an lr stays '1e-05', an
    empty one ''), the resolution an int, the codec quality a float, `reference` a bool."""
    columns = pd.read_csv(path, nrows=0).columns
    text = [d for d in DIMS if d in columns and d != "res"]
    table = pd.read_csv(path, dtype=dict.fromkeys(text, str))
    table[text] = table[text].fillna("")
    if "res" in columns:
        table["res"] = table["res"].astype(int)
    if "codec_quality" in columns:
        table["codec_quality"] = pd.to_numeric(table["codec_quality"], errors="coerce").astype(float)
    if "codec" in columns:
        table["codec"] = table["codec"].astype(str)
    if "reference" in columns:
        table["reference"] = table["reference"].astype(str).str.strip().str.lower().isin(("true", "1", "1.0"))
    return table


def run_table_figure(*, kind: str, table_csv: str, title: str, out: str) -> None:
    """One figure of one experiment from its table CSV (TABLE_PLOTS: rate_accuracy, forest)."""
    table = read_table_csv(table_csv)
    fig = TABLE_PLOTS[kind](table, title)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    log.info("%s: %s figure of %d table rows", out, kind, len(table))
