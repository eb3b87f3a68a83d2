"""Snakemake adapter: one experiment's runs -> one figure (params.kind: curves, cost, robustness, label_efficiency)."""

from dermcompress.figures import run_figure
from dermcompress.logs import job_logging

with job_logging(snakemake):
    run_figure(
        kind=snakemake.params.kind,
        metrics=list(snakemake.input.metrics),
        title=snakemake.params.title,
        out=snakemake.output.png,
    )
