"""Snakemake adapter: one experiment's table, its runs' predictions and the manifest -> its subgroup table (CSV,
Markdown, HTML): each row's metrics per sex, age band and site, and each compared row's Δ and interaction there."""

from dermcompress.provenance.logs import job_logging
from dermcompress.study.subgroups import run_subgroups

with job_logging(snakemake):
    run_subgroups(
        table_csv=snakemake.input.table,
        manifest=snakemake.input.manifest,
        classes=list(snakemake.params.classes),
        min_images=snakemake.params.min_images,
        age_bands=list(snakemake.params.age_bands),
        n_bootstrap=snakemake.params.n_bootstrap,
        title=snakemake.params.title,
        csv=snakemake.output.csv,
        md=snakemake.output.md,
        html=snakemake.output.html,
    )
