"""Snakemake adapter: every selected run's metrics.json -> one row per run (CSV, and HTML for the report)."""

from dermcompress.provenance.logs import job_logging
from dermcompress.study.tables import run_runs_index

with job_logging(snakemake):
    run_runs_index(
        metrics=list(snakemake.input.metrics), csv=snakemake.output.csv, html=snakemake.output.html
    )
