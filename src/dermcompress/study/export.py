"""A run's test predictions in the ISIC 2019 submission format, and the ground truth to score them against.

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

from pathlib import Path

import numpy as np
import pandas as pd

from dermcompress.data import integrity
from dermcompress.learn.metrics import PROB_PREFIX

# The official ground truth's class columns, in its order.
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
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


def submission_frame(predictions: pd.DataFrame, classes: tuple[str, ...] = ISIC2019_CLASSES) -> pd.DataFrame:
    """`image` and one probability column per class of `classes`, a row per test image.

    The run's `prob_<CLASS>` columns (its task's classes only) are mapped by name; a class the run does not
    predict scores 0.0, so a row of the nine still sums to 1.
    """
    rows = submitted_rows(predictions)
    probs = {c.removeprefix(PROB_PREFIX): c for c in rows.columns if c.startswith(PROB_PREFIX)}
    if not probs:
        raise ValueError(f"predictions have no {PROB_PREFIX}<CLASS> columns")
    if unknown := sorted(set(probs) - set(ISIC2019_CLASSES)):
        raise ValueError(
            f"prediction columns for classes not in ISIC 2019 {list(ISIC2019_CLASSES)}: {unknown}"
        )
    frame = pd.DataFrame({"image": rows["image_id"]})
    for name in classes:
        values = rows[probs[name]].to_numpy(dtype=np.float64) if name in probs else np.zeros(len(rows))
        if np.isnan(values).any():
            raise ValueError(
                f"{PROB_PREFIX}{name} is NaN for image {rows['image_id'][np.isnan(values)].iloc[0]}"
            )
        outside = (values < -CLIP_TOLERANCE) | (values > 1 + CLIP_TOLERANCE)
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            raise ValueError(f"{PROB_PREFIX}{name} is {values[first]} for image {rows['image_id'][first]}")
        frame[name] = np.clip(values, 0.0, 1.0)
    return frame


def ground_truth_frame(predictions: pd.DataFrame) -> pd.DataFrame:
    """`image` and the one-hot labels of the test split, only the classes present in it (in ISIC order):
    the scorer fails on a class column with no positive (module docstring)."""
    rows = submitted_rows(predictions)
    labels = rows["label"].astype(str)
    if unknown := sorted(set(labels) - set(ISIC2019_CLASSES)):
        raise ValueError(f"labels not in ISIC 2019 {list(ISIC2019_CLASSES)}: {unknown}")
    present = [c for c in ISIC2019_CLASSES if (labels == c).any()]
    if len(present) < 2:
        raise ValueError(f"the test split holds only {present}: the scorer needs two classes or more")
    frame = pd.DataFrame({"image": rows["image_id"]})
    for name in present:
        frame[name] = (labels == name).to_numpy(dtype=np.float64)
    return frame


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    # Floats written as floats ("0.0", not "0"): the scorer rejects a column that parses as integers.
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


def write_submission(
    predictions: pd.DataFrame, out_csv: str | Path, classes: tuple[str, ...] | list[str] = ISIC2019_CLASSES
) -> int:
    """Write the submission CSV of the test split (the nine ISIC columns, or `classes`); returns its rows."""
    frame = submission_frame(predictions, tuple(classes))
    _write_csv(frame, Path(out_csv))
    return len(frame)


def write_ground_truth(predictions: pd.DataFrame, out_csv: str | Path) -> list[str]:
    """Write the ground-truth CSV of the test split; returns the classes it holds."""
    frame = ground_truth_frame(predictions)
    _write_csv(frame, Path(out_csv))
    return list(frame.columns[1:])


def default_paths(out_csv: str | Path) -> tuple[Path, Path]:
    """Where the ground truth and the scorer's copy of the submission go by default: next to OUT, as
    OUT_GroundTruth.csv and OUT_Scoring.csv."""
    out = Path(out_csv)
    return out.with_name(f"{out.stem}_GroundTruth.csv"), out.with_name(f"{out.stem}_Scoring.csv")


def run_export(
    run: str | Path,
    out_csv: str | Path,
    ground_truth: str | Path | None = None,
    eval_variant: str | None = None,
) -> dict:
    """Export a run's (or an evaluation's) test predictions: the nine-column submission at `out_csv`, the
    ground truth (default OUT_GroundTruth.csv) and the submission cut to its classes (OUT_Scoring.csv)."""
    eval_dir = resolve_evaluation(run, eval_variant)
    predictions = integrity.read_frame(eval_dir / PREDICTIONS)
    default_truth, scoring = default_paths(out_csv)
    truth = Path(ground_truth) if ground_truth else default_truth
    images = write_submission(predictions, out_csv)
    truth_classes = write_ground_truth(predictions, truth)
    write_submission(predictions, scoring, truth_classes)
    return {
        "evaluation": str(eval_dir),
        "images": images,
        "val_rows_left_out": int((predictions["split"].astype(str) == "val").sum()),
        "run_classes": [c.removeprefix(PROB_PREFIX) for c in predictions if c.startswith(PROB_PREFIX)],
        "ground_truth_classes": truth_classes,
        "submission": str(out_csv),
        "ground_truth": str(truth),
        "scoring": str(scoring),
    }
