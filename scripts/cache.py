"""Snakemake adapter: degraded pixel table -> sharded, checksummed parquet cache per split."""

from dermcompress.cache import run_cache
from dermcompress.logs import job_logging

with job_logging(snakemake):
    run_cache(
        degraded=snakemake.input.degraded,
        out_dir=snakemake.output.cache,
        classes=snakemake.params.classes,
        rows_per_shard=snakemake.params.rows_per_shard,
        row_group_size=snakemake.params.row_group_size,
    )
