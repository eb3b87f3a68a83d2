"""Subgroup analysis of an experiment: is a row's score, and its loss against its reference row, the same for
every sex, age band and anatomical site (and Fitzpatrick skin type, where the data give it)? From the predictions the evaluations wrote (the table's runs) joined
to the manifest's metadata; nothing is retrained.

Subgroups (assign_subgroups): `sex`, `age_band` (age_approx binned at `subgroups.age_bands`: [40, 60] gives
<40, 40-59, 60+) and `site` (anatom_site_general). Missing metadata, including HAM10000's word for it,
'unknown', is the subgroup "unknown": shown, never tested.

Per table row and subgroup (subgroup_analysis): the subgroup's test images and lesion groups, the row's AUC and
balanced accuracy on them (mean over its seeds) with a 95% percentile interval over the table's lesion-group
resamples (compare.Scored: the same resamples, restricted to the subgroup's images; test-set sampling only,
models held fixed). Per row the table compares and tests (not a reference, selected by validation):

- Δ on the subgroup: the row minus its reference row on the subgroup's images, with the test its contrast
  calls for (contrasts.difference: same models z, recipe Welch t); p unadjusted.
- the interaction: Δ on the subgroup minus Δ on the rest of the test images (every image outside it, 'unknown'
  included), with the same machinery (contrasts.interaction, as compare.interaction_comparison); p
  Holm-adjusted within the row and subgroup column.

A subgroup below `min_images` images or without an image of every class (or whose rest is) is shown with
what can be computed, but no p, and `untested` says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache, partial
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd

from dermcompress.data import integrity
from dermcompress.learn.bootstrap import percentile_ci

from .aggregate import DIMS, row_label, row_predictions
from .compare import METRICS, Scored
from .contrasts import Contrast, RowScores, difference, holm, interaction
from .tables import NOT_MEASURED, _p, html_page

log = logging.getLogger(__name__)

# Subgroup column -> (the manifest column it comes from, its name in words).
COLUMNS = {"sex": ("sex", "Sex"), "age_band": ("age_approx", "Age"), "site": ("anatom_site_general", "Site")}
# Shown only where the manifest knows it for some image (the ISIC Archive's Fitzpatrick skin type): a column
# that most sources lack would otherwise be an all-'unknown' panel in every experiment.
OPTIONAL_COLUMNS = {"skin_type": ("fitzpatrick_skin_type", "Skin type")}
UNKNOWN = "unknown"
# Metadata spelt as missing: blank, or the word HAM10000 uses.
MISSING = {"", UNKNOWN}
# Each metric in words: as a column header, and after a Δ.
METRIC_NAMES = {"auc": ("AUC", "AUC"), "balanced_accuracy": ("Bal. acc.", "bal. acc.")}
INTERACTION = "interaction: "
# Statistics of a contrast, after its prefix (delta_auc, delta_auc_se, ...).
STATS = ("", "_se", "_low", "_high", "_p")
CSV_COLUMNS = (
    "row",
    "row_label",
    "reference",
    "compared",
    "compared_with_row",
    "compared_with",
    "column",
    "subgroup",
    "n_images",
    "n_lesions",
    *(f"{m}{s}" for m in METRICS for s in ("", "_low", "_high")),
    *(f"delta_{m}{s}" for m in METRICS for s in STATS),
    "test",
    *(f"interaction_{m}{s}" for m in METRICS for s in (*STATS, "_p_holm")),
    "interaction_test",
    "family_size",
    "untested",
)


# ---------------------------------------------------------------------------------------------- subgroups


def age_band_labels(edges: list[int]) -> list[str]:
    """The names of the age bands that strictly increasing whole-year `edges` cut: [40, 60] -> <40, 40-59,
    60+ (a band holds its lower edge)."""
    edges = [int(e) for e in edges]
    if not edges or any(b <= a for a, b in pairwise(edges)):
        raise ValueError(f"subgroups.age_bands must be strictly increasing ages, not {edges}")
    inner = [f"{a}-{b - 1}" for a, b in pairwise(edges)]
    return [f"<{edges[0]}", *inner, f"{edges[-1]}+"]


def bin_ages(ages: pd.Series, edges: list[int]) -> pd.Series:
    """Each age's band (age_band_labels); a missing age is 'unknown'."""
    bands = pd.cut(
        pd.to_numeric(ages, errors="coerce"),
        [-np.inf, *edges, np.inf],
        right=False,
        labels=age_band_labels(edges),
    )
    return bands.astype(object).where(bands.notna(), UNKNOWN)


def known_or_unknown(values: pd.Series) -> pd.Series:
    """Text values stripped and in lower case; missing ones (None, NaN, blank, 'unknown') 'unknown'."""
    text = values.astype("string").str.strip().str.lower().fillna("")
    return text.where(~text.isin(MISSING), UNKNOWN).astype(object)


def assign_subgroups(manifest: pd.DataFrame, age_edges: list[int]) -> pd.DataFrame:
    """Per image of the manifest (index image_id): its `sex`, `age_band` and `site` subgroup, and its
    `skin_type` (Fitzpatrick, I-VI) where the manifest gives some image one. A metadata column the manifest
    lacks makes every image 'unknown' in it."""
    frame = manifest.set_index(manifest["image_id"].astype(str))
    if not frame.index.is_unique:
        raise ValueError(
            f"the manifest lists images twice, e.g. {frame.index[frame.index.duplicated()][:5].tolist()}"
        )
    out = pd.DataFrame(index=frame.index)
    for column, (source, _) in COLUMNS.items():
        values = (
            frame[source] if source in frame.columns else pd.Series(None, index=frame.index, dtype=object)
        )
        out[column] = bin_ages(values, age_edges) if column == "age_band" else known_or_unknown(values)
    for column, (source, _) in OPTIONAL_COLUMNS.items():
        if source in frame.columns and (values := known_or_unknown(frame[source])).ne(UNKNOWN).any():
            out[column] = values.where(values == UNKNOWN, values.str.upper())  # Fitzpatrick's numerals
    return out


def subgroup_order(values: pd.Series, column: str, age_edges: list[int]) -> list[str]:
    """The subgroups present in `values`: age bands youngest first, others alphabetical; 'unknown' last."""
    present = set(values)
    known = age_band_labels(age_edges) if column == "age_band" else sorted(present - {UNKNOWN})
    return [g for g in known if g in present] + ([UNKNOWN] if UNKNOWN in present else [])


def why_untested(name: str, mask: np.ndarray, y_true: np.ndarray, classes: list[str], min_images: int) -> str:
    """Why the subgroup `name` (boolean `mask` over the test images) is not tested, '' if it is: 'unknown',
    below `min_images` images, or without an image of some class; then the same of the rest of the images."""
    if name == UNKNOWN:
        return "unknown: never tested"
    for part, where in ((mask, ""), (~mask, "rest ")):
        if part.sum() < min_images:
            return f"{where}below {min_images} images"
        if missing := [c for i, c in enumerate(classes) if not (y_true[part] == i).any()]:
            return f"{where}no {missing[0]} image"
    return ""


# ---------------------------------------------------------------------------------------------- analysis


def subgroup_analysis(
    table: pd.DataFrame,
    rows: list[list[pd.DataFrame]],
    recipes: list[str],
    subgroups: pd.DataFrame,
    classes: list[str],
    *,
    min_images: int,
    age_edges: list[int],
    n_bootstrap: int,
    seed: int,
) -> pd.DataFrame:
    """One line per table row x subgroup column x subgroup (module docstring).

    `table` is an experiment's table (its `reference`, `compared_with_row`, `compared_with` and `untested`
    columns; the grid dimensions name the rows), `rows[k]` and `recipes[k]` its row k's test predictions and
    recipe (aggregate.row_predictions), `subgroups` the subgroup of each image (assign_subgroups; one column per
    subgroup column)."""
    scored = Scored(rows, recipes, classes, n_bootstrap=n_bootstrap, seed=seed)
    image_ids = scored.frames[0][0]["image_id"].astype(str)
    if absent := sorted(set(image_ids) - set(subgroups.index)):
        raise ValueError(f"{len(absent)} test images are not in the manifest, e.g. {absent[:5]}")
    assigned = subgroups.loc[image_ids].reset_index(drop=True)
    lines = []
    for column in subgroups.columns:
        for name in subgroup_order(assigned[column], column, age_edges):
            mask = (assigned[column] == name).to_numpy()
            head = {
                "column": column,
                "subgroup": name,
                "n_images": int(mask.sum()),
                "n_lesions": len(np.unique(scored.groups[mask])),
            }
            reason = why_untested(name, mask, scored.y_true, classes, min_images)
            on = cache(partial(_scores_on, scored, mask))  # a reference row serves all its rows
            lines += [_line(table, k, head, reason, on) for k in range(len(table))]
        log.info("%s: %d table rows scored on each subgroup", column, len(table))  # the long part
    out = pd.DataFrame(lines).reindex(columns=list(CSV_COLUMNS))
    out[["test", "interaction_test"]] = out[["test", "interaction_test"]].fillna("")
    out["family_size"] = 0
    for family in out[out["interaction_auc_p"].notna()].groupby(["row", "column"]).groups.values():
        for metric in METRICS:
            p = out.loc[family, f"interaction_{metric}_p"].to_numpy(float)
            out.loc[family, f"interaction_{metric}_p_holm"] = holm(p)
        out.loc[family, "family_size"] = len(family)
    return out


def _scores_on(scored: Scored, mask: np.ndarray, k: int, rest: bool = False) -> dict[str, RowScores]:
    """Row k's RowScores per metric on the images of `mask`, or on the rest of them."""
    return scored.row(k, ~mask if rest else mask)


def _line(table: pd.DataFrame, k: int, head: dict, reason: str, on: Callable) -> dict:
    """Row k's line on one subgroup (`head`): its metrics; if the table compares and tests it, its Δ, and on a
    tested subgroup (`reason` '') the interaction. `on(row, rest=False)`: a row's scores there (_scores_on)."""
    row = table.iloc[k]
    ref = int(row["compared_with_row"])
    compared = not row["reference"] and ref >= 0 and row["untested"] == ""
    why = "reference row" if row["reference"] else row["untested"]
    line = {
        "row": k,
        "row_label": row_label(table, k),
        "reference": bool(row["reference"]),
        "compared": compared,
        "compared_with_row": ref,
        "compared_with": row["compared_with"] if compared else "",
        **head,
        "untested": why or reason,
    }
    for metric, values in on(k).items():
        low, high = percentile_ci(values.resampled.mean(axis=0)) or (np.nan, np.nan)
        line |= {metric: float(values.point.mean()), f"{metric}_low": low, f"{metric}_high": high}
    if not compared:
        return line
    for metric in METRICS:
        delta = difference(on(k)[metric], on(ref)[metric])
        line |= _stats(f"delta_{metric}", delta, tested=not reason)
        line["test"] = delta.test
        if not reason:
            parts = (on(k), on(ref), on(k, rest=True), on(ref, rest=True))
            both = interaction(*(part[metric] for part in parts))
            line |= _stats(f"interaction_{metric}", both, tested=True)
            line["interaction_test"] = INTERACTION + both.test
    return line


def _stats(prefix: str, result: Contrast, *, tested: bool) -> dict:
    """A contrast's CSV columns (STATS); no p where it is not tested."""
    values = (result.delta, result.se, result.low, result.high, result.p if tested else np.nan)
    return {f"{prefix}{s}": float(v) for s, v in zip(STATS, values, strict=True)}


# ---------------------------------------------------------------------------------------------- writing


def subgroup_notes(age_edges: list[int], min_images: int) -> list[str]:
    """What the columns of the subgroup table are, for its reader."""
    bands = ", ".join(age_band_labels(age_edges))
    return [
        "One line per table row and subgroup of the test images: sex; age band (age_approx in years: "
        f"{bands}; a band holds its lower edge); anatomical site (anatom_site_general). Missing metadata, or "
        "'unknown', is the subgroup 'unknown', shown but never tested. n: test images (lesion groups).",
        "AUC and bal. acc.: the mean over the row's seeds on the subgroup's images; 95% interval: the 2.5-97.5 "
        "percentiles of that mean over the table's lesion-group resamples restricted to the subgroup (test-set "
        "sampling, models held fixed).",
        "Δ: the row minus its reference row (Compared with) on the subgroup's images, tested as the table tests "
        "the row (Test: paired group bootstrap with models fixed, z; or + both rows' seed variance, Welch t); "
        "95% interval Δ ± quantile x SE; p unadjusted.",
        "Interaction: Δ on the subgroup minus Δ on the rest of the test images (every image outside it, 'unknown' "
        "included), by the same test on the difference of differences; its p is Holm-adjusted within each row "
        "and subgroup column (m: that column's tested subgroups).",
        f"Tested: rows the table compares and tests, on subgroups of at least {min_images} test images with an "
        "image of every class, whose rest has them too. The others show what can be computed, no p, and why "
        "(Not tested).",
    ]


def _interval(value: float, low: float, high: float, signed: bool = False) -> str:
    if np.isnan(value):
        return NOT_MEASURED
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(value)} [{f.format(low)}, {f.format(high)}]" if np.isfinite(low) else f.format(value)


def display_subgroups(frame: pd.DataFrame) -> pd.DataFrame:
    """The subgroup table as people read it: intervals beside values, Holm's p with its m."""
    names = {column: words for column, (_, words) in {**COLUMNS, **OPTIONAL_COLUMNS}.items()}
    rows = zip(frame["reference"], frame["row_label"], strict=True)
    groups = zip(frame["column"], frame["subgroup"], strict=True)
    out = pd.DataFrame(
        {
            "Row": [("reference: " if reference else "") + label for reference, label in rows],
            "Compared with": frame["compared_with"].fillna(""),
            "Subgroup": [f"{names.get(column, column)}: {name}" for column, name in groups],
            "n (lesions)": [f"{n} ({m})" for n, m in zip(frame["n_images"], frame["n_lesions"], strict=True)],
        }
    )
    for metric, (header, _) in METRIC_NAMES.items():
        parts = (frame[metric], frame[f"{metric}_low"], frame[f"{metric}_high"])
        out[f"{header} [95% CI]"] = [_interval(*v) for v in zip(*parts, strict=True)]
    compared = frame["compared"].astype(bool).to_numpy()
    for metric, (_, words) in METRIC_NAMES.items():
        prefix = f"delta_{metric}"
        parts = (frame[prefix], frame[f"{prefix}_low"], frame[f"{prefix}_high"])
        shown = [_interval(*v, signed=True) for v in zip(*parts, strict=True)]
        out[f"Δ {words} [95% CI]"] = np.where(compared, shown, "")
        out[f"p Δ {words}"] = [_p(p) for p in frame[f"{prefix}_p"]]
    for metric, (_, words) in METRIC_NAMES.items():
        prefix = f"interaction_{metric}"
        parts = (frame[prefix], frame[f"{prefix}_low"], frame[f"{prefix}_high"])
        out[f"Interaction Δ {words} [95% CI]"] = [
            "" if np.isnan(v[0]) else _interval(*v, signed=True) for v in zip(*parts, strict=True)
        ]
        parts = (frame[f"{prefix}_p_holm"], frame["family_size"])
        out[f"p interaction {words} (Holm, m)"] = [
            "" if np.isnan(p) else f"{_p(p)} (m={m})" for p, m in zip(*parts, strict=True)
        ]
    out["Test"] = frame["test"].fillna("")
    out["Not tested"] = frame["untested"].fillna("")
    return out


def write_subgroups(
    frame: pd.DataFrame, notes: list[str], *, title: str, csv: str, md: str, html: str
) -> None:
    """The subgroup table as CSV (numbers), Markdown and HTML (formatted, with `notes`)."""
    frame.to_csv(csv, index=False)
    shown = display_subgroups(frame)
    Path(md).write_text(f"**{title}**\n\n{shown.to_markdown(index=False)}\n\n" + "\n\n".join(notes) + "\n")
    Path(html).write_text(html_page(shown, title, notes))


def read_table(table_csv: str) -> pd.DataFrame:
    """An experiment's table CSV with what the subgroup analysis reads of it: grid dimensions as text (as the
    runs' paths spell them), `reference` a bool, `untested` '' where a row is tested."""
    columns = pd.read_csv(table_csv, nrows=0).columns
    text = [d for d in DIMS if d in columns]
    table = pd.read_csv(table_csv, dtype=dict.fromkeys([*text, "compared_with", "untested"], str))
    table[[*text, "compared_with", "untested"]] = table[[*text, "compared_with", "untested"]].fillna("")
    table["reference"] = table["reference"].astype(str).str.strip().str.lower().isin(("true", "1"))
    table["compared_with_row"] = table["compared_with_row"].astype(int)
    return table


def run_subgroups(
    *,
    table_csv: str,
    manifest: str,
    classes: list[str],
    min_images: int,
    age_bands: list[int],
    n_bootstrap: int,
    seed: int = 0,
    title: str = "",
    csv: str,
    md: str,
    html: str,
) -> pd.DataFrame:
    """The subgroup table of one experiment from its table CSV, its runs' predictions (the table's `runs`) and
    the manifest. `seed` is the table's (0), so the resamples are the table's too."""
    table = read_table(table_csv)
    rows, recipes = row_predictions(table)
    subgroups = assign_subgroups(integrity.read_frame(manifest), age_bands)
    frame = subgroup_analysis(
        table,
        rows,
        recipes,
        subgroups,
        classes,
        min_images=min_images,
        age_edges=age_bands,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    notes = subgroup_notes(age_bands, min_images)
    write_subgroups(
        frame, notes, title=f"{title}: by subgroup" if title else "By subgroup", csv=csv, md=md, html=html
    )
    tested = frame["interaction_auc_p"].notna()
    log.info(
        "%s: %d table rows x %d subgroups, %d interactions tested",
        csv,
        len(table),
        frame.groupby(["column", "subgroup"]).ngroups,
        int(tested.sum()),
    )
    return frame
