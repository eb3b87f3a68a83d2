"""Snakemake adapter: raw files -> manifest.parquet + quarantine.csv."""

from dermcompress.ingest import run_ingest
from dermcompress.logs import job_logging

with job_logging(snakemake):
    run_ingest(
        ground_truth=snakemake.input.ground_truth,
        metadata=snakemake.input.metadata,
        images=snakemake.input.images,
        manifest_out=snakemake.output.manifest,
        quarantine_out=snakemake.output.quarantine,
        max_pixels=snakemake.params.max_pixels,
        max_file_bytes=snakemake.params.max_file_bytes,
        synthetic=snakemake.params.synthetic,
    )
