"""Every data source through real Snakemake (synth or the source's files -> ingest -> task -> split -> resize ->
degrade), on synthetic data of its layout, folder and zip forms: what a user with HAM10000, ISIC 2020 or an
isic-cli download runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import copy_workflow, snakemake, write_config

from dermcompress.data.cache import load_info
from dermcompress.data.synth import make_synthetic
from dermcompress.provenance import lineage
from dermcompress.provenance.records import read_record, record_path

pytestmark = pytest.mark.workflow

N = 80
TARGETS = ["results/data/splits.parquet", "results/cache/16px/clean", "results/cache/16px/degraded"]


@pytest.mark.parametrize(
    ("source", "form"),
    [
        ("isic2020", "synthetic"),
        ("isic2020", "zip"),
        ("ham10000", "synthetic"),
        ("ham10000", "zip"),
        ("isic_archive", "synthetic"),
    ],
)
def test_a_source_runs_through_the_data_stages(tmp_path, source, form):
    workdir = copy_workflow(tmp_path / "wf")
    data = {"source": source, "synthetic": {"n": N, "seed": 4}}
    if form == "zip":  # the user's own files: the image folders as the publishers ship them, zipped
        data["isic_root"] = str(make_synthetic(tmp_path / "raw", n=N, seed=4, as_zip=True, source=source))
    overlay = {"data": data, "resize": {"resolutions": [16]}, "run_experiments": []}
    write_config(workdir / "source.yaml", overlay)
    snakemake(workdir, *TARGETS, "--configfile", "source.yaml")

    manifest = pd.read_parquet(workdir / "results/data/manifest.parquet")
    assert len(manifest) == N and (manifest["status"] == "ok").sum() > N / 2
    report = json.loads((workdir / "results/data/split_report.json").read_text())
    assert all(counts["shared_across_splits"] == 0 for counts in report["ids"].values())
    assert ("patient_id" in report["ids"]) == (source != "ham10000")
    splits = pd.read_parquet(workdir / "results/data/splits.parquet")
    for variant in ("clean", "degraded"):
        info = load_info(workdir / f"results/cache/16px/{variant}")
        assert sum(info["rows"].values()) == len(splits), variant
    # The cache walks back to the raw files of this source, every hash still matching.
    traced = lineage.trace(workdir / "results/cache/16px/clean")
    assert traced["broken"] == [] and traced["raw_image_source"]


def test_ingest_and_resize_scattered_over_two_jobs_write_what_one_job_writes(tmp_path):
    """`--set-scatter ingest=2 resize=2` (what a cluster profile sets): two ingest parts and two resize parts
    per resolution, then gather jobs; the manifest, quarantine.csv, split and clean caches equal those of one
    job each, on an ISIC 2020 layout whose patients, lesions and listed duplicates span the parts."""
    raw = make_synthetic(tmp_path / "raw", n=N, seed=5, source="isic2020")
    outcomes = {}
    for parts in (1, 2):
        workdir = copy_workflow(tmp_path / f"wf{parts}")
        overlay = {
            "data": {"source": "isic2020", "isic_root": str(raw)},
            "resize": {"resolutions": [16]},
            "cache": {"rows_per_shard": 8, "row_group_size": 4},
            "run_experiments": [],
        }
        write_config(workdir / "source.yaml", overlay)
        scatter = ["--set-scatter", f"ingest={parts}", f"resize={parts}"]
        proc = snakemake(
            workdir,
            "results/data/splits.parquet",
            "results/cache/16px/clean",
            *scatter,
            "--configfile",
            "source.yaml",
        )
        log = proc.stdout + proc.stderr
        assert ("ingest_part" in log) == (parts == 2) and ("resize_part" in log) == (parts == 2)
        outcomes[parts] = workdir
        if parts == 2:
            assert not list((workdir / "results/data/ingest").glob("*.parquet"))  # the parts were temporary
            traced = lineage.trace(workdir / "results/cache/16px/clean")
            assert traced["broken"] == [] and traced["raw_image_source"] == str(raw / "train")
            # The parts were temporary: listed as removed after use, not as broken links.
            assert {Path(r["path"]).name for r in traced["removed"]} >= {"1-of-2", "2-of-2"}

    one, two = outcomes[1], outcomes[2]
    m1, m2 = (pd.read_parquet(w / "results/data/manifest.parquet") for w in (one, two))
    pd.testing.assert_frame_equal(m1, m2)
    # A `dermcompress synth` set named by data.isic_root is synthetic: in the manifest and in its lineage.
    for workdir in (one, two):
        record = read_record(record_path(workdir / "results/data/manifest.parquet"))
        assert record["params"]["synthetic"] is True
    assert m1["synthetic"].all()
    meta = [pq.read_schema(w / "results/data/manifest.parquet").metadata for w in (one, two)]
    assert meta[0] == meta[1]
    assert (one / "results/data/quarantine.csv").read_bytes() == (
        two / "results/data/quarantine.csv"
    ).read_bytes()
    assert (one / "results/data/splits.parquet").read_bytes() == (
        two / "results/data/splits.parquet"
    ).read_bytes()
    info1, info2 = (load_info(w / "results/cache/16px/clean") for w in (one, two))
    assert info1 == info2 and len(info1["shards"]) > 2
