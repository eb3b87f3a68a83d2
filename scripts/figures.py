"""Snakemake adapter: one experiment's runs, table and subgroup table -> each figure its grid calls for."""

from dermcompress.provenance.logs import job_logging
from dermcompress.study.figure_jobs import draw_figures

with job_logging(snakemake):
    draw_figures(
        kinds=list(snakemake.params.kinds),
        outputs={kind: snakemake.output[kind] for kind in snakemake.params.kinds},
        title=snakemake.params.title,
        classes=list(snakemake.params.classes),
        metrics=list(snakemake.input.get("metrics", [])),
        table=snakemake.input.get("table"),
        subgroups=snakemake.input.get("subgroups"),
    )
