"""Snakemake adapter: generate the synthetic stand-in in the data source's layout (only when data.isic_root
is unset)."""

from dermcompress.data.sources import SYNTHETIC_BANNER
from dermcompress.data.synth import make_synthetic
from dermcompress.provenance.logs import job_logging

with job_logging(snakemake) as log:
    log.warning(SYNTHETIC_BANNER)
    make_synthetic(
        snakemake.params.root,
        n=snakemake.params.n,
        seed=snakemake.params.seed,
        source=snakemake.params.source,
        planted=snakemake.params.planted,
    )
