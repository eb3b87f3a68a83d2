"""Snakemake adapter: one experiment's table and its runs' predictions -> its reliability diagram."""

from dermcompress.provenance.logs import job_logging
from dermcompress.study.calibration_figure import run_reliability_figure

with job_logging(snakemake):
    run_reliability_figure(
        table_csv=snakemake.input.table,
        classes=list(snakemake.params.classes),
        title=snakemake.params.title,
        out=snakemake.output.png,
    )
