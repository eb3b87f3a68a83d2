"""Snakemake adapter: a trained run's weights + one eval variant's cache -> predictions.parquet and metrics.json
(val and test) in the run's eval/<variant>/ folder."""

from pathlib import Path

from dermcompress.learn.evaluate import run_evaluation
from dermcompress.provenance.logs import exit_now, job_logging

with job_logging(snakemake):
    run_evaluation(
        model_name=snakemake.wildcards.model,
        model_entry=snakemake.params.model,
        weights=snakemake.input.weights,
        train_summary=snakemake.input.summary,
        eval_cache=snakemake.input.cache,
        out_dir=str(Path(snakemake.output.metrics).parent),
        settings=snakemake.params.settings,
        resolution=int(snakemake.wildcards.res),
        splits=snakemake.input.splits,
    )
exit_now()  # the outputs are written: skip the interpreter's slow teardown after torch
