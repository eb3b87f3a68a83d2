"""The study's tables as people read them: one per experiment, the runs index and the data summary.

One table per experiment: a row per setting of the grid dimensions that vary in it (the model always shown),
mean and sample standard deviation over its seeds, and `n`, the number of runs behind the mean (aggregate.py).
So the resolution sweep gives Table 1 (model x resolution), the learning-rate sweeps Tables 2 and 3, and so on,
without a table definition per experiment; beside the metrics, the val-selected row of each sweep, the bytes per
image of each row's data and its paired differences from its own reference row (compare.py).

Every table is written as CSV (numbers, for analysis), Markdown and LaTeX (formatted, mean ± std) and HTML (for
the report). The CSV's `runs` column lists, separated by ';', the run folders (relative to the workflow
directory) that each row aggregates: every number is traceable to its runs, and from them to their data.
"""

from __future__ import annotations

import logging
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dermcompress.data import integrity

from .aggregate import (
    BYTES,
    CALIBRATION,
    CPU_NOTE,
    DIMS,
    METRICS,
    SELECTED,
    TUNED,
    add_bytes,
    add_calibration,
    add_comparisons,
    load_runs,
    summarize,
    varying_dims,
)
from .calibration import BINNING

log = logging.getLogger(__name__)

# What the Markdown / LaTeX / HTML tables show (the study's Table 1 columns); the CSV has every metric and cost.
SHOWN = {
    "val_auc": "Val AUC",
    "val_balanced_accuracy": "Val bal. acc.",
    "accuracy": "Accuracy",
    "f1_macro": "F1 (macro)",
    "auc": "AUC",
    "balanced_accuracy": "Bal. acc.",
    "gmacs": "GMACs",
    "peak_train_mem_mb": "Peak GPU mem. (MB)",
}
REFERENCE = "reference"
# Paired differences against each row's reference row: what the Markdown / LaTeX / HTML tables show of them.
DELTAS = {"delta_auc": "Δ AUC [95% CI]", "delta_balanced_accuracy": "Δ bal. acc. [95% CI]"}
P_SHOWN = {
    "delta_auc_p_holm": "p Δ AUC, bootstrap (Holm, m)",
    "delta_balanced_accuracy_p_holm": "p Δ bal. acc., bootstrap (Holm, m)",
    "obuchowski_p_holm": "p Δ AUC, Obuchowski (Holm, m)",
}
# What the comparison columns are, for a reader of the table (README "Statistics" says more).
COMPARISON_NOTES = [
    "Δ: the row minus the row it is compared with (its reference: the experiment's `reference` values, within "
    "the row's own model unless the reference names one), on the same test images, per seed on the same "
    "lesion-group resamples, averaged over seeds; 95% interval = Δ ± quantile x standard error.",
    "Contrast 'same models': the reference's trained models on another test condition; the models are held "
    "fixed and the standard error is the paired lesion-group bootstrap's (normal, z). Contrast 'recipe': other "
    "trainings (resolution, training data, lr, mode, model, labels); the seed-to-seed variance of both rows is "
    "added and p comes from Student's t with Welch-Satterthwaite df; with 1 seed a row's seed variance cannot "
    "be estimated and is not covered.",
    "p Δ AUC, Obuchowski: the clustered ROC test (Obuchowski 1997; DeLong's when every lesion has one image), "
    "binary tasks only, with the same seed variance for a recipe contrast.",
    "Holm: adjusted within the row's family (the rows sharing its reference, or the whole table where the "
    "experiment declares `family: table`; m = the family's tested rows). "
    "A row validation did not select (it differs from the chosen row only in lr/schedule/epochs) is shown "
    "without a p.",
]
# A difference of contrasts, where the experiment declares `interaction` (compare._interactions).
INTERACTION_DELTAS = {
    "interaction_auc": "Interaction Δ AUC [95% CI]",
    "interaction_balanced_accuracy": "Interaction Δ bal. acc. [95% CI]",
}
INTERACTION_P_SHOWN = {
    "interaction_auc_p_holm": "p interaction Δ AUC, bootstrap (Holm, m)",
    "interaction_balanced_accuracy_p_holm": "p interaction Δ bal. acc., bootstrap (Holm, m)",
}
INTERACTION_NOTES = [
    "Interaction (a difference of contrasts): the row's Δ minus the Δ of the row in 'Interaction with' against "
    "that row's own reference, e.g. (B on a codec − B on clean) − (A on a codec − A on clean): what the test "
    "condition costs the row's model beyond what it costs the other; positive = less lost. Estimated per seed "
    "on the same lesion-group resamples and averaged over seeds. 'Interaction contrast' 'recipe' (the two "
    "sides are other trainings, e.g. two models): both sides' seed-to-seed variance is added to the paired "
    "lesion-group bootstrap's and p comes from Student's t with Welch-Satterthwaite df (z, and 'seed variance "
    "not covered', with 1 seed); 'same models': the bootstrap's alone (z). Holm: adjusted within the table's "
    "tested interactions, a family of their own (m). Empty where the row has no interaction: a reference row, "
    "or a row with the values it would be paired with."
]
SELECTED_MARK = "✓"
NOT_MEASURED = "n/a"
NOT_APPLICABLE = "—"
TABLE_CSS = [
    {"selector": "", "props": "border-collapse: collapse; font-family: sans-serif; font-size: 13px;"},
    {"selector": "th, td", "props": "border: 1px solid #ccc; padding: 3px 8px; text-align: right;"},
    {"selector": "caption", "props": "font-weight: bold; padding: 6px; text-align: left;"},
]


# ------------------------------------------------------------------------------------------------- tables


def _delta(value: float, low: float, high: float, reference: bool) -> str:
    if reference:
        return REFERENCE
    if np.isnan(value):
        return NOT_MEASURED
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def _p(value: float) -> str:
    return "" if np.isnan(value) else "<0.001" if value < 0.001 else f"{value:.3f}"


def _p_in_family(value: float, size: int, untested: str) -> str:
    """An adjusted p with its family size, or why the row carries none."""
    if untested:
        return f"— ({untested})"
    return "" if np.isnan(value) else f"{_p(value)} (m={size})"


def _contrast(kind: str, seeds: str, covered: bool) -> str:
    """The kind of contrast and the seeds behind it, as the table shows it."""
    if not kind:
        return ""
    if not covered:
        return f"{kind}, {seeds} seeds: seed variance not covered"
    return f"{kind}, {seeds} seeds"


def _mean_std(mean: float, std: float, n: int) -> str:
    if np.isnan(mean):
        return NOT_MEASURED
    return f"{mean:.3f}" if n < 2 or np.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _cost(column: str, value: float) -> str:
    if np.isnan(value):
        return NOT_MEASURED
    return (
        f"{value:.0f}"
        if column.endswith("_mb")
        else f"{value:.2f}"
        if column == "params_m"
        else f"{value:.3g}"
    )


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as people read it: headers in words, mean ± std, label fractions in %, no `runs` column."""
    dims = [d for d in DIMS if d in table.columns]
    out = pd.DataFrame({DIMS[d]: table[d].astype(str) for d in dims})
    if "label_fraction" in dims:
        out[DIMS["label_fraction"]] = [f"{float(f) * 100:g}%" for f in table["label_fraction"]]
    for dim in ("lr", "schedule", "epochs"):  # a probe takes none from the grid
        if dim in dims:
            out[DIMS[dim]] = [NOT_APPLICABLE if v in ("", "0") else v for v in out[DIMS[dim]]]
    out["n"] = table["n_runs"]
    if table[SELECTED].any():
        out["Val-selected"] = [SELECTED_MARK if chosen else "" for chosen in table[SELECTED]]
    for column, header in SHOWN.items():
        if column in METRICS:
            means, stds = table[f"{column}_mean"], table[f"{column}_std"]
            out[header] = [_mean_std(*v) for v in zip(means, stds, table["n_runs"], strict=True)]
        else:
            out[header] = [_cost(column, v) for v in table[column]]
    for column in ("ece", "brier"):
        if f"{column}_mean" in table.columns:
            parts = (table[f"{column}_mean"], table[f"{column}_std"], table["n_runs"])
            out[CALIBRATION[column]] = [_mean_std(*v) for v in zip(*parts, strict=True)]
    if "kb_per_image" in table.columns:
        out[BYTES["kb_per_image"]] = [
            f"{v:.3g}" if pd.notna(v) else NOT_MEASURED for v in table["kb_per_image"]
        ]
        out[BYTES["bpp"]] = [f"{v:.3g}" if pd.notna(v) else NOT_MEASURED for v in table["bpp"]]
    if REFERENCE in table.columns:
        out["Compared with"] = [
            REFERENCE if is_reference else other
            for is_reference, other in zip(table[REFERENCE], table["compared_with"].fillna(""), strict=True)
        ]
        parts = (table["contrast"].fillna(""), table["seeds"].fillna(""), table["seed_variance"])
        out["Contrast"] = [_contrast(*v) for v in zip(*parts, strict=True)]
        untested = table["untested"].fillna("")
        for column, header in DELTAS.items():
            parts = (table[column], table[f"{column}_low"], table[f"{column}_high"], table[REFERENCE])
            out[header] = [_delta(*v) for v in zip(*parts, strict=True)]
        for column, header in P_SHOWN.items():
            parts = (table[column], table["family_size"], untested)
            out[header] = [_p_in_family(*v) for v in zip(*parts, strict=True)]
        if "interaction_auc" in table.columns:
            out = out.join(_interaction_columns(table, untested))
    return out


def _interaction_columns(table: pd.DataFrame, untested: pd.Series) -> pd.DataFrame:
    """The interaction's columns as people read them; empty (not 0) where a row has none."""
    has = table["interaction_with"].fillna("").astype(str) != ""
    out = pd.DataFrame(index=table.index)
    out["Interaction with"] = table["interaction_with"].fillna("").astype(str)
    parts = (
        table["interaction_contrast"].fillna(""),
        table["interaction_seeds"].fillna("").astype(str),
        table["interaction_seed_variance"],
    )
    out["Interaction contrast"] = [_contrast(*v) for v in zip(*parts, strict=True)]
    for column, header in INTERACTION_DELTAS.items():
        parts = (table[column], table[f"{column}_low"], table[f"{column}_high"], has)
        out[header] = [
            _delta(value, low, high, False) if h else "" for value, low, high, h in zip(*parts, strict=True)
        ]
    for column, header in INTERACTION_P_SHOWN.items():
        parts = (table[column], table["interaction_family_size"], untested.where(has, ""), has)
        out[header] = [_p_in_family(p, m, why) if h else "" for p, m, why, h in zip(*parts, strict=True)]
    return out


def table_notes(table: pd.DataFrame) -> list[str]:
    notes = [
        "Mean ± sample std over n runs (seeds). Val: the validation split, which chooses; the other metrics are "
        "the test split's, which only reports. GMACs per image; peak GPU memory in training. The CSV has every "
        "metric and cost, and the run folders of every row."
    ]
    if table[SELECTED].any():
        notes.append(
            f"{SELECTED_MARK}: among rows that differ only in {'/'.join(TUNED)}, the one with the best mean "
            "validation AUC (ties: validation balanced accuracy), chosen without the test split."
        )
    if table["peak_train_mem_mb"].isna().all():
        notes.append(CPU_NOTE)
    if "ece_mean" in table.columns:
        notes.append(
            f"Calibration of the test probabilities: ECE, the expected calibration error ({BINNING}; Guo et al. "
            "2017), and the Brier score (of the positive class for two classes, summed over classes for more); "
            "the CSV has the validation split's too (val_ece, val_brier), and the test ECE after temperature "
            "scaling fitted on the validation split (ece_ts, with its temperature)."
        )
    if "kb_per_image" in table.columns:
        notes.append(
            "kB/image and bpp: the mean encoded size of the test images evaluated on (the codec's bytes, else a "
            "lossless PNG's), from the caches' _info.json; results/data/bytes.csv lists every cache."
        )
    if REFERENCE in table.columns:
        notes += COMPARISON_NOTES
    if "interaction_auc" in table.columns:
        notes += INTERACTION_NOTES
    return notes


def write_table(
    table: pd.DataFrame, *, title: str, csv: str, md: str, tex: str, html: str, label: str
) -> None:
    """The table as CSV (numbers), Markdown, LaTeX and HTML (formatted)."""
    table.to_csv(csv, index=False)
    shown = display_table(table)
    notes = table_notes(table)
    Path(md).write_text(f"**{title}**\n\n{shown.to_markdown(index=False)}\n\n" + "\n".join(notes) + "\n")
    Path(tex).write_text(
        shown.to_latex(index=False, caption=f"{title}. {' '.join(notes)}", label=f"tab:{label}", escape=True)
    )
    Path(html).write_text(html_page(shown, title, notes))


def html_page(shown: pd.DataFrame, title: str, notes: list[str]) -> str:
    """A formatted table (its title as caption) and the notes under it, as a self-contained HTML page."""
    styled = shown.style.hide(axis="index").set_caption(title).set_table_styles(TABLE_CSS)
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{escape(title)}</title></head><body>\n"
        + styled.to_html()
        + "".join(f"<p>{escape(note)}</p>\n" for note in notes)
        + "</body></html>\n"
    )


def run_table(
    *,
    metrics: list[str],
    title: str,
    label: str,
    csv: str,
    md: str,
    tex: str,
    html: str,
    caches: list[str] | None = None,
    classes: list[str] | None = None,
    reference: dict | None = None,
    family: str = "reference",
    interaction: dict | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """The table of one experiment from its runs' metrics.json files; with `caches` (those its evaluations
    score), each row's bytes per image; with `classes` and `reference` (the grid values of the rows compared
    with), each row compared with its own reference row (from the runs' predictions.parquet), Holm-adjusted
    per `family`, and with an `interaction` (grid values) each row's contrast minus its counterpart's
    (aggregate.add_comparisons)."""
    runs = load_runs([str(Path(m).parent) for m in metrics])
    if caches is not None:
        runs = add_bytes(runs, caches)
    if classes is not None:
        runs = add_calibration(runs, classes)
    table = summarize(runs)
    if classes is not None:
        if not reference:
            raise ValueError(f"{csv}: no reference grid values to compare the rows with")
        table = add_comparisons(
            table,
            classes,
            reference=reference,
            family=family,
            interaction=interaction,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
    write_table(table, title=title, csv=csv, md=md, tex=tex, html=html, label=label)
    log.info("%s: %d rows from %d runs, by %s", csv, len(table), len(runs), varying_dims(runs))
    return table


def run_runs_index(*, metrics: list[str], csv: str, html: str) -> pd.DataFrame:
    """Every run of the selected experiments, one row each: its grid point, metrics, costs and folder."""
    runs = load_runs([str(Path(m).parent) for m in metrics])
    runs.to_csv(csv, index=False)
    shown = runs.drop(columns="run").assign(run=runs["run"].str.removeprefix("results/runs/"))
    styled = shown.style.hide(axis="index").format(precision=3, na_rep=NOT_MEASURED)
    Path(html).write_text(
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Runs</title></head><body>\n"
        + styled.set_caption(f"All {len(runs)} runs").set_table_styles(TABLE_CSS).to_html()
        + "</body></html>\n"
    )
    return runs


# ------------------------------------------------------------------------------------------------- data


def data_summary(manifest: pd.DataFrame, split_report: dict) -> dict[str, pd.DataFrame]:
    """The data set at a glance: images listed / ok / quarantined, quarantine reasons, classes, split sizes."""
    ok = manifest["status"] == "ok"
    images = pd.DataFrame(
        {
            "Images": ["listed", "ok", "quarantined"],
            "Count": [len(manifest), int(ok.sum()), int((~ok).sum())],
        }
    )
    reasons = (
        manifest.loc[~ok, "reason"].value_counts().rename_axis("Quarantine reason").reset_index(name="Count")
    )
    classes = (
        manifest.loc[ok, "label"].value_counts().rename_axis("Class (ok images)").reset_index(name="Count")
    )
    counts = pd.DataFrame(split_report["counts"]).T
    splits = counts.assign(
        images=pd.Series(split_report["images_per_split"]), groups=pd.Series(split_report["groups_per_split"])
    ).rename_axis("Split (task)")
    return {
        "Images": images,
        "Quarantined images by reason": reasons,
        "Classes of the ok images": classes,
        f"Split sizes (images per class, images, {split_report['group_column']} groups)": splits.reset_index(),
    }


def synthetic_banner(frame: pd.DataFrame, manifest: str) -> str:
    """The data summary's first line when the manifest's images are synthetic (generated by the workflow, or a
    `dermcompress synth` set data.isic_root names: ingest read its marker), else ''."""
    if not bool(frame.get("synthetic", pd.Series([False])).any()):
        return ""
    about = {k.decode(): v.decode() for k, v in (pq.read_schema(manifest).metadata or {}).items()}
    # datasets.SOURCE_NAMES, not imported: the tables' code fingerprint stays clear of the data readers'.
    source = {"isic2019": "ISIC 2019", "isic2020": "ISIC 2020", "ham10000": "HAM10000"}.get(
        about.get("source", ""), "the real images"
    )
    marker = about.get("synthetic_marker")
    where = f" (its marker file: {marker})" if marker else ""
    return f"SYNTHETIC data: a stand-in generated by dermcompress synth{where}, not {source}."


def run_data_summary(*, manifest: str, split_report: str, md: str, html: str) -> None:
    frame = integrity.read_frame(manifest)
    report = integrity.read_json(split_report)
    parts = data_summary(frame, report)
    banner = synthetic_banner(frame, manifest)
    md_parts = [f"**{name}**\n\n{part.to_markdown(index=False)}" for name, part in parts.items()]
    Path(md).write_text("\n\n".join(filter(None, [banner, *md_parts])) + "\n")
    html_parts = [
        part.style.hide(axis="index").set_caption(name).set_table_styles(TABLE_CSS).to_html()
        for name, part in parts.items()
    ]
    Path(html).write_text(
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Data</title></head><body>\n"
        + (f"<p><b>{banner}</b></p>\n" if banner else "")
        + "<br>\n".join(html_parts)
        + "</body></html>\n"
    )
