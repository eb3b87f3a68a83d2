"""Shared fixtures: a private copy of the workflow to run Snakemake in, and a helper to call it."""

from __future__ import annotations

import os
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


# Fixtures built once per session and shared across modules: under pytest-xdist (`make test` runs two workers),
# every module that uses one must run on the same worker, or each worker would build it again.
SESSION_FIXTURES = ("finished_study", "planted_study")


def xdist_groups(test_dir: Path = Path(__file__).parent) -> dict[str, str]:
    """Test module (path relative to the rootdir, as in a test id) -> the group of modules that must share a
    worker: each module on its own, except those that name the same session fixture (merged, transitively)."""
    parent: dict[str, str] = {}

    def root(node: str) -> str:
        while parent.setdefault(node, node) != node:
            node = parent[node]
        return node

    modules = [f"{test_dir.name}/{path.name}" for path in sorted(test_dir.glob("test_*.py"))]
    for module in modules:
        source = (test_dir.parent / module).read_text()
        for name in SESSION_FIXTURES:
            if name in source:  # a fixture is requested by its name
                parent[root(module)] = root(name)
    return {module: root(module) for module in modules}


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`make test`'s scheduler: whole groups of modules (xdist_groups) to a worker, in collection order. (xdist's
    own `--dist loadgroup` marks do not group under pytest 9, whose test ids no longer take its suffix.)"""
    from xdist.scheduler import LoadScopeScheduling

    groups = xdist_groups()

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return groups.get(module, module)

    return ModuleGroups(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the heaviest groups first (the SLURM module, then the session studies, then the other
    workflow runs), so that the two workers finish together; the order within a group is kept."""
    if not hasattr(config, "workerinput"):
        return
    groups = xdist_groups()
    weight: dict[str, tuple[bool, bool, bool]] = {}
    for item in items:
        group = groups.get(item.nodeid.split("::", 1)[0], "")
        marks = (item.get_closest_marker("slurm") is not None, group in SESSION_FIXTURES)
        marks += (item.get_closest_marker("workflow") is not None,)
        weight[group] = max(weight.get(group, marks), marks)
    items.sort(key=lambda item: weight[groups.get(item.nodeid.split("::", 1)[0], "")], reverse=True)


def copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    return dest


# A change to what a module does (a comment or a docstring is none: code fingerprints hash the syntax tree).
CODE_EDIT = "\nAN_EDIT = True\n"


@contextmanager
def edited(module: Path, edit: str = CODE_EDIT) -> Iterator[None]:
    """`module` with `edit` appended (by default a statement: a change of its code, so of every code fingerprint
    over it), then restored."""
    original = module.read_text()
    try:
        module.write_text(original + edit)
        yield
    finally:
        module.write_text(original)


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    """Bit rot: one bit of the file flipped in place, its size and mtime kept (what a stat shows stays put)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


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


# STUDY plus a tiny domain pretraining (timm's 0.3M-parameter test_vit from scratch, 2 steps at 32 px on the clean
# cache's train split) and an experiment that finetunes and kNN-probes its backbone: what adding the stage to a
# finished study looks like (test_reruns.py, test_pretrain_workflow.py).
PRETRAIN_CHANGE = {
    "pretraining": {
        "tiny_dino": {
            "resolution": 32,
            "arch": "timm:test_vit",
            "steps": 2,
            "batch_size": 8,
            "warmup_epochs": 0,
            "out_dim": 64,
            "hidden_dim": 32,
            "bottleneck_dim": 16,
            "local_crops": {"n": 2},
            "knn_k": 5,
            "log_every": 1,
        }
    },
    "models": {"tiny_derm": {"source": "pretrain:tiny_dino"}},
    "experiments": {
        "derm": {
            "models": ["tiny_derm"],
            "resolutions": [32],
            "train_variants": ["clean"],
            "eval_variants": ["clean"],
            "modes": ["finetune", "knn"],
            "lr": [1.0e-3],
            "seeds": [0],
            "reference": {"mode": "knn"},
        }
    },
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


# The planted study (tests/test_planted.py): a data set with effects of known size, written by `dermcompress synth
# --planted` and read as a user's own data (data.isic_root), so it also stands for real data in the rerun tests.
# The fine sign is a texture of 10 periods per side: 32 px shows it, JPEG q30 and 16 px remove it. Women's MEL
# lesions all carry it and none the veil (ideal AUC 1.0 with it, 0.5 without); men's half carry it and 60% the
# veil (0.90 and 0.80): compression costs women more. At 16 px no image of either class shows it, and a model
# trained there never saw it: codecs at 16 px are the null arm.
PLANTED = {
    "coarse": 0.6,
    "fine": 0.5,
    "cycles": 10,
    "contrast": 0.3,
    "subgroup": {"column": "sex", "value": "female", "coarse": 0.0, "fine": 1.0},
}
# 2500 images -> 892 after MEL/NV balancing: 625 train, 89 val, 178 test (82 women's, 87 men's, 9 unknown).
PLANTED_SYNTH = {"n": 2500, "seed": 0}
_GRID = {
    "models": ["tiny"],
    "resolutions": [32, 16],
    "train_variants": ["clean"],
    "eval_variants": ["clean", "jpeg_q75", "jpeg_q30"],
    "modes": ["finetune"],
    "lr": [1.0e-3],
    "schedules": ["cosine"],
    "epochs": [5],
    "seeds": [0],
}
PLANTED_STUDY = {
    "data": {"isic_root": "planted-data"},
    "resize": {"resolutions": [32, 16]},
    "degrade": {
        "variants": {
            "clean": {"fractions": {}},
            "jpeg_q75": {"codec": {"format": "jpeg", "quality": 75}, "splits": ["test"]},
            "jpeg_q30": {"codec": {"format": "jpeg", "quality": 30}, "splits": ["test"]},
        }
    },
    "cache": {"rows_per_shard": 512, "row_group_size": 64},
    "models": {"tiny": {"source": "timm:resnet10t", "pretrained": False}},
    # Batches of 32: 625 training images leave a last batch of 17 (one of 1 would stop BatchNorm).
    "training": {"batch_size": 32, "epochs": 5, "n_bootstrap": 500},
    # Two tables of the same two trainings: codecs against clean at each resolution (same models), and 16 px
    # against 32 px (recipe). The codec table's interaction: each codec's cost at 32 px minus its cost at 16 px
    # (a difference of contrasts, planted: the texture JPEG q30 removes is only visible at 32 px).
    "experiments": {
        "planted_codecs": {
            **_GRID,
            "description": "Planted effects: JPEG against clean at 32 px (planted cost) and at 16 px (null arm)",
            "reference": {"train_variant": "clean", "eval_variant": "clean"},
            "interaction": {"res": 16},
        },
        "planted_resolution": {
            **_GRID,
            "eval_variants": ["clean"],
            "description": "Planted effects: 16 px against 32 px",
            "reference": {"res": 32, "train_variant": "clean", "eval_variant": "clean"},
        },
    },
    "run_experiments": ["planted_codecs", "planted_resolution"],
}


@pytest.fixture(scope="session")
def planted_study(tmp_path_factory) -> Path:
    """A finished run of PLANTED_STUDY on data `dermcompress synth --planted` wrote into its planted-data/."""
    workdir = copy_workflow(tmp_path_factory.mktemp("planted"))
    synth = {"data": {"synthetic": {**PLANTED_SYNTH, "planted": PLANTED}}}
    write_config(workdir / "synth.yaml", synth)
    cli = [sys.executable, "-m", "dermcompress.cli", "synth", "planted-data", "--planted", "synth.yaml"]
    cli += ["--n", str(PLANTED_SYNTH["n"]), "--seed", str(PLANTED_SYNTH["seed"])]
    done = subprocess.run(cli, cwd=workdir, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"dermcompress synth failed:\n{done.stderr}")
    write_config(workdir / "planted.yaml", PLANTED_STUDY)
    snakemake(workdir, "--configfile", "planted.yaml", "--resources", "gpu=2")
    return workdir
