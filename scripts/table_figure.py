"""Snakemake adapter: one experiment's table -> one figure (params.kind: rate_accuracy, forest)."""

from dermcompress.provenance.logs import job_logging
from dermcompress.study.rate_figures import run_table_figure

with job_logging(snakemake):
    run_table_figure(
        kind=snakemake.params.kind,
        table_csv=snakemake.input.table,
        title=snakemake.params.title,
        out=snakemake.output.png,
    )
