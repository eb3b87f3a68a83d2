"""Snakemake adapter: manifest + split report -> the data-set summary (Markdown, and HTML for the report)."""

from dermcompress.provenance.logs import job_logging
from dermcompress.study.tables import run_data_summary

with job_logging(snakemake):
    run_data_summary(
        manifest=snakemake.input.manifest,
        split_report=snakemake.input.split_report,
        md=snakemake.output.md,
        html=snakemake.output.html,
    )
