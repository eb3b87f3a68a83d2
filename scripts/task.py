"""Snakemake adapter: manifest -> the classification task (class subset, balancing)."""

from dermcompress.data.task import run_task
from dermcompress.provenance.logs import job_logging

with job_logging(snakemake):
    run_task(
        manifest=snakemake.input.manifest,
        task_out=snakemake.output.task,
        classes=snakemake.params.classes,
        balance=snakemake.params.balance,
        seed=snakemake.params.seed,
    )
