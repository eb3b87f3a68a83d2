"""Every data source through real Snakemake (synth or the source's files -> ingest -> task -> split -> resize ->
degrade), on synthetic data of its layout, folder and zip forms: what a user with HAM10000, ISIC 2020 or an
isic-cli download runs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import copy_workflow, snakemake, write_config

from dermcompress import lineage
from dermcompress.cache import load_info
from dermcompress.synth import make_synthetic

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
