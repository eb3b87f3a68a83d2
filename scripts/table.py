"""Snakemake adapter: one experiment's runs -> its table (CSV with the runs of each row, Markdown, LaTeX, HTML),
with the bytes per image of each row's data, each row's paired differences from its own reference row and,
where the experiment declares an interaction, each row's difference of contrasts."""

from dermcompress.provenance.logs import job_logging
from dermcompress.study.tables import run_table

with job_logging(snakemake):
    run_table(
        metrics=list(snakemake.input.metrics),
        title=snakemake.params.title,
        label=snakemake.wildcards.experiment,
        csv=snakemake.output.csv,
        md=snakemake.output.md,
        tex=snakemake.output.tex,
        html=snakemake.output.html,
        caches=list(snakemake.input.caches),
        classes=list(snakemake.params.classes),
        reference=snakemake.params.reference,
        family=snakemake.params.family,
        interaction=snakemake.params.interaction,
        n_bootstrap=snakemake.params.n_bootstrap,
    )
