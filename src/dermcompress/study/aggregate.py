"""The study's aggregation of runs, from their own outputs only (metrics.json; the grid point is read from the
run's path): an experiment's evaluations summarised per setting over seeds, which tables.py formats and writes.

A row per setting of the grid dimensions that vary (the model always), mean and sample standard deviation over
its seeds, `n_runs`, the number of runs behind the mean, and `runs`, the run folders the row aggregates.

Validation chooses, test reports. Every run is scored on both splits (metrics.json: `val_*` and plain keys).
Where an experiment sweeps a hyperparameter (lr, schedule or epochs vary), the rows that differ only in it form
a family, and the row with the best mean validation AUC over seeds (ties: validation balanced accuracy) is
marked `selected_by_val`: the setting a study would report, chosen without looking at the test split.

What the images cost: each row carries the mean kB per test image and bits per pixel of the data it was
evaluated on (bytes_summary.py), beside its metrics. And whether a loss is real: every row is compared with its
own reference row (reference_rows: the experiment's `reference:` values within the row's model, unless they
name a model) on the shared test images, Δ AUC and Δ balanced accuracy with a test valid for the contrast (the
same trained models on another test condition, or another recipe whose seed variance counts), Holm-adjusted
within the rows sharing a reference, and Obuchowski's clustered ROC test as the analytic second opinion
(compare.py). Rows validation did not select carry no p.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dermcompress.data import integrity
from dermcompress.learn.runs import parse_eval_dir

from .bytes_summary import bytes_table, split_bytes
from .calibration import calibration_metrics
from .experiments import reference_model, spelt

log = logging.getLogger(__name__)

RUNS_COLUMN = "runs"
RUNS_SEPARATOR = ";"
# Grid dimensions, in column order, with their headers.
DIMS = {
    "model": "Model",
    "res": "Resolution (px)",
    "train_variant": "Trained on",
    "eval_variant": "Evaluated on",
    "mode": "Mode",
    "lr": "LR",
    "schedule": "Schedule",
    "epochs": "Epochs",
    "label_fraction": "Labels",
}
METRICS = {
    "accuracy": "Accuracy",
    "f1_macro": "F1 (macro)",
    "auc": "AUC",
    "balanced_accuracy": "Balanced acc.",
    "val_accuracy": "Val accuracy",
    "val_auc": "Val AUC",
    "val_balanced_accuracy": "Val balanced acc.",
}
# Calibration of each run's probabilities (calibration.py), from its predictions: test, then validation.
CALIBRATION = {
    "ece": "ECE",
    "brier": "Brier",
    "val_ece": "Val ECE",
    "val_brier": "Val Brier",
    "temperature": "Temperature (fitted on val)",
    "ece_ts": "ECE after temperature scaling",
}
# Hyperparameters a sweep tunes on the validation split; the other dimensions are what a table compares.
TUNED = ("lr", "schedule", "epochs")
# The validation score that selects among a sweep's rows, then the tie-break.
SELECT_BY = ("val_auc_mean", "val_balanced_accuracy_mean")
SELECTED = "selected_by_val"
COSTS = {
    "gmacs": "GMACs",
    "peak_train_mem_mb": "Peak train mem. (MB)",
    "peak_eval_mem_mb": "Peak eval mem. (MB)",
    "params_m": "Params (M)",
}
# Bytes per image of the data a row is evaluated on (its test split), from the bytes summary.
BYTES = {"kb_per_image": "kB/image", "bpp": "bpp"}
CODEC_COLUMNS = ("codec", "codec_quality")
# Under the tables and in the cost figure, where the runs measured no GPU memory (NaN).
CPU_NOTE = "Peak GPU memory is not measured on a CPU (n/a)."


# ------------------------------------------------------------------------------------------------- reading


def load_runs(eval_dirs: list[str]) -> pd.DataFrame:
    """One row per evaluation: its grid point (from its path), its metrics and costs, `run` (the evaluation's
    folder, what a table row lists) and `train_run` (the folder of the run it evaluates)."""
    rows = []
    for eval_dir in eval_dirs:
        metrics = integrity.read_json(Path(eval_dir) / "metrics.json")
        evaluation = parse_eval_dir(eval_dir)
        train_run = str(Path(eval_dir).parent.parent)
        values = {k: metrics.get(k) for k in (*METRICS, *COSTS)}
        rows.append({**evaluation.point(), **values, "run": str(eval_dir), "train_run": train_run})
    frame = pd.DataFrame(rows)
    for column in (*METRICS, *COSTS):
        frame[column] = pd.to_numeric(frame[column]).astype(float)  # null (AUC of one class, CPU memory): NaN
    return frame


def add_bytes(runs: pd.DataFrame, caches: list[str | Path]) -> pd.DataFrame:
    """Each evaluation's kB per image, bits per pixel, codec and quality: of its eval variant's test split at
    its resolution, from the caches' _info.json (bytes_summary.split_bytes); an error naming the (res, variant)
    none of `caches` holds."""
    sent = split_bytes(bytes_table(caches))
    keys = list(zip(runs["res"].astype(int), runs["eval_variant"].astype(str), strict=True))
    if missing := sorted(set(keys) - set(sent.index)):
        raise ValueError(f"no test-split bytes for (res, variant) {missing[:5]} in the caches {caches}")
    found = sent.loc[keys]
    return runs.assign(
        kb_per_image=found["mean_kb"].to_numpy(),
        bpp=found["bpp"].to_numpy(),
        codec=found["codec"].to_numpy(),
        codec_quality=pd.to_numeric(found["quality"]).to_numpy(dtype=float),
    )


def add_calibration(runs: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Each evaluation's ECE and Brier score on its test and validation rows (CALIBRATION), from its
    predictions.parquet."""
    found = [
        calibration_metrics(integrity.read_frame(Path(run) / "predictions.parquet"), classes)
        for run in runs["run"]
    ]
    return runs.assign(**{column: [f[column] for f in found] for column in CALIBRATION})


def varying_dims(runs: pd.DataFrame) -> list[str]:
    """The model, and every other grid dimension with more than one value among the runs."""
    return ["model", *(d for d in DIMS if d != "model" and runs[d].nunique() > 1)]


# ---------------------------------------------------------------------------------------------- summaries


def summarize(runs: pd.DataFrame, dims: list[str] | None = None) -> pd.DataFrame:
    """Mean and std over seeds per setting of `dims` (default: the varying ones), in the runs' (grid) order.

    Columns: the dims, n_runs, <metric>_mean and <metric>_std per metric (test, and val_<metric>; calibration
    too where the runs carry it), the mean of each cost, `selected_by_val` (select_by_val) and `runs`. The std is the sample standard deviation (NaN with
    one seed).
    """
    dims = dims or varying_dims(runs)
    grouped = runs.groupby(dims, sort=False)
    table = grouped.agg(
        n_runs=("run", "size"),
        **{f"{m}_{stat}": (m, stat) for m in METRICS for stat in ("mean", "std")},
        **{f"{m}_{stat}": (m, stat) for m in CALIBRATION if m in runs.columns for stat in ("mean", "std")},
        **{c: (c, "mean") for c in COSTS},
        **{c: (c, "mean") for c in BYTES if c in runs.columns},
        **{c: (c, "first") for c in CODEC_COLUMNS if c in runs.columns},
        runs=("run", RUNS_SEPARATOR.join),
    ).reset_index()
    runs_column = table.pop(RUNS_COLUMN)
    table[SELECTED] = select_by_val(table, dims)
    table[RUNS_COLUMN] = runs_column
    return table


def select_by_val(table: pd.DataFrame, dims: list[str]) -> pd.Series:
    """Per family of rows that differ only in the tuned hyperparameters (TUNED) among `dims`: True on the row
    with the best mean validation AUC (ties: validation balanced accuracy; then the first), False on the others.
    Without a tuned dimension among `dims` nothing is chosen: all False."""
    tuned = [d for d in dims if d in TUNED]
    selected = pd.Series(False, index=table.index)
    if not tuned or table.empty:
        return selected
    others = [d for d in dims if d not in TUNED]
    families = table.groupby(others, sort=False).groups.values() if others else [table.index]
    for rows in families:
        scores = table.loc[rows, list(SELECT_BY)]
        if len(rows) < 2 or scores[SELECT_BY[0]].isna().all():  # nothing to choose, or no validation scores
            continue
        best = scores.fillna(-np.inf).sort_values(list(SELECT_BY), ascending=False, kind="stable").index[0]
        selected[best] = True
    return selected


def reference_rows(table: pd.DataFrame, reference: dict) -> list[int | None]:
    """Per row, the position of the row it is compared with: the row with the values `reference` names on
    those dimensions and the row's own values on every other varying dimension but the tuned ones (TUNED), so
    a row is compared within its own model unless `reference` names a model (one for every row, or a mapping
    that pairs models by name: experiments.reference_model); among several, the val-selected one, else the
    best mean validation AUC (ties: validation balanced accuracy), else the first. None where the grid has no
    such row. The rows an interaction pairs each row with are found the same way (`reference` = its values)."""
    dims = [d for d in DIMS if d in table.columns]
    spelling = {d: table[d].map(spelt) for d in dims}
    fixed = {d: spelt(v) for d, v in reference.items() if d in dims and d != "model"}
    found: list[int | None] = []
    for k in range(len(table)):
        wanted = {**fixed, "model": spelt(reference_model(reference, str(table["model"].iloc[k])))}
        match = pd.Series(True, index=table.index)
        for d in dims:
            if d in wanted:
                match &= spelling[d] == wanted[d]
            elif d not in TUNED:
                match &= spelling[d] == spelling[d].iloc[k]
        rows = table[match.to_numpy()]
        if rows.empty:
            found.append(None)
            continue
        rows = rows[rows[SELECTED]] if rows[SELECTED].any() else rows
        best = (
            rows[list(SELECT_BY)].fillna(-np.inf).sort_values(list(SELECT_BY), ascending=False, kind="stable")
        )
        found.append(table.index.get_loc(best.index[0]))
    return found


def tested_rows(table: pd.DataFrame) -> list[bool]:
    """Per row, whether it is a setting a study reports: the val-selected row of its tuned family (rows that
    differ only in TUNED), and every row of a family of one."""
    dims = [d for d in DIMS if d in table.columns]
    tuned = [d for d in dims if d in TUNED]
    if not tuned:
        return [True] * len(table)
    others = [d for d in dims if d not in TUNED]
    sizes = table.groupby(others, sort=False)[others[0]].transform("size") if others else len(table)
    return list((np.asarray(sizes) == 1) | table[SELECTED].to_numpy(bool))


def row_label(table: pd.DataFrame, k: int) -> str:
    """Row k in words: its values of the varying dimensions (a probe's empty lr and the like left out)."""
    row = table.iloc[k]
    return ", ".join(str(row[d]) for d in DIMS if d in table.columns and str(row[d]) not in ("", "0"))


def add_comparisons(
    table: pd.DataFrame,
    classes: list[str],
    *,
    reference: dict,
    family: str = "reference",
    interaction: dict | None = None,
    n_bootstrap: int,
    seed: int,
) -> pd.DataFrame:
    """The table with compare.paired_comparison's columns, every row against its own reference row
    (reference_rows), on each row's runs' test-split predictions; `compared_with` names that row in words.
    Holm's families: the rows sharing a reference (`family: reference`) or the whole table (`table`). With an
    `interaction` (grid values, as a reference), each row's contrast minus that of the row with those values
    and the row's own elsewhere (its counterpart, found as reference_rows finds a reference), named in words
    in `interaction_with`."""
    # Here, not at the top: scikit-learn and scipy serve the table job, not the figures that read DIMS here.
    from . import compare

    frames, recipes = row_predictions(table)
    references = reference_rows(table, reference)
    families = references if family == "reference" else [0] * len(table)
    deltas = compare.paired_comparison(
        frames,
        references,
        classes,
        recipes=recipes,
        tested=tested_rows(table),
        families=families,
        counterparts=reference_rows(table, interaction) if interaction else None,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    deltas.insert(2, "compared_with_row", deltas["compared_with"])  # its position, for figures
    deltas["compared_with"] = [row_label(table, j) if j >= 0 else "" for j in deltas["compared_with"]]
    if interaction:
        deltas["interaction_with"] = [
            row_label(table, j) if j >= 0 else "" for j in deltas["interaction_with"]
        ]
    runs_column = table[RUNS_COLUMN]
    out = pd.concat([table.drop(columns=RUNS_COLUMN), deltas.set_axis(table.index)], axis=1)
    return out.assign(**{RUNS_COLUMN: runs_column})


def row_predictions(table: pd.DataFrame) -> tuple[list[list[pd.DataFrame]], list[str]]:
    """Per table row, the test-split predictions of its runs (one frame per seed, in the order of the trainings
    they evaluate) and its recipe (those trainings' folders, joined): what compare.Scored scores. Rows of the
    same trained models on other test conditions get the same recipe, their seeds in the same order."""
    frames, recipes = [], []
    for cell in table[RUNS_COLUMN]:
        by_training = sorted(cell.split(RUNS_SEPARATOR), key=lambda run: (_training(run), run))
        frames.append([_test_rows(Path(run) / "predictions.parquet") for run in by_training])
        recipes.append(RUNS_SEPARATOR.join(sorted({_training(run) for run in by_training})))
    return frames, recipes


def _training(eval_dir: str) -> str:
    """The run folder an evaluation folder (<run>/eval/<variant>) belongs to."""
    return str(Path(eval_dir).parent.parent)


def _test_rows(path: Path) -> pd.DataFrame:
    frame = integrity.read_frame(path)
    return frame[frame["split"] == "test"].reset_index(drop=True)
