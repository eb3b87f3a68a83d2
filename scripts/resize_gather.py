"""Snakemake adapter: a scattered resize's parts -> the clean variant's cache, as one job writes it."""

from dermcompress.data.cache_write import merge_caches
from dermcompress.data.sources import image_paths
from dermcompress.provenance.logs import job_logging

with job_logging(snakemake):
    merge_caches(
        list(snakemake.input.parts),
        snakemake.output.cache,
        input={"images": ";".join(image_paths(snakemake.input.images))},
    )
