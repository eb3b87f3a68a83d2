"""Snakemake adapter: one experiment's table -> one figure (params.kind: rate_accuracy, forest)."""

from dermcompress.figures import run_table_figure
from dermcompress.logs import job_logging

with job_logging(snakemake):
    run_table_figure(
        kind=snakemake.params.kind,
        table_csv=snakemake.input.table,
        title=snakemake.params.title,
        out=snakemake.output.png,
    )
