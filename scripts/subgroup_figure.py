"""Snakemake adapter: one experiment's subgroup table -> its Δ AUC by subgroup figure."""

from dermcompress.provenance.logs import job_logging
from dermcompress.study.subgroup_figure import run_subgroup_figure

with job_logging(snakemake):
    run_subgroup_figure(
        subgroups_csv=snakemake.input.subgroups,
        title=snakemake.params.title,
        out=snakemake.output.png,
    )
