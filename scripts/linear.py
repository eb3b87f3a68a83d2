"""Snakemake adapter: frozen train and val features -> a linear probe run (the best of many heads, on val)."""

from pathlib import Path

from dermcompress.learn.probes import run_linear
from dermcompress.provenance.logs import exit_now, job_logging

with job_logging(snakemake):
    run_linear(
        train_features=snakemake.input.train,
        val_features=snakemake.input.val,
        splits=snakemake.input.splits,
        settings=snakemake.params.settings,
        run_dir=str(Path(snakemake.output.summary).parent),
    )
exit_now()  # the outputs are written: skip the interpreter's slow teardown after torch
