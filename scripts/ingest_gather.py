"""Snakemake adapter: a scattered ingest's parts -> manifest.parquet + quarantine.csv, as one job writes them."""

from dermcompress.data.manifest import gather_ingest
from dermcompress.provenance.logs import job_logging

with job_logging(snakemake):
    gather_ingest(
        list(snakemake.input.parts),
        manifest_out=snakemake.output.manifest,
        quarantine_out=snakemake.output.quarantine,
    )
