"""Snakemake adapter: a linear probe's head, or a kNN bank, on one eval variant's frozen val and test features ->
predictions.parquet and metrics.json in the run's eval/<variant>/ folder."""

from pathlib import Path

from dermcompress.learn.probes import run_probe_evaluation
from dermcompress.provenance.logs import exit_now, job_logging

inputs = snakemake.input
with job_logging(snakemake):
    run_probe_evaluation(
        mode=snakemake.wildcards.mode,
        eval_features={"val": inputs.eval_val, "test": inputs.eval_test},
        splits=inputs.splits,
        settings=snakemake.params.settings,
        out_dir=str(Path(snakemake.output.metrics).parent),
        head=inputs.get("head"),
        train_summary=inputs.get("summary"),
        bank_features=inputs.get("bank"),
        choose_features=inputs.get("choose"),
    )
exit_now()  # the outputs are written: skip the interpreter's slow teardown after torch
