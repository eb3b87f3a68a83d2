"""Paired comparisons of a table's rows, each with its own reference row: Δ AUC and Δ balanced accuracy on the
shared test images, with a standard error, a 95% interval and a p-value from a test that is valid for the kind of
difference (contrasts.py), Holm-adjusted within declared families of rows.

The rows are paired: every row scores the same test images, so much of the sampling noise (which lesions happen
to be in the test split, how hard they are) is shared and cancels in a difference. One matrix of lesion-group
resamples (learn.bootstrap) serves every row and seed, so each resample's Δ compares rows on the very same
resampled groups.

- A row with the reference's trained models (another evaluation variant) is a *same models* contrast: per seed on
  the same images, models held fixed, uncertainty from resampling lesion groups.
- A row trained otherwise (resolution, training data, learning rate, mode, model, label fraction) is a *recipe*
  contrast: the seed-to-seed variance of both recipes is added (Welch t). With one seed it is not covered, and
  the `test` column says so.
- Obuchowski's clustered ROC test (clustered_roc.py; DeLong's when every lesion has one image) is the analytic
  second opinion for Δ AUC in binary tasks, with the same seed variance added for a recipe contrast.

Which rows are tested: a row that validation did not select within its tuned family (it differs from the chosen
row only in lr, schedule or epochs) is shown with its Δ and interval but no p, and says why; so is a row with no
reference row. Families (Holm's m) are the tested rows sharing a reference unless the caller declares others;
`family_size` stands beside every adjusted p.

Interactions (a difference of contrasts): where the caller pairs row k with a counterpart row c, the table also
gets (k - ref k) - (c - ref c) per metric (contrasts.interaction), e.g. what a codec costs model B beyond what it
costs model A, with the test its contrast calls for (two recipes: both recipes' seed variance, Welch t), and
Holm-adjusted as one family of its own (the table's tested interactions). A row without a counterpart other
than itself, or that is a reference row, or whose counterpart is, has none: its interaction columns are empty.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import pandas as pd

from dermcompress.learn import bootstrap
from dermcompress.learn.metrics import class_indices, prob_columns

from .clustered_roc import auc_difference
from .contrasts import Contrast, RowScores, difference, holm, interaction

METRICS = ("auc", "balanced_accuracy")
P_COLUMNS = ("delta_auc_p", "delta_balanced_accuracy_p", "obuchowski_p")
STATS = ("", "_se", "_df", "_low", "_high", "_p")
NOT_SELECTED = "not selected by validation"
NO_REFERENCE = "no reference row"


class Scored:
    """The rows of a comparison scored once: every frame aligned on the first row's first frame, the labels, the
    lesion groups and the shared group-resample weights."""

    def __init__(
        self,
        rows: Sequence[Sequence[pd.DataFrame]],
        recipes: Sequence[str],
        classes: list[str],
        *,
        n_bootstrap: int,
        seed: int,
    ):
        if len(recipes) != len(rows):
            raise ValueError(f"{len(recipes)} recipes for {len(rows)} rows")
        if empty := [k for k, frames in enumerate(rows) if len(frames) == 0]:
            raise ValueError(f"rows {empty} have no prediction frames")
        columns = ["image_id", "group_id", "label", "pred", *prob_columns(classes)]
        first = rows[0][0]
        image_ids = pd.Index(first["image_id"].astype(str))
        first = _align(first, image_ids, 0, columns)  # checks the first frame itself for duplicates
        self.classes, self.recipes = classes, list(recipes)
        self.y_true = class_indices(first["label"], classes, "label")
        self.groups = first["group_id"].astype(str).to_numpy()
        self.frames = [[_align(f, image_ids, k, columns) for f in frames] for k, frames in enumerate(rows)]
        labels = first["label"].astype(str).to_numpy()
        for k, frames in enumerate(self.frames):
            if any((f["label"].astype(str).to_numpy() != labels).any() for f in frames):
                raise ValueError(f"row {k} gives some images other labels than the first row")
        self.weights = bootstrap.group_weights(self.groups, n_bootstrap, seed)

    def row(self, k: int, images: np.ndarray | None = None) -> dict[str, RowScores]:
        """Row k's RowScores per metric, on the images where the boolean mask `images` is True (default all)."""
        mask = np.ones(len(self.y_true), dtype=bool) if images is None else np.asarray(images, dtype=bool)
        probs = [f[prob_columns(self.classes)].to_numpy(dtype=np.float64)[mask] for f in self.frames[k]]
        preds = [class_indices(f["pred"], self.classes, "pred")[mask] for f in self.frames[k]]
        return row_scores(self.y_true[mask], probs, preds, self.weights[:, mask], self.recipes[k])

    def positive_scores(self, k: int) -> np.ndarray:
        """(n_seeds, N) probabilities of the second class (binary tasks), for the analytic ROC test."""
        return np.stack([f[f"prob_{self.classes[1]}"].to_numpy(float) for f in self.frames[k]])


def row_scores(
    y_true: np.ndarray, probs: list[np.ndarray], preds: list[np.ndarray], weights: np.ndarray, recipe: str
) -> dict[str, RowScores]:
    """A row's RowScores per metric from its seeds' class probabilities (N, C) and predicted class indices
    (N,), on the whole test split (scikit-learn) and on every row of the group-resample `weights` (B, N)."""
    # The whole split is the resample in which every image counts once: the same code as the resamples, and
    # equal to scikit-learn's roc_auc_score and balanced_accuracy_score (tests/test_compare.py).
    weights = np.vstack([np.ones((1, len(y_true))), weights])
    auc = [bootstrap.weighted_auc(y_true, p, weights) for p in probs]
    accuracy = [bootstrap.weighted_balanced_accuracy(y_true, p, weights) for p in preds]
    values = {
        "auc": (np.array([a[0] for a in auc]), np.stack([a[1:] for a in auc])),
        "balanced_accuracy": (np.array([a[0] for a in accuracy]), np.stack([a[1:] for a in accuracy])),
    }
    return {metric: RowScores(point, resampled, recipe) for metric, (point, resampled) in values.items()}


def paired_comparison(
    rows: Sequence[Sequence[pd.DataFrame]],
    references: Sequence[int | None],
    classes: list[str],
    *,
    recipes: Sequence[str],
    tested: Sequence[bool] | None = None,
    families: Sequence[Hashable] | None = None,
    counterparts: Sequence[int | None] | None = None,
    n_bootstrap: int,
    seed: int,
) -> pd.DataFrame:
    """Each row against its reference row: Δ, standard error, degrees of freedom, 95% interval, p and Holm p
    per metric, Obuchowski's p for Δ AUC (binary tasks; NaN otherwise), the contrast's kind and test.

    `rows[k]` holds the test-split prediction frames (metrics.py format) behind table row k, one per seed, in
    the order of its trained models; `recipes[k]` names those models (equal for rows of the same trained
    models). `references[k]` is the position of row k's reference row: k itself for a reference, None where
    it has none. `tested[k]` False: shown without a p (not selected by validation). `families[k]`: Holm's
    family (default: the reference row). With `counterparts` (row k's counterpart's position, or None), the
    interaction columns too (_interactions). Every frame must score the same images.
    """
    if len(references) != len(rows):
        raise ValueError(f"{len(references)} references for {len(rows)} rows")
    if bad := [r for r in references if r is not None and not 0 <= r < len(rows)]:
        raise ValueError(f"references {bad} are not row positions of {len(rows)} rows")
    tested = [True] * len(rows) if tested is None else list(tested)
    families = list(references) if families is None else list(families)
    scored = Scored(rows, recipes, classes, n_bootstrap=n_bootstrap, seed=seed)
    per_row = [scored.row(k) for k in range(len(rows))]
    out = [_compare(scored, per_row, k, ref, tested[k]) for k, ref in enumerate(references)]
    table = pd.DataFrame(out)
    table["family_size"] = 0
    for family in dict.fromkeys(f for f in families if f is not None):
        members = [k for k, f in enumerate(families) if f == family and _tested(table.loc[k])]
        for column in P_COLUMNS:
            table.loc[members, f"{column}_holm"] = holm(table.loc[members, column].to_numpy(float))
        table.loc[members, "family_size"] = len(members)
    if counterparts is None:
        return table
    if len(counterparts) != len(rows):
        raise ValueError(f"{len(counterparts)} counterparts for {len(rows)} rows")
    return pd.concat([table, _interactions(per_row, references, counterparts, tested)], axis=1)


def _interactions(
    per_row: list[dict[str, RowScores]],
    references: Sequence[int | None],
    counterparts: Sequence[int | None],
    tested: Sequence[bool],
) -> pd.DataFrame:
    """Per row k paired with a counterpart c: the difference of contrasts (k - ref k) - (c - ref c) per metric
    (estimate, se, df, 95% interval, p, Holm p within the table's tested interactions), `interaction_with` (c's
    position, -1 where none), its kind, seeds and test. No p where row k is not tested (validation)."""
    records = []
    for k, c in enumerate(counterparts):
        ref = references[k]
        c_ref = None if c is None else references[c]
        if c is None or ref is None or c_ref is None or k in (c, ref) or c == c_ref:
            record = {"interaction_with": -1, "interaction_contrast": "", "interaction_seeds": ""}
            record |= {"interaction_seed_variance": True, "interaction_test": ""}
            for metric in METRICS:
                record |= {f"interaction_{metric}{s}": np.nan for s in (*STATS, "_p_holm")}
            records.append(record)
            continue
        results = {
            m: interaction(per_row[k][m], per_row[ref][m], per_row[c][m], per_row[c_ref][m]) for m in METRICS
        }
        first = results["auc"]
        record = {
            "interaction_with": c,
            "interaction_contrast": first.kind,
            "interaction_seeds": " vs ".join(map(str, first.seeds)),
            "interaction_seed_variance": first.seed_variance,
            "interaction_test": first.test,
        }
        for metric, result in results.items():
            values = (
                result.delta,
                result.se,
                result.df,
                result.low,
                result.high,
                result.p if tested[k] else np.nan,
            )
            record |= {f"interaction_{metric}{s}": float(v) for s, v in zip(STATS, values, strict=True)}
            record[f"interaction_{metric}_p_holm"] = np.nan
        records.append(record)
    out = pd.DataFrame(records)
    members = out["interaction_auc_p"].notna().to_numpy()
    for metric in METRICS:
        out.loc[members, f"interaction_{metric}_p_holm"] = holm(
            out.loc[members, f"interaction_{metric}_p"].to_numpy(float)
        )
    out["interaction_family_size"] = np.where(members, int(members.sum()), 0)
    return out


def _tested(row: pd.Series) -> bool:
    """Whether a row carries a p: compared with a reference row other than itself, and selected."""
    return not row["reference"] and row["compared_with"] >= 0 and row["untested"] == ""


def _compare(
    scored: Scored, per_row: list[dict[str, RowScores]], k: int, ref: int | None, tested: bool
) -> dict:
    """Table row k's columns against row `ref`."""
    record: dict = {"reference": ref == k, "compared_with": -1 if ref is None else ref}
    if ref is None or ref == k:
        record |= {"contrast": "", "seeds": "", "seed_variance": True, "test": ""}
        record["untested"] = "" if ref == k else NO_REFERENCE
        for metric in METRICS:
            zero = 0.0 if ref == k else np.nan
            record |= _columns(metric, (zero, np.nan, np.nan, zero, zero, np.nan))
        return record | {"obuchowski_p": np.nan, "obuchowski_p_holm": np.nan}
    results = {m: difference(per_row[k][m], per_row[ref][m]) for m in METRICS}
    first = results["auc"]
    record |= {
        "contrast": first.kind,
        "seeds": " vs ".join(map(str, (per_row[k]["auc"].n_seeds, per_row[ref]["auc"].n_seeds))),
        "seed_variance": first.seed_variance,
        "test": first.test,
        "untested": "" if tested else NOT_SELECTED,
    }
    for metric, result in results.items():
        p = result.p if tested else np.nan
        record |= _columns(metric, (result.delta, result.se, result.df, result.low, result.high, p))
    record["obuchowski_p"] = _obuchowski_p(scored, per_row, k, ref) if tested else np.nan
    return record | {"obuchowski_p_holm": np.nan}


def _columns(metric: str, values: tuple) -> dict:
    names = ("", "_se", "_df", "_low", "_high", "_p")
    return {f"delta_{metric}{s}": float(v) for s, v in zip(names, values, strict=True)} | {
        f"delta_{metric}_p_holm": np.nan
    }


def _obuchowski_p(scored: Scored, per_row: list[dict[str, RowScores]], k: int, ref: int) -> float:
    """The p of Δ AUC of row k against `ref` with Obuchowski's clustered variance plus, for a recipe contrast,
    the seed variance; NaN but in binary tasks."""
    if len(scored.classes) != 2:
        return np.nan
    _, variance = auc_difference(
        scored.y_true == 1, scored.positive_scores(k), scored.positive_scores(ref), scored.groups
    )
    return difference(per_row[k]["auc"], per_row[ref]["auc"], sampling_variance=variance).p


def interaction_comparison(
    rows: Sequence[Sequence[pd.DataFrame]],
    recipes: Sequence[str],
    classes: list[str],
    *,
    images: Sequence[np.ndarray | None] | None = None,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Contrast]:
    """A difference of two contrasts, (rows[0] - rows[1]) - (rows[2] - rows[3]), per metric: e.g. a codec's
    cost to model A beyond its cost to model B. `images[k]` (boolean masks over the first frame's images, in
    its order) restricts row k to a subset: the same rows on subgroup S and on the rest ask whether the cost
    differs between subgroups. Shared group resamples keep the covariances between the four parts."""
    if len(rows) != 4:
        raise ValueError(
            f"an interaction takes four rows (a, a's reference, b, b's reference), not {len(rows)}"
        )
    scored = Scored(rows, recipes, classes, n_bootstrap=n_bootstrap, seed=seed)
    masks = list(images) if images is not None else [None] * 4
    parts = [scored.row(k, masks[k]) for k in range(4)]
    return {metric: interaction(*(part[metric] for part in parts)) for metric in METRICS}


def _align(frame: pd.DataFrame, image_ids: pd.Index, row: int, columns: list[str]) -> pd.DataFrame:
    """`frame` reordered to `image_ids`; ValueError naming the row if it holds other images."""
    if missing := sorted(set(columns) - set(frame.columns)):
        raise ValueError(f"row {row}: predictions lack columns {missing}")
    ids = pd.Index(frame["image_id"].astype(str))
    if ids.has_duplicates:
        raise ValueError(f"row {row}: duplicate image ids, e.g. {sorted(set(ids[ids.duplicated()]))[:5]}")
    if len(ids) != len(image_ids) or not ids.isin(image_ids).all():
        absent, extra = sorted(set(image_ids) - set(ids)), sorted(set(ids) - set(image_ids))
        raise ValueError(
            f"row {row} scores other images than the first row: missing {absent[:5]} ({len(absent)}),"
            f" extra {extra[:5]} ({len(extra)})"
        )
    return frame.iloc[ids.get_indexer(image_ids)].reset_index(drop=True)
