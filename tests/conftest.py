"""Shared fixtures: a private copy of the workflow to run Snakemake in, and a helper to call it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# What a workflow run needs; copied so tests never touch the repository's own results/ or sources.
WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "scripts", "src", "envs", "profiles")


def copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    return dest


@contextmanager
def edited(module: Path) -> Iterator[None]:
    """`module` with a comment added (a change of its source, so of every code fingerprint over it), then restored."""
    original = module.read_text()
    try:
        module.write_text(original + "\n# an edit\n")
        yield
    finally:
        module.write_text(original)


def write_config(path: Path, overlay: dict) -> Path:
    path.write_text(yaml.safe_dump(overlay, sort_keys=False))
    return path


def snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run the real snakemake CLI in `workdir`; on an unexpected failure show its whole output."""
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--directory", str(workdir), *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def workflow_dir(tmp_path: Path) -> Path:
    return copy_workflow(tmp_path / "wf")


# A whole small study: synthetic data at two resolutions, two experiments of one tiny untrained model, aggregation.
# Run once per session and shared by the lineage and rerun tests, which only read it (or copy it first).
STUDY = {
    "data": {"synthetic": {"n": 120, "seed": 3}},
    "resize": {"resolutions": [32, 16]},
    "degrade": {
        "variants": {
            "clean": {"fractions": {}},
            "degraded": {"fractions": {"jpeg": 0.2, "blur": 0.2, "quantize": 0.2}, "splits": ["train"]},
        }
    },
    "cache": {"rows_per_shard": 16, "row_group_size": 8},
    "models": {"tiny": {"source": "timm:resnet10t", "pretrained": False}},
    "training": {"batch_size": 16, "epochs": 1, "n_bootstrap": 20, "probe": {"iterations": 50}},
    "experiments": {
        "base": {
            "models": ["tiny"],
            "resolutions": [16],
            "train_variants": ["degraded"],
            "eval_variants": ["clean"],
            "modes": ["finetune"],
            "lr": [1.0e-3],
            "seeds": [0],
            "reference": {"res": 16},
        },
        "other": {
            "models": ["tiny"],
            "resolutions": [16],
            "train_variants": ["clean"],
            "eval_variants": ["clean"],
            "modes": ["linear"],
            "seeds": [0],
            "reference": {"res": 16},
        },
    },
    "run_experiments": "all",
}


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory) -> Path:
    """A finished run of STUDY: the repository's config.yaml with STUDY merged in (models, experiments replaced)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("study"))
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    for key, value in STUDY.items():
        merge = isinstance(value, dict) and key not in ("models", "experiments")
        config[key] = {**config[key], **value} if merge else value
    write_config(workdir / "config.yaml", config)
    snakemake(workdir)
    return workdir


def tiny_dinov2_config():
    """A 2-layer, 32-wide DINOv2 (14 px patches): the transformers code path at test size."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=56,
        patch_size=14,
    )


def learnable_cache(root: Path, *, res: int = 32, seed: int = 0, classes=("MEL", "NV")) -> tuple[Path, Path]:
    """A tiny cache, 48 train / 16 val / 16 test images, balanced, NV brighter than MEL (so a model can learn),
    in lesion groups of two images of one class; returns (cache folder, splits.parquet with those groups)."""
    from dermcompress.data.cache_write import run_cache
    from dermcompress.data.pixeltable import write_pixel_table

    rng = np.random.default_rng(seed)
    splits = ["train"] * 48 + ["val"] * 16 + ["test"] * 16
    labels = np.tile([0, 1], len(splits) // 2)
    base = np.where(labels == 1, 150, 40)[:, None, None, None]
    pixels = (base + rng.integers(0, 70, (len(splits), res, res, 3))).astype(np.uint8)
    meta = pd.DataFrame(
        {
            "image_id": [f"ISIC_{i:07d}" for i in rng.permutation(len(splits))],
            "label": [classes[i] for i in labels],
            "split": splits,
            "degradation": "none",
            "degradation_params": "{}",
        }
    )
    # Rows i and i + 2 share a class (labels alternate), and blocks of four never straddle two splits.
    groups = [f"IL_{(i // 4) * 2 + i % 2:07d}" for i in range(len(splits))]
    split_table = meta[["image_id", "label", "split"]].assign(group_id=groups)
    split_table[["image_id", "group_id", "label", "split"]].to_parquet(root / "splits.parquet", index=False)
    write_pixel_table(
        root / "pixels.parquet", meta, pixels, metadata={"resolution": str(res), "variant": "clean"}
    )
    run_cache(
        degraded=root / "pixels.parquet",
        out_dir=root / "cache",
        classes=list(classes),
        rows_per_shard=32,
        row_group_size=16,
    )
    return root / "cache", root / "splits.parquet"
