"""Snakemake adapter: one domain self-supervised pretraining (learn/pretrain.py) -> the teacher backbone, heads,
history, config and pretrain.json in the folder of `output.backbone`. A Preempted exception (SIGTERM/SIGINT/
SIGUSR1, checkpoint saved) fails the job on purpose: the retry resumes from the checkpoint; with N > 1 GPUs
(resource `gpu`) the script first replaces itself by torchrun (distributed.py).

What the rule passes:
    params.spec            the `pretraining:` entry (run_pretraining fills the defaults)
    params.init_model      the registry entry of the init model, or None for init: scratch
    params.caches          {variant: cache folder} of the spec's variants (each also an input, so the DAG edge is
                           real); the map says which cache is which variant
    params.checkpoint_dir  where the resume checkpoint lives while the job runs
    params.resolution      the cached resolution
    input.splits           splits.parquet (the leakage check)
    output.backbone        <out_dir>/backbone.safetensors
    wildcards.name         the pretraining's name
"""

from pathlib import Path

from dermcompress.learn.distributed import relaunch_under_torchrun
from dermcompress.learn.pretrain import run_pretraining
from dermcompress.provenance.logs import exit_now, job_logging

relaunch_under_torchrun(snakemake.resources.gpu)
with job_logging(snakemake):
    run_pretraining(
        name=snakemake.wildcards.name,
        spec=snakemake.params.spec,
        init_entry=snakemake.params.init_model,
        caches=dict(snakemake.params.caches),
        splits=snakemake.input.splits,
        out_dir=str(Path(snakemake.output.backbone).parent),
        checkpoint_dir=snakemake.params.checkpoint_dir,
        resolution=int(snakemake.params.resolution),
    )
exit_now()  # the outputs are written: skip the interpreter's slow teardown after torch
