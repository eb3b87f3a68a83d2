# Helpers shared by every rule: where the raw data are, what the final targets are, code fingerprints.
import os
import sys
from pathlib import Path

# The package under src/ holds all logic. Make it importable here and in every job, installed or not.
SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
# (This sets PYTHONPATH rather than requiring it: jobs inherit it, locally and through SLURM.)
os.environ.update(
    PYTHONPATH=os.pathsep.join(p for p in (SRC, os.getenv("PYTHONPATH")) if p)
)

from dermcompress import config as dc_config
from dermcompress import experiments, sources
from dermcompress.fingerprint import module_fingerprint

dc_config.check(config)

SYNTHETIC = config["data"]["isic_root"] is None
ISIC_ROOT = "results/data/synthetic" if SYNTHETIC else config["data"]["isic_root"]
RESOLUTIONS = [int(r) for r in config["resize"]["resolutions"]]
VARIANTS = list(config["degrade"]["variants"])
RUNS = experiments.expand_runs(config)
RUN_DIR = experiments.RUN_DIR
CHECKPOINT_DIR = experiments.CHECKPOINT_DIR
# The run's path below results/runs/, reused for its log and benchmark.
RUN_ID = RUN_DIR.removeprefix("results/runs/")


wildcard_constraints:
    res="|".join(str(r) for r in RESOLUTIONS),
    variant="|".join(VARIANTS),
    train_variant="|".join(VARIANTS),
    eval_variant="|".join(VARIANTS),
    experiment="|".join(config["experiments"]) or "^$",
    model="|".join(config["models"]) or "^$",
    mode="finetune|linear|knn|freeze_blocks|lora",
    lr=r"[0-9.e+-]+",
    seed=r"\d+",


onstart:
    if SYNTHETIC:
        logger.warning(sources.SYNTHETIC_BANNER)


def get_code(module):
    """Fingerprint of a package module and everything it imports from the package.

    Passed as a param, so that editing e.g. dermcompress/degrade.py reruns degradation and what follows,
    which Snakemake cannot see on its own (it only tracks the script file).
    """
    return module_fingerprint(f"dermcompress.{module}")


def get_raw_inputs():
    """The official files: ground truth, metadata and the image folder or zip (or the synthetic ones)."""
    if SYNTHETIC:
        return sources.official_paths(ISIC_ROOT, prefer="folder")
    return sources.official_paths(ISIC_ROOT)


def get_degrade_input(wildcards):
    """Degrading after resizing reads the resized images; before resizing, the raw ones."""
    inputs = {
        "splits": "results/data/splits.parquet",
        "manifest": "results/data/manifest.parquet",
    }
    if config["degrade"]["order"] == "after_resize":
        inputs["resized"] = f"results/resized/{wildcards.res}px.parquet"
    else:
        inputs["images"] = get_raw_inputs()["images"]
    return inputs


def get_variant(wildcards):
    """The settings of one data variant, with the shared degradation parameters."""
    return dc_config.variant_settings(config, wildcards.variant)


def get_model_entry(wildcards):
    """The registry entry of the run's model (config `models:`)."""
    return config["models"][wildcards.model]


def get_run_settings(wildcards):
    """Training defaults, overridden by the experiment's, then the run's mode, lr and seed."""
    return experiments.run_settings(
        config, wildcards.experiment, wildcards.mode, wildcards.lr, wildcards.seed
    )


def get_final_outputs():
    return [
        "results/data/split_report.json",
        *expand("results/cache/{res}px/{variant}", res=RESOLUTIONS, variant=VARIANTS),
        *(f"{run.run_dir}/metrics.json" for run in RUNS),
    ]
