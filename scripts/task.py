"""Snakemake adapter: manifest -> the classification task (class subset, balancing)."""

from dermcompress.logs import job_logging
from dermcompress.task import run_task

with job_logging(snakemake):
    run_task(
        manifest=snakemake.input.manifest,
        task_out=snakemake.output.task,
        classes=snakemake.params.classes,
        balance=snakemake.params.balance,
        seed=snakemake.params.seed,
    )
