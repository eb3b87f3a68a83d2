"""Snakemake adapter: generate the synthetic ISIC 2019 stand-in (only when data.isic_root is unset)."""

from pathlib import Path

from dermcompress.logs import job_logging
from dermcompress.sources import SYNTHETIC_BANNER
from dermcompress.synth import make_synthetic

with job_logging(snakemake) as log:
    log.warning(SYNTHETIC_BANNER)
    make_synthetic(
        Path(snakemake.output.ground_truth).parent, n=snakemake.params.n, seed=snakemake.params.seed
    )
