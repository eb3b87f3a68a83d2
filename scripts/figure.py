"""Snakemake adapter: one experiment's runs -> one figure (params.kind: curves, cost, robustness, label_efficiency)."""

from dermcompress.provenance.logs import job_logging
from dermcompress.study.figures import run_figure

with job_logging(snakemake):
    run_figure(
        kind=snakemake.params.kind,
        metrics=list(snakemake.input.metrics),
        title=snakemake.params.title,
        out=snakemake.output.png,
    )
