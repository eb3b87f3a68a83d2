"""Snakemake adapter: a linear probe's head, or a kNN bank, on each of its eval variants' frozen val and test
features -> predictions.parquet and metrics.json in the run's eval/<variant>/ folders."""

from pathlib import Path

from dermcompress.learn.probes import run_probe_evaluations
from dermcompress.learn.runs import parse_run_dir
from dermcompress.provenance.logs import exit_now, job_logging

inputs, outputs = snakemake.input, snakemake.output
with job_logging(snakemake):
    run_probe_evaluations(
        mode=parse_run_dir(f"results/runs/{snakemake.wildcards.run}").mode,
        evaluations={
            v: (
                {"val": inputs[f"eval_val_{v}"], "test": inputs[f"eval_test_{v}"]},
                str(Path(outputs[f"metrics_{v}"]).parent),
            )
            for v in snakemake.params.variants
        },
        splits=inputs.splits,
        settings=snakemake.params.settings,
        head=inputs.get("head"),
        train_summary=inputs.get("summary"),
        bank_features=inputs.get("bank"),
        choose_features=inputs.get("choose"),
    )
exit_now()  # the outputs are written: skip the interpreter's slow teardown after torch
