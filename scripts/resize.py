"""Snakemake adapter: raw images of the split -> one resolution's resized pixel table."""

from dermcompress.logs import job_logging
from dermcompress.resize import run_resize

with job_logging(snakemake):
    run_resize(
        splits=snakemake.input.splits,
        manifest=snakemake.input.manifest,
        images=snakemake.input.images,
        out=snakemake.output.resized,
        resolution=int(snakemake.wildcards.res),
        policy=snakemake.params.policy,
        reduced_decode=snakemake.params.reduced_decode,
        max_pixels=snakemake.params.max_pixels,
        max_file_bytes=snakemake.params.max_file_bytes,
        threads=snakemake.threads,
    )
