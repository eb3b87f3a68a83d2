"""Snakemake adapter: one resolution x one variant -> degraded pixel table with a per-image record."""

from dermcompress.degrade import run_degrade
from dermcompress.logs import job_logging

with job_logging(snakemake):
    run_degrade(
        out=snakemake.output.degraded,
        splits=snakemake.input.splits,
        manifest=snakemake.input.manifest,
        variant=snakemake.params.variant,
        order=snakemake.params.order,
        resolution=int(snakemake.wildcards.res),
        resized=snakemake.input.get("resized"),
        images=snakemake.input.get("images"),
        policy=snakemake.params.policy,
        reduced_decode=snakemake.params.reduced_decode,
        max_pixels=snakemake.params.max_pixels,
        threads=snakemake.threads,
    )
