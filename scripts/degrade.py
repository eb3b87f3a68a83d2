"""Snakemake adapter: the clean cache of one resolution -> one variant's cache, each image's degradation recorded."""

from dermcompress.data.degrade import run_degrade
from dermcompress.provenance.logs import job_logging

with job_logging(snakemake):
    run_degrade(
        clean=snakemake.input.clean,
        out_dir=snakemake.output.cache,
        variant=snakemake.params.variant,
        order=snakemake.params.order,
        manifest=snakemake.input.get("manifest"),
        images=snakemake.input.get("images"),
        max_pixels=snakemake.params.max_pixels,
        max_file_bytes=snakemake.params.max_file_bytes,
        threads=snakemake.threads,
    )
