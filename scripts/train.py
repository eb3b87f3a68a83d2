"""Snakemake adapter: one training run through the backbone (finetune, freeze_blocks, lora) -> weights, history,
config and train.json in the run folder. A Preempted exception (SIGTERM/SIGINT/SIGUSR1, checkpoint saved) fails
the job on purpose: Snakemake's retry then resumes from the checkpoint. With N > 1 GPUs (resource `gpu`) the
script first replaces itself by torchrun, which runs it on N ranks (distributed.py)."""

from pathlib import Path

from dermcompress.learn.distributed import relaunch_under_torchrun
from dermcompress.learn.train import run_training
from dermcompress.provenance.logs import exit_now, job_logging

relaunch_under_torchrun(snakemake.resources.gpu)
with job_logging(snakemake):
    run_training(
        model_name=snakemake.wildcards.model,
        model_entry=snakemake.params.model,
        train_cache=snakemake.input.cache,
        run_dir=str(Path(snakemake.output.summary).parent),
        checkpoint_dir=snakemake.params.checkpoint_dir,
        settings=snakemake.params.settings,
        resolution=int(snakemake.wildcards.res),
        splits=snakemake.input.splits,
        weights_path=snakemake.output.weights,
    )
exit_now()  # the outputs are written: skip the interpreter's slow teardown after torch
