"""Snakemake adapter: one split of one cache variant through a frozen backbone -> a features table."""

from dermcompress.learn.features import run_features
from dermcompress.provenance.logs import exit_now, job_logging

with job_logging(snakemake):
    run_features(
        model_name=snakemake.wildcards.model,
        model_entry=snakemake.params.model,
        cache_dir=snakemake.input.cache,
        split=snakemake.wildcards.split,
        out=snakemake.output[0],
        settings=snakemake.params.settings,
        resolution=int(snakemake.wildcards.res),
        seed=snakemake.params.seed,
    )
exit_now()  # the outputs are written: skip the interpreter's slow teardown after torch
