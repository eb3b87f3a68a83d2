"""The pretrain stage through real Snakemake (issue 24): a finished small study (conftest STUDY) plus a tiny
pretraining and an experiment that finetunes and kNN-probes its backbone (conftest PRETRAIN_CHANGE) runs end to
end; a change to the pretraining reruns it and its downstream runs, a downstream lr does not rerun it; lineage
walks from a table row through the pretraining to the raw images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import PRETRAIN_CHANGE, edited, snakemake, write_config
from safetensors import safe_open
from test_reruns import DATA_RULES, dry_run, jobs_of, merge, tables
from test_workflow import kind, rules_of

from dermcompress.data.cache import read_split
from dermcompress.provenance import lineage

pytestmark = pytest.mark.workflow

PRETRAIN = "results/pretrain/tiny_dino"
MODEL_RUNS = {"train", "evaluate", "features", "evaluate_probe"}


@pytest.fixture(scope="module")
def pretrained_study(finished_study, tmp_path_factory) -> Path:
    """A copy of the finished study with PRETRAIN_CHANGE in its config.yaml, run: only the new jobs run."""
    workdir = tmp_path_factory.mktemp("pretrained") / "study"
    shutil.copytree(finished_study, workdir, symlinks=True)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    merge(config, PRETRAIN_CHANGE)
    write_config(workdir / "config.yaml", config)
    snakemake(workdir)
    return workdir


def record(workdir: Path, output: str) -> dict:
    return json.loads(
        (workdir / "results/.lineage/records" / f"{output.removeprefix('results/')}.json").read_text()
    )


def test_a_pretraining_and_runs_of_its_backbone_run_end_to_end(pretrained_study):
    out = pretrained_study / PRETRAIN
    for name in ("backbone.safetensors", "heads.safetensors", "history.csv", "config.json", "pretrain.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "pretrain.json").read_text())
    assert summary["steps"] == 2 and summary["stopped"] == "completed"
    assert (pretrained_study / "results/logs/pretrain/tiny_dino.log").is_file()
    assert (pretrained_study / "results/benchmarks/pretrain/tiny_dino.tsv").is_file()
    # Its spec as the rule passed it: the config's keys over DEFAULT_SPEC, the resolution apart.
    job = record(pretrained_study, f"{PRETRAIN}/backbone.safetensors")
    assert job["rule"] == "pretrain" and job["params"]["resolution"] == 32
    assert job["params"]["spec"]["steps"] == 2 and job["params"]["spec"]["teacher_temp"] == 0.04
    assert job["params"]["caches"] == {"clean": "results/cache/32px/clean"}
    # Every job that builds tiny_derm loads the backbone as a local file in the architecture the pretraining
    # saved it as (its own registry entry), and has it as an input.
    entry = summary["registry_entry"]
    with safe_open(out / "backbone.safetensors", "pt") as f:
        assert f.metadata()["arch"] == entry["arch"] == "timm:test_vit"
    derm = pd.read_csv(pretrained_study / "results/tables/derm.csv")
    assert sorted(derm["mode"]) == ["finetune", "knn"] and set(derm["model"]) == {"tiny_derm"}
    run = next(Path(r) for r in derm.loc[derm["mode"] == "finetune", "runs"].iloc[0].split(";"))
    for output in (
        f"{run.parent.parent}/train.json",
        "results/features/tiny_derm/32px/clean/pretrained/train.parquet",
    ):
        job = record(pretrained_study, output)
        assert job["params"]["model"]["source"] == entry["source"]
        assert job["params"]["model"]["arch"] == entry["arch"]
        assert f"{PRETRAIN}/backbone.safetensors" in {i["path"] for i in job["inputs"]}


def test_a_pretraining_change_reruns_it_and_its_runs_a_downstream_lr_only_its_run(pretrained_study):
    assert dry_run(pretrained_study) == set()
    jobs = dry_run(pretrained_study, {"pretraining": {"tiny_dino": {"lr": 1.0e-3}}})
    assert len(jobs_of(jobs, "pretrain")) == 1 and rules_of(jobs) >= MODEL_RUNS
    assert all("tiny_derm" in " ".join(job[1]) for job in jobs if kind(job[0]) in MODEL_RUNS | {"linear"})
    assert tables(jobs) == {"derm"} and not rules_of(jobs) & DATA_RULES
    # Its code: an edit to the DINO loop's module reruns the pretraining (and so its runs), no other training.
    with edited(pretrained_study / "src/dermcompress/learn/dino.py"):
        assert dry_run(pretrained_study) == jobs
    jobs = dry_run(pretrained_study, {"experiments": {"derm": {"lr": [2.0e-3]}}})
    assert {w["mode"] for w in jobs_of(jobs, "train")} == {"finetune"} and not jobs_of(jobs, "pretrain")
    assert not jobs_of(jobs, "features")


def test_lineage_walks_from_a_table_row_through_the_pretraining_to_the_raw_images(pretrained_study):
    derm = pd.read_csv(pretrained_study / "results/tables/derm.csv")
    for row in range(len(derm)):  # the finetune's and the kNN's rows
        report = lineage.trace(pretrained_study / "results/tables/derm.csv", row=row)
        assert report["broken"] == []
        stages = {kind(s["rule"]): s for s in report["stages"]}
        assert {"pretrain", "resize", "split", "ingest", "synth"} <= set(stages)
        (cache,) = (e["path"] for e in stages["pretrain"]["inputs"] if e["name"] == "cache_clean")
        assert (
            stages["resize"]["outputs"][0]["path"] == cache
        )  # the cache the pretraining read, from raw files
        seen = set(read_split(Path(cache), "train").image_ids)
        named = {r["image_id"]: r["sha256"] for r in report["images"]["by_split"]["train"]}
        assert seen <= set(named) and all(named[i] for i in seen)
