"""Snakemake adapter: generate the synthetic stand-in in the data source's layout (only when data.isic_root
is unset)."""

from dermcompress.logs import job_logging
from dermcompress.sources import SYNTHETIC_BANNER
from dermcompress.synth import make_synthetic

with job_logging(snakemake) as log:
    log.warning(SYNTHETIC_BANNER)
    make_synthetic(
        snakemake.params.root,
        n=snakemake.params.n,
        seed=snakemake.params.seed,
        source=snakemake.params.source,
    )
