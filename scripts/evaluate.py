"""Snakemake adapter: a trained run's weights + each of its eval variants' caches -> predictions.parquet and
metrics.json (val and test) in the run's eval/<variant>/ folders, the model loaded once."""

from pathlib import Path

from dermcompress.learn.evaluate import run_evaluations
from dermcompress.learn.runs import parse_run_dir
from dermcompress.provenance.logs import exit_now, job_logging

inputs, outputs = snakemake.input, snakemake.output
run = parse_run_dir(f"results/runs/{snakemake.wildcards.run}")
with job_logging(snakemake):
    run_evaluations(
        model_name=run.model,
        model_entry=snakemake.params.model,
        weights=inputs.weights,
        train_summary=inputs.summary,
        evaluations={
            v: (inputs[f"cache_{v}"], str(Path(outputs[f"metrics_{v}"]).parent))
            for v in snakemake.params.variants
        },
        settings=snakemake.params.settings,
        resolution=run.res,
        splits=inputs.splits,
    )
exit_now()  # the outputs are written: skip the interpreter's slow teardown after torch
