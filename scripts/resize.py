"""Snakemake adapter: raw images of the split -> one resolution's resized pixels, as the clean variant's cache."""

from dermcompress.data.resize import run_resize
from dermcompress.provenance.logs import job_logging

with job_logging(snakemake):
    run_resize(
        splits=snakemake.input.splits,
        manifest=snakemake.input.manifest,
        images=snakemake.input.images,
        out_dir=snakemake.output.cache,
        resolution=int(snakemake.wildcards.res),
        policy=snakemake.params.policy,
        reduced_decode=snakemake.params.reduced_decode,
        max_pixels=snakemake.params.max_pixels,
        max_file_bytes=snakemake.params.max_file_bytes,
        classes=snakemake.params.classes,
        rows_per_shard=snakemake.params.rows_per_shard,
        row_group_size=snakemake.params.row_group_size,
        threads=snakemake.threads,
        part=snakemake.params.get("part", 0),
        parts=snakemake.params.get("parts", 1),
    )
