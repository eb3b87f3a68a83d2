"""A run's test predictions in its data source's challenge format, and the ground truth to score them against.

Each source is exported in the format of the challenge its images come from (FORMATS, SOURCE_FORMATS):

- isic2019: ISIC 2019's, `image` then MEL NV BCC AK BKL DF VASC SCC UNK (below);
- isic2020: ISIC 2020's (the SIIM-ISIC melanoma challenge), `image_name,target`: one row per image, `target` the
  probability of melanoma (the challenge scores its AUC); the ground truth `image_name,target` with 0/1;
- ham10000: ISIC 2018 task 3's, whose training set HAM10000 is: `image` then MEL NV BCC AKIEC BKL DF VASC (the
  study's AK is 2018's AKIEC, the class ISIC 2019 renamed);
- isic_archive: ISIC 2019's, the only challenge format with a column for every class the study maps an
  Archive diagnosis to (SCC included); the Archive has no challenge of its own.

The rest of this docstring is about the class-column formats (2019, 2018), which the same scorer reads.

The official scorer (the PyPI package isic-challenge-scoring, 5.6.0, read for this module) takes two CSVs,
`isic-challenge-scoring classification GROUND_TRUTH.csv PREDICTIONS.csv`. What it needs, from its code:

- the predictions: an `image` column, then one float column per class, values in [0, 1], no NaN, images
  unique (a `.jpg` suffix is stripped), the ground truth's images and no others;
- the ground truth's columns are the categories: the predictions must have exactly those columns, no more
  ("Extra columns in CSV") and no fewer;
- every ground-truth column must hold positives and negatives: per category it computes AUC and the partial
  AUC above 80% sensitivity, and an all-zero column (a class absent from the test split) crashes the latter
  (`ValueError: array of sample points is empty` from np.interp; older scikit-learn already raises in
  roc_auc_score). So the ground truth keeps only the classes present in the test split: UNK (no training
  image has it) goes, and so do the seven classes a MEL vs NV run never sees;
- its balanced accuracy counts an exact tie between the top probabilities as wrong ("undecided"), where
  metrics.json takes the first class: the two agree unless a row ties.

Hence three files: the submission with the nine official columns (what an ISIC 2019 submission looks like),
the ground truth of the test split, and the submission cut to the ground truth's columns, which the scorer
reads.
5.6.0 also calls DataFrame.applymap, removed in pandas 3, so it runs only next to a pandas 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dermcompress.data import integrity
from dermcompress.learn.metrics import PROB_PREFIX

# The official ground truth's class columns, in its order.
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")


@dataclass(frozen=True)
class Format:
    """A challenge's submission format: its image column, and either its class columns (study class -> column
    name, in the challenge's order) or the one probability column `target` of the class `positive`."""

    name: str
    image_column: str
    columns: dict[str, str] = field(default_factory=dict)
    positive: str | None = None


FORMATS = {
    "isic2019": Format("ISIC 2019", "image", {c: c for c in ISIC2019_CLASSES}),
    "isic2018": Format(
        "ISIC 2018 task 3",
        "image",
        {"MEL": "MEL", "NV": "NV", "BCC": "BCC", "AK": "AKIEC", "BKL": "BKL", "DF": "DF", "VASC": "VASC"},
    ),
    "isic2020": Format("ISIC 2020", "image_name", positive="MEL"),
}
# data.source -> the format its runs are exported in (module docstring).
SOURCE_FORMATS = {
    "isic2019": "isic2019",
    "isic_archive": "isic2019",
    "ham10000": "isic2018",
    "isic2020": "isic2020",
}
TARGET = "target"
PREDICTIONS = "predictions.parquet"
DEFAULT_EVAL_VARIANT = "clean"
# Probabilities this far outside [0, 1] are float rounding and are clipped; further out is an error.
CLIP_TOLERANCE = 1e-6


def resolve_evaluation(run: str | Path, eval_variant: str | None = None) -> Path:
    """The evaluation folder RUN names: itself when it holds predictions.parquet, else the run folder's
    eval/<eval_variant> (clean by default). An evaluation folder is its own variant: asking it for another
    one is an error, not a silent substitution."""
    path = Path(run)
    if (path / PREDICTIONS).is_file():
        if eval_variant is not None and eval_variant != path.name:
            raise ValueError(f"{path} is the evaluation {path.name!r}, not {eval_variant!r}")
        return path
    evals = path / "eval"
    if not evals.is_dir():
        raise ValueError(f"{path} is neither an evaluation folder ({PREDICTIONS}) nor a run folder (eval/)")
    variant = eval_variant or DEFAULT_EVAL_VARIANT
    chosen = evals / variant
    if not (chosen / PREDICTIONS).is_file():
        present = sorted(p.name for p in evals.iterdir() if (p / PREDICTIONS).is_file())
        raise ValueError(
            f"{path} has no evaluation {variant!r} ({chosen / PREDICTIONS} is missing); "
            f"eval variants present: {', '.join(present) or 'none'}"
        )
    return chosen


def submitted_rows(predictions: pd.DataFrame) -> pd.DataFrame:
    """The test split's rows, sorted by image; the validation split chose the run and is not submitted."""
    missing = {"split", "image_id", "label"} - set(predictions.columns)
    if missing:
        raise ValueError(f"predictions lack columns {sorted(missing)}")
    rows = predictions[predictions["split"].astype(str) == "test"]
    if rows.empty:
        raise ValueError("predictions hold no test rows")
    images = rows["image_id"].astype(str)
    if images.duplicated().any():
        raise ValueError(f"test images listed twice: {sorted(set(images[images.duplicated()]))[:5]}")
    return rows.assign(image_id=images).sort_values("image_id", kind="stable").reset_index(drop=True)


def _probabilities(rows: pd.DataFrame) -> dict[str, str]:
    """Study class -> its `prob_<CLASS>` column."""
    probs = {c.removeprefix(PROB_PREFIX): c for c in rows.columns if c.startswith(PROB_PREFIX)}
    if not probs:
        raise ValueError(f"predictions have no {PROB_PREFIX}<CLASS> columns")
    return probs


def _checked(rows: pd.DataFrame, column: str, name: str) -> np.ndarray:
    """A probability column as floats in [0, 1]: NaN or a value out of range (beyond rounding) is an error."""
    values = rows[column].to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        raise ValueError(f"{PROB_PREFIX}{name} is NaN for image {rows['image_id'][np.isnan(values)].iloc[0]}")
    outside = (values < -CLIP_TOLERANCE) | (values > 1 + CLIP_TOLERANCE)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise ValueError(f"{PROB_PREFIX}{name} is {values[first]} for image {rows['image_id'][first]}")
    return np.clip(values, 0.0, 1.0)


def submission_frame(
    predictions: pd.DataFrame, classes: tuple[str, ...] = ISIC2019_CLASSES, fmt: str = "isic2019"
) -> pd.DataFrame:
    """The submission of the test split in format `fmt` (FORMATS), a row per test image.

    Class columns: the run's `prob_<CLASS>` columns (its task's classes only) are mapped by name, the columns of
    `classes` (study class names) in the format's names; a class the run does not predict scores 0.0, so a row
    still sums to 1. `target` (ISIC 2020): the probability of the format's positive class.
    """
    form = FORMATS[fmt]
    rows = submitted_rows(predictions)
    probs = _probabilities(rows)
    frame = pd.DataFrame({form.image_column: rows["image_id"]})
    if form.positive is not None:
        if form.positive not in probs:
            raise ValueError(
                f"the {form.name} format needs {PROB_PREFIX}{form.positive}; the run predicts {sorted(probs)}"
            )
        frame[TARGET] = _checked(rows, probs[form.positive], form.positive)
        return frame
    if unknown := sorted(set(probs) - set(form.columns)):
        raise ValueError(f"prediction columns for classes not in {form.name} {list(form.columns)}: {unknown}")
    for name in classes:
        values = _checked(rows, probs[name], name) if name in probs else np.zeros(len(rows))
        frame[form.columns[name]] = values
    return frame


def ground_truth_frame(predictions: pd.DataFrame, fmt: str = "isic2019") -> pd.DataFrame:
    """The labels of the test split in format `fmt`: one-hot over the classes present in it (in the format's
    order and names; the scorer fails on a class column with no positive, module docstring), or ISIC 2020's
    `target` (1 for the positive class, else 0), which needs both values for an AUC."""
    form = FORMATS[fmt]
    rows = submitted_rows(predictions)
    labels = rows["label"].astype(str)
    frame = pd.DataFrame({form.image_column: rows["image_id"]})
    if form.positive is not None:
        target = (labels == form.positive).to_numpy(dtype=np.int64)
        if target.min() == target.max():
            raise ValueError(
                f"the test split is all {'' if target.max() else 'non-'}{form.positive}: no AUC to score"
            )
        frame[TARGET] = target
        return frame
    if unknown := sorted(set(labels) - set(form.columns)):
        raise ValueError(f"labels not in {form.name} {list(form.columns)}: {unknown}")
    present = [c for c in form.columns if (labels == c).any()]
    if len(present) < 2:
        raise ValueError(f"the test split holds only {present}: the scorer needs two classes or more")
    for name in present:
        frame[form.columns[name]] = (labels == name).to_numpy(dtype=np.float64)
    return frame


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    # Floats written as floats ("0.0", not "0"): the scorer rejects a column that parses as integers.
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


def write_submission(
    predictions: pd.DataFrame,
    out_csv: str | Path,
    classes: tuple[str, ...] | list[str] = ISIC2019_CLASSES,
    fmt: str = "isic2019",
) -> int:
    """Write the submission CSV of the test split (every class of format `fmt`, or `classes`); returns its rows."""
    frame = submission_frame(predictions, tuple(classes), fmt)
    _write_csv(frame, Path(out_csv))
    return len(frame)


def write_ground_truth(predictions: pd.DataFrame, out_csv: str | Path, fmt: str = "isic2019") -> list[str]:
    """Write the ground-truth CSV of the test split; returns its columns after the image's."""
    frame = ground_truth_frame(predictions, fmt)
    _write_csv(frame, Path(out_csv))
    return list(frame.columns[1:])


def default_paths(out_csv: str | Path) -> tuple[Path, Path]:
    """Where the ground truth and the scorer's copy of the submission go by default: next to OUT, as
    OUT_GroundTruth.csv and OUT_Scoring.csv."""
    out = Path(out_csv)
    return out.with_name(f"{out.stem}_GroundTruth.csv"), out.with_name(f"{out.stem}_Scoring.csv")


def recorded_source(evaluation: str | Path) -> str | None:
    """The data.source of the workflow an evaluation folder belongs to: the `source` its manifest
    (results/data/manifest.parquet beside the folder's `results/`) records; None when there is none."""
    path = Path(evaluation).resolve()
    for parent in path.parents:
        if parent.name == "results" and (manifest := parent / "data" / "manifest.parquet").is_file():
            meta = pq.read_schema(manifest).metadata or {}
            source = meta.get(b"source")
            return source.decode() if source else None
    return None


def run_export(
    run: str | Path,
    out_csv: str | Path,
    ground_truth: str | Path | None = None,
    eval_variant: str | None = None,
    source: str | None = None,
) -> dict:
    """Export a run's (or an evaluation's) test predictions in the format of its data source (`source`, else the
    one its workflow's manifest records, else isic2019): the submission at `out_csv`, the ground truth (default
    OUT_GroundTruth.csv) and, for the class-column formats, the submission cut to its classes (OUT_Scoring.csv,
    what the scorer reads)."""
    eval_dir = resolve_evaluation(run, eval_variant)
    source = source or recorded_source(eval_dir) or "isic2019"
    if source not in SOURCE_FORMATS:
        raise ValueError(f"unknown data source {source!r}; one of {', '.join(SOURCE_FORMATS)}")
    fmt = SOURCE_FORMATS[source]
    predictions = integrity.read_frame(eval_dir / PREDICTIONS)
    default_truth, scoring = default_paths(out_csv)
    truth = Path(ground_truth) if ground_truth else default_truth
    images = write_submission(predictions, out_csv, tuple(FORMATS[fmt].columns), fmt)
    truth_columns = write_ground_truth(predictions, truth, fmt)
    if FORMATS[fmt].columns:
        names = {v: k for k, v in FORMATS[fmt].columns.items()}
        write_submission(predictions, scoring, [names[c] for c in truth_columns], fmt)
    else:
        scoring = Path(out_csv)  # image_name,target is what the challenge scores
    return {
        "evaluation": str(eval_dir),
        "source": source,
        "format": FORMATS[fmt].name,
        "images": images,
        "val_rows_left_out": int((predictions["split"].astype(str) == "val").sum()),
        "run_classes": [c.removeprefix(PROB_PREFIX) for c in predictions if c.startswith(PROB_PREFIX)],
        "ground_truth_classes": truth_columns,
        "submission": str(out_csv),
        "ground_truth": str(truth),
        "scoring": str(scoring),
    }
