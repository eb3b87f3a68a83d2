"""Snakemake adapter: task -> grouped, stratified train/val/test split and its report."""

from dermcompress.data.split import run_split
from dermcompress.provenance.logs import job_logging

with job_logging(snakemake):
    run_split(
        task=snakemake.input.task,
        splits_out=snakemake.output.splits,
        report_out=snakemake.output.report,
        group_columns=snakemake.params.group_columns,
        test_fraction=snakemake.params.test_fraction,
        val_fraction=snakemake.params.val_fraction,
        seed=snakemake.params.seed,
    )
