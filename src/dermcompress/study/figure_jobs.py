"""One experiment's figures in one process: each kind its grid calls for (experiments.figure_kinds), drawn by
the module that knows it, from the job's inputs.

A figure takes a few tenths of a second to draw and a process most of a second to start (Python, pandas,
matplotlib), so the workflow draws an experiment's figures in one job, not one job per figure: the demo's 58
figure jobs became 9. Drawing a figure again costs next to nothing, so an experiment's figures rerun together
when any of their inputs or code changes.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Per kind: the study module that draws it, and the label the report shows.
KINDS = {
    "curves": ("figures", "training curves"),
    "cost": ("figures", "accuracy vs cost"),
    "robustness": ("figures", "robustness heat map"),
    "label_efficiency": ("figures", "label efficiency"),
    "rate_accuracy": ("rate_figures", "rate-accuracy"),
    "forest": ("rate_figures", "paired differences"),
    "reliability": ("calibration_figure", "reliability"),
    "subgroups": ("subgroup_figure", "Δ AUC by subgroup"),
}
# What each kind reads (the job's named inputs): the runs' metrics and histories, the experiment's table and its
# runs' test predictions, its subgroup table.
INPUTS = {
    "curves": ("metrics", "histories"),
    "cost": ("metrics",),
    "robustness": ("metrics",),
    "label_efficiency": ("metrics",),
    "rate_accuracy": ("table",),
    "forest": ("table",),
    "reliability": ("table", "predictions"),
    "subgroups": ("subgroups",),
}


def inputs(kinds: list[str]) -> list[str]:
    """The named inputs these kinds read, each once, in INPUTS' order."""
    if unknown := sorted(set(kinds) - set(KINDS)):
        raise ValueError(f"unknown figure kinds {unknown}: known are {sorted(KINDS)}")
    wanted = {name for kind in kinds for name in INPUTS[kind]}
    return [name for name in ("metrics", "histories", "table", "predictions", "subgroups") if name in wanted]


def draw_figures(
    *,
    kinds: list[str],
    outputs: dict[str, str],
    title: str,
    classes: list[str],
    metrics: list[str] | None = None,
    table: str | None = None,
    subgroups: str | None = None,
) -> None:
    """Draw each of `kinds` to `outputs[kind]` (a PNG path): the runs' figures from `metrics` (metrics.json
    paths), the table's from `table` (the experiment's table CSV), the subgroup figure from `subgroups` (its
    subgroup table CSV). The drawing modules load on first use: a job imports only what its kinds need (the
    workflow fingerprints this module, whose code fingerprint covers them all)."""
    inputs(kinds)  # names an unknown kind before anything is drawn
    for kind in kinds:
        module = KINDS[kind][0]
        if module == "figures":
            from .figures import run_figure

            run_figure(kind=kind, metrics=list(metrics or []), title=title, out=outputs[kind])
        elif module == "rate_figures":
            from .rate_figures import run_table_figure

            run_table_figure(kind=kind, table_csv=table, title=title, out=outputs[kind])
        elif module == "calibration_figure":
            from .calibration_figure import run_reliability_figure

            run_reliability_figure(table_csv=table, classes=classes, title=title, out=outputs[kind])
        else:
            from .subgroup_figure import run_subgroup_figure

            run_subgroup_figure(subgroups_csv=subgroups, title=title, out=outputs[kind])
    log.info("%d figures drawn: %s", len(kinds), ", ".join(kinds))
