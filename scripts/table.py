"""Snakemake adapter: one experiment's runs -> its table (CSV with the runs of each row, Markdown, LaTeX, HTML)."""

from dermcompress.aggregate import run_table
from dermcompress.logs import job_logging

with job_logging(snakemake):
    run_table(
        metrics=list(snakemake.input.metrics),
        title=snakemake.params.title,
        label=snakemake.wildcards.experiment,
        csv=snakemake.output.csv,
        md=snakemake.output.md,
        tex=snakemake.output.tex,
        html=snakemake.output.html,
    )
