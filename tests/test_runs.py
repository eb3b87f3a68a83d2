"""The run layer's DAG, as Snakemake plans and runs it: each distinct training once, evaluated once per eval
variant; frozen features once for every probe; weights that go away after their evaluations; no checkpoints
left behind; and `dermcompress plan`, which counts it all from the same DAG."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import timm
from conftest import copy_workflow, snakemake, write_config
from safetensors.torch import save_file
from test_workflow import planned_jobs

from dermcompress.study.plan import format_plan, make_plan

pytestmark = pytest.mark.workflow

GRID = {
    "models": ["tiny"],
    "resolutions": [16],
    "train_variants": ["clean"],
    "eval_variants": ["clean"],
    "modes": ["finetune"],
    "lr": [1.0e-3],
    "seeds": [0],
    "reference": {"res": 16},
}
BASE = {
    "resize": {"resolutions": [16]},
    "models": {"tiny": {"source": "timm:resnet10t", "pretrained": False}},
    "degrade": {
        "variants": {
            "clean": {"fractions": {}},
            "degraded": {"fractions": {"jpeg": 0.2, "blur": 0.2, "quantize": 0.2}, "splits": ["train"]},
            "jpeg_only": {"fractions": {"jpeg": 1.0}, "splits": ["train", "val", "test"]},
            "blur_only": {"fractions": {"blur": 1.0}, "splits": ["train", "val", "test"]},
            "quantize_only": {"fractions": {"quantize": 1.0}, "splits": ["train", "val", "test"]},
        }
    },
}


def plan_jobs(workdir: Path, experiments: dict, models: dict | None = None) -> Counter:
    """Jobs per rule that a dry run of `experiments` plans (data stages included)."""
    overlay = {**BASE, "experiments": experiments, "run_experiments": list(experiments)}
    overlay["models"] = {**BASE["models"], **(models or {})}
    write_config(workdir / "grid.yaml", overlay)
    proc = snakemake(workdir, "--dry-run", "--configfile", "grid.yaml")
    return Counter(rule for rule, _ in planned_jobs(proc.stdout + proc.stderr))


def test_a_training_two_experiments_ask_for_is_planned_once(workflow_dir):
    jobs = plan_jobs(
        workflow_dir,
        {"one": GRID, "two": {**GRID, "eval_variants": ["clean", "jpeg_only"], "training": {"log_every": 5}}},
    )
    assert jobs["train"] == 1 and jobs["evaluate"] == 2 and jobs["table"] == 2


def test_a_robustness_grid_trains_each_model_once_and_evaluates_it_per_variant(workflow_dir):
    variants = ["clean", "jpeg_only", "blur_only", "quantize_only"]
    jobs = plan_jobs(
        workflow_dir, {"robust": {**GRID, "train_variants": ["clean", "degraded"], "eval_variants": variants}}
    )
    assert jobs["train"] == 2 and jobs["evaluate"] == 8


def test_features_are_planned_once_for_every_probe_and_label_fraction(workflow_dir):
    """Linear and kNN probes at three label fractions and two seeds read the same three feature tables (the
    train, val and test split of the one variant) of a pretrained backbone; a random one is its seed's."""
    grid = {k: v for k, v in GRID.items() if k != "lr"}
    grid |= {"modes": ["linear", "knn"], "label_fractions": [0.25, 0.5, 1.0], "seeds": [0, 1]}
    (workflow_dir / "models").mkdir()
    save_file(timm.create_model("resnet10t").state_dict(), str(workflow_dir / "models/tiny.safetensors"))
    pretrained = {"saved": {"source": "local:models/tiny.safetensors", "arch": "timm:resnet10t"}}
    jobs = plan_jobs(workflow_dir, {"probes": {**grid, "models": ["saved"]}}, models=pretrained)
    assert jobs["features"] == 3  # train, val, test: seeds and fractions share them
    assert jobs["linear"] == 3 * 2  # fractions x seeds
    # kNN on all labels of a pretrained backbone is one run; on fewer labels the seed draws them.
    assert jobs["evaluate_probe"] == 3 * 2 + (2 * 2 + 1)
    assert jobs["train"] == jobs["evaluate"] == 0
    random_init = plan_jobs(workflow_dir, {"probes": grid})
    assert random_init["features"] == 3 * 2


def test_finished_study_leaves_no_weights_and_no_checkpoints(finished_study):
    """By default a run's weights are temporary (deleted once its evaluations have read them) and finished
    runs delete their checkpoints: results/ holds predictions, metrics and curves, not models."""
    results = finished_study / "results"
    assert not list(results.rglob("weights.safetensors"))
    assert not list(results.rglob("checkpoint.pt"))
    assert list(
        (results / ".lineage/records").rglob("weights.safetensors.json")
    )  # what they were stays on record
    assert list(results.rglob("eval/clean/metrics.json"))


def test_plan_counts_the_study_from_the_dag(tmp_path):
    """`dermcompress plan` on the repository's study: 235 distinct finetunes, one feature extraction per
    model x resolution x variant x split, one GPU submission per training (its evaluations in it), the short
    56 px runs and the feature extractions packed, nothing left on disk at the end; and per experiment what it
    adds to the others (runs shared across experiments are paid once)."""
    workdir = copy_workflow(tmp_path / "wf")
    plan = make_plan(workdir, full_isic2019=True)
    assert plan["trainings"] == 235 and plan["jobs"]["train"] == 235
    assert plan["feature_extractions"] == 3 * 4 + 4 * 5  # 3 pretrained x 4 splits, the random one x 5 seeds
    # 165 trainings at 224 and 112 px alone, the 70 at 56 px four to a pack, the extractions eight to a pack
    assert plan["gpu_submissions"] == 165 + math.ceil(70 / 4) + 32 // 8 < plan["gpu_jobs"]
    sweep = plan["experiments"]["compression_sweep"]
    # 2 models x 3 resolutions x (clean + 3 matched codecs) x 5 seeds; robustness's clean ViT runs at 224 and
    # 56 px are the sweep's (same lr, schedule and epochs), so they are not added.
    assert sweep["trainings"] == 2 * 3 * 4 * 5 and sweep["trainings_added"] == 120 - 2 * 5
    # Each training evaluates on 14 variants (the clean-trained) or on its own codec (the matched arm).
    assert sweep["gpu_jobs"] == 120 + 2 * 3 * 5 * 14 + 3 * 2 * 3 * 5
    assert plan["experiments"]["robustness"]["trainings_added"] == 0  # all shared with the sweeps
    assert 0 < sweep["gpu_hours_added"] < sweep["gpu_hours"] < plan["gpu_hours"]
    assert sum(c["trainings_added"] for c in plan["experiments"].values()) < plan["trainings"]
    assert "compression_sweep: trainings 120 (added 110)" in format_plan(plan)
    assert plan["disk"]["weights_end_gb"] == plan["disk"]["checkpoints_end_gb"] == 0
    assert plan["split_sizes"] == {"train": 6511, "val": 724, "test": 1809}
    assert plan["image_passes_forward_backward"] > 0 and plan["gpu_hours"] > 0
    assert json.loads(json.dumps(plan)) == plan  # JSON-ready, as `dermcompress plan --json` prints it
