"""Snakemake adapter: every cache's _info.json -> the bytes-per-image table (CSV, Markdown, HTML)."""

from dermcompress.provenance.logs import job_logging
from dermcompress.study.bytes_summary import run_bytes_summary

with job_logging(snakemake):
    run_bytes_summary(
        caches=list(snakemake.input.caches),
        csv=snakemake.output.csv,
        md=snakemake.output.md,
        html=snakemake.output.html,
    )
