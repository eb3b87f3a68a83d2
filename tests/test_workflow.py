"""The data half of the workflow, run for real with Snakemake on synthetic data, and its rerun behaviour."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import copy_workflow, edited, snakemake, write_config

from dermcompress.data.cache import load_info, read_split
from dermcompress.learn.runs import parse_eval_dir

pytestmark = pytest.mark.workflow

RESOLUTIONS = [32, 16]
OVERLAY = {
    "data": {"synthetic": {"n": 160, "seed": 3}},
    "resize": {"resolutions": RESOLUTIONS},
    "cache": {"rows_per_shard": 16, "row_group_size": 8},
    "run_experiments": [],
}


class PlannedJob(tuple):
    """(rule, wildcards) of a planned job, compared as such; `outputs` holds the files it would write."""

    outputs: tuple[str, ...] = ()


def planned_jobs(dry_run_output: str) -> set[PlannedJob]:
    """(rule, wildcards) of every job a `snakemake --dry-run` would run, each with its outputs."""
    jobs, rule, wildcards, outputs = set(), None, (), ()

    def add() -> None:
        job = PlannedJob((rule, wildcards))
        job.outputs = outputs
        jobs.add(job)

    for line in dry_run_output.splitlines():
        if match := re.match(r"^(?:local)?rule (\w+):$", line.strip()):
            if rule:
                add()
            rule, wildcards, outputs = match.group(1), (), ()
        elif rule and (match := re.match(r"^wildcards: (.*)$", line.strip())):
            wildcards = tuple(sorted(w.strip() for w in match.group(1).split(",")))
        elif rule and (match := re.match(r"^output: (.*)$", line.strip())):
            outputs = tuple(o.strip() for o in match.group(1).split(","))
    if rule:
        add()
    return jobs


def kind(rule: str) -> str:
    """A rule's kind: train.smk makes one evaluation or features rule per set of what its jobs write
    (`evaluate__clean__jpeg_q75`, `features__train__val`), each of kind `evaluate` or `features`."""
    return rule.split("__")[0]


def rules_of(jobs) -> set[str]:
    """The kinds of rule among planned jobs."""
    return {kind(rule) for rule, _ in jobs}


def evaluations_of(jobs, of: str = "evaluate") -> list[dict[str, str]]:
    """Each evaluation the jobs of a kind (evaluate, evaluate_probe) would write: the run's RUN_DIR wildcards and
    the eval variant, one per metrics.json among each job's outputs, sorted."""
    found = []
    for job in jobs:
        if kind(job[0]) == of:
            for path in (o for o in job.outputs if o.endswith("/metrics.json")):
                evaluation = parse_eval_dir(Path(path).parent)
                run = {k: str(v) for k, v in evaluation.run.wildcards().items()}
                found.append({**run, "eval_variant": evaluation.eval_variant})
    return sorted(found, key=lambda e: sorted(e.items()))


# config.yaml's own variants, one of each kind: the mixes, the single operations and one of each codec family; every
# path of the data half at half the degrade jobs (one per variant and resolution) of all eighteen.
VARIANTS = (
    "clean",
    "degraded",
    "jpeg_only",
    "blur_only",
    "quantize_only",
    "jpeg_q30",
    "webp_q60",
    "avif_q60",
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("data-run"))
    # In config.yaml itself: a --configfile merges into config.yaml's variants and cannot drop one.
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["degrade"]["variants"] = {v: config["degrade"]["variants"][v] for v in VARIANTS}
    write_config(workdir / "config.yaml", config)
    write_config(workdir / "test.yaml", OVERLAY)
    snakemake(workdir, "--configfile", "test.yaml")
    return workdir


def dry_run(workdir: Path, overlay: dict | None = None) -> set:
    name = "test.yaml"
    if overlay is not None:
        merged = json.loads(json.dumps(OVERLAY))
        for key, value in overlay.items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
        name = "changed.yaml"
        write_config(workdir / name, merged)
    proc = snakemake(workdir, "--dry-run", "--configfile", name)
    return planned_jobs(proc.stdout + proc.stderr)


def test_data_stages_write_every_contracted_file(finished):
    data = finished / "results/data"
    manifest = pd.read_parquet(data / "manifest.parquet")
    assert manifest["image_id"].is_unique
    assert set(manifest["status"]) <= {"ok", "quarantined"}
    assert manifest["synthetic"].all()
    ok = (manifest["status"] == "ok").sum()
    log = (finished / "results/logs/ingest.log").read_text()
    assert f"listed={len(manifest)} ok={ok} quarantined={len(manifest) - ok}" in log
    assert "SYNTHETIC" in (finished / "results/logs/synth.log").read_text()

    splits = pd.read_parquet(data / "splits.parquet")
    assert list(splits.columns) == ["image_id", "group_id", "label", "split"]
    assert set(splits["split"]) == {"train", "val", "test"}
    assert splits.groupby("group_id")["split"].nunique().max() == 1
    report = json.loads((data / "split_report.json").read_text())
    assert report["groups_shared_across_splits"] == 0
    assert splits["label"].value_counts().nunique() == 1  # balanced MEL vs NV


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_caches_hold_every_split_image_at_each_resolution(finished, res):
    splits = pd.read_parquet(finished / "results/data/splits.parquet")
    for variant in ("clean", "degraded"):
        cache = finished / f"results/cache/{res}px/{variant}"
        info = load_info(cache)
        assert info["classes"] == ["MEL", "NV"]
        for split, expected in splits.groupby("split"):
            part = read_split(cache, split)
            assert part.pixels.shape == (len(expected), res, res, 3)
            assert sorted(part.image_ids) == sorted(expected["image_id"])
    clean = read_split(finished / f"results/cache/{res}px/clean", "train")
    degraded = read_split(finished / f"results/cache/{res}px/degraded", "train")
    assert set(clean.degradations) == {"none"}
    assert {"jpeg", "blur", "quantize"} <= set(degraded.degradations)
    test_part = read_split(finished / f"results/cache/{res}px/degraded", "test")
    assert set(test_part.degradations) == {"none"}  # the study degrades training images only
    # The clean cache is the resized pixels, and every image the degraded variant left alone is exactly those.
    resized = dict(zip(clean.image_ids, clean.pixels, strict=True))
    for image_id, img, op in zip(degraded.image_ids, degraded.pixels, degraded.degradations, strict=True):
        if op == "none":
            assert (img == resized[image_id]).all()
        else:
            assert img.shape == resized[image_id].shape


def test_pixels_are_stored_once_per_variant_and_resolution(finished):
    """No intermediate pixel tables: the caches are the only files that hold pixels."""
    variants = yaml.safe_load((finished / "config.yaml").read_text())["degrade"]["variants"]
    holding_pixels = {
        path.relative_to(finished / "results").parts[:3]
        for path in (finished / "results").rglob("*.parquet")
        if "pixels" in pq.read_schema(path).names
    }
    assert holding_pixels == {("cache", f"{res}px", v) for res in RESOLUTIONS for v in variants}


def test_nothing_changed_nothing_planned(finished):
    assert dry_run(finished) == set()


def test_new_jpeg_quality_reruns_only_the_degraded_variant(finished):
    jobs = dry_run(finished, {"degrade": {"jpeg_quality": 50}})
    # Each variant's degrade job writes its cache; the bytes summary reads the caches, the data summary does not.
    assert rules_of(jobs) == {"degrade", "bytes_summary", "all"}
    # The variants that JPEG-compress: the study's mix and the robustness experiment's jpeg_only.
    assert {wc for rule, wc in jobs if rule == "degrade"} == {
        (f"res={res}", f"variant={variant}") for res in RESOLUTIONS for variant in ("degraded", "jpeg_only")
    }


def test_new_codec_quality_reruns_its_variant_and_the_bytes_summary_only(finished):
    """A transmission codec is applied after resizing: a new quality re-encodes that variant's caches, and the
    bytes summary (which reads the caches) follows; the data summary reads only manifest and split and stands."""
    variants = yaml.safe_load((finished / "config.yaml").read_text())["degrade"]["variants"]
    changed = {**variants["webp_q60"], "codec": {**variants["webp_q60"]["codec"], "quality": 55}}
    jobs = dry_run(finished, {"degrade": {"variants": {**variants, "webp_q60": changed}}})
    assert rules_of(jobs) == {"degrade", "bytes_summary", "all"}
    assert {wc for rule, wc in jobs if rule == "degrade"} == {
        (f"res={res}", "variant=webp_q60") for res in RESOLUTIONS
    }


def test_new_resolution_reruns_only_its_resize_and_downstream(finished):
    jobs = dry_run(finished, {"resize": {"resolutions": [*RESOLUTIONS, 8]}})
    assert rules_of(jobs) == {"resize", "degrade", "bytes_summary", "all"}
    assert {wc for rule, wc in jobs if rule == "resize"} == {("res=8",)}
    assert all("res=8" in wc for rule, wc in jobs if rule in ("resize", "degrade"))


def test_edit_to_degradation_module_reruns_degradation_and_downstream(finished):
    with edited(finished / "src/dermcompress/data/degrade.py"):
        jobs = dry_run(finished)
    assert rules_of(jobs) == {"degrade", "bytes_summary", "all"}
    variants = yaml.safe_load((finished / "config.yaml").read_text())["degrade"]["variants"]
    # Every variant but clean: the clean caches are the resize stage's pixels, which degrade.py never touches.
    degraded = {wc for rule, wc in jobs if rule == "degrade"}
    assert degraded == {
        (f"res={res}", f"variant={v}") for res in RESOLUTIONS for v in variants if v != "clean"
    }


def test_cache_checksum_failure_names_the_shard(finished, tmp_path):
    import shutil

    from dermcompress.data.cache import ChecksumError

    cache = tmp_path / "cache"
    shutil.copytree(finished / f"results/cache/{RESOLUTIONS[0]}px/clean", cache)
    shard = sorted((cache / "train").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=shard.name):
        read_split(cache, "train")
