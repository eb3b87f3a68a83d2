"""Snakemake adapter: the data source's raw files -> manifest.parquet + quarantine.csv."""

from dermcompress.data.ingest import run_ingest
from dermcompress.provenance.logs import job_logging

with job_logging(snakemake):
    run_ingest(
        source=snakemake.params.source,
        labels=snakemake.input.get("labels"),
        metadata=snakemake.input.get("metadata"),
        duplicates=snakemake.input.get("duplicates"),
        extra_metadata=snakemake.input.get("extra_metadata"),
        images=snakemake.input.images,
        manifest_out=snakemake.output.manifest,
        quarantine_out=snakemake.output.get("quarantine"),
        max_pixels=snakemake.params.max_pixels,
        max_file_bytes=snakemake.params.max_file_bytes,
        image_types=snakemake.params.image_types,
        synthetic=snakemake.params.synthetic,
        part=snakemake.params.get("part", 0),
        parts=snakemake.params.get("parts", 1),
    )
