"""Snakemake adapter: the splits of one cache variant through a frozen backbone (built once) -> a features table
per split."""

from dermcompress.learn.features import run_features
from dermcompress.learn.runs import parse_features_dir
from dermcompress.provenance.logs import exit_now, job_logging

key = parse_features_dir(f"results/features/{snakemake.wildcards.features}")
with job_logging(snakemake):
    run_features(
        model_name=key["model"],
        model_entry=snakemake.params.model,
        cache_dir=snakemake.input.cache,
        outputs={split: snakemake.output[split] for split in snakemake.params.splits},
        settings=snakemake.params.settings,
        resolution=key["res"],
        seed=snakemake.params.seed,
    )
exit_now()  # the outputs are written: skip the interpreter's slow teardown after torch
