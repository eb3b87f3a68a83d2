"""Lineage records and `dermcompress lineage`: unit tests of the records, then the walk on a finished small study
(conftest STUDY), from a table row, a run folder and a cache shard back to the raw images, and tampering."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import snakemake
from snakemake.iocontainers import InputFiles, Log, OutputFiles, Params, ResourceList, Snakemake, Wildcards
from test_workflow import kind

from dermcompress.data.cache import load_info, read_split, verify_cache
from dermcompress.provenance import fingerprint, lineage
from dermcompress.provenance.logs import job_logging
from dermcompress.provenance.records import output_of
from dermcompress.study import aggregate

# --------------------------------------------------------------------------------------------- records (unit)


def fake_job(tmp_path: Path, inputs: dict, outputs: dict, **params) -> Snakemake:
    """The object Snakemake hands a script, for a job with these (named) inputs and outputs."""
    return Snakemake(
        InputFiles(fromdict=inputs),
        OutputFiles(fromdict=outputs),
        Params(fromdict=params),
        Wildcards(fromdict={"res": "16"}),
        1,
        ResourceList(),
        Log(fromdict={"log": str(tmp_path / "job.log")}),
        {},
        "demo",
        None,
    )


def test_successful_job_writes_its_record_next_to_each_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("in.txt").write_text("raw\n")
    job = fake_job(tmp_path, {"raw": "in.txt"}, {"table": "out.csv", "folder": "outdir"}, quality=50)
    with job_logging(job):
        Path("out.csv").write_text("a,b\n")
        Path("outdir").mkdir()
        (Path("outdir") / "part.bin").write_bytes(b"\0" * 10)
    record = lineage.read_record("out.csv.lineage.json")
    assert record == lineage.read_record("outdir/_lineage.json")
    assert record["rule"] == "demo" and record["wildcards"] == {"res": "16"}
    assert record["params"] == {"quality": 50}
    raw = {"name": "raw", "path": "in.txt", "kind": "file", "sha256": hashlib.sha256(b"raw\n").hexdigest()}
    assert record["inputs"] == [{**raw, "bytes": 4}]
    folder = next(o for o in record["outputs"] if o["name"] == "folder")
    part = hashlib.sha256(b"\0" * 10).hexdigest()
    listing = f"{part}  part.bin\n"  # as sha256sum prints it
    assert folder["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert record["versions"]["python"] and record["versions"]["numpy"]
    assert record["host"] and record["started"] <= record["finished"]
    assert "lineage recorded" in (tmp_path / "job.log").read_text()


def test_records_of_results_live_in_a_mirror_of_results(tmp_path, monkeypatch):
    """A job's record of results/<path> is results/.lineage/records/<path>.json, however the path is spelt;
    output_of turns a record back into its output; outside results/ a record sits beside its output."""
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "results/.lineage/records"
    for output, record in [
        ("results/tables/base.csv", store / "tables/base.csv.json"),
        ("results/cache/16px/clean", store / "cache/16px/clean.json"),  # a folder, made or not
        (tmp_path / "results/figures/a/b.png", store / "figures/a/b.png.json"),
    ]:
        assert lineage.record_path(output) == record
        assert output_of(record) == Path(output).absolute()
    Path("outdir").mkdir()
    assert lineage.record_path("out.csv") == Path("out.csv.lineage.json")
    assert lineage.record_path("outdir") == Path("outdir/_lineage.json")
    assert output_of(Path("outdir/_lineage.json")) == tmp_path / "outdir"
    assert output_of(Path("out.csv.lineage.json")) == tmp_path / "out.csv"


def test_job_under_results_writes_its_records_to_the_store_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("results/tables").mkdir(parents=True)
    Path("results/tables/t.csv.lineage.json").write_text("{}")  # as versions before the store wrote it
    job = fake_job(tmp_path, {}, {"table": "results/tables/t.csv", "folder": "results/cache/c"})
    with job_logging(job):
        Path("results/tables/t.csv").write_text("a\n")
        Path("results/cache/c").mkdir(parents=True)
        Path("results/cache/c/part.bin").write_bytes(b"1")
    assert sorted(p.name for p in Path("results/tables").iterdir()) == ["t.csv"]
    assert sorted(p.name for p in Path("results/cache/c").iterdir()) == ["part.bin"]
    record = lineage.read_record("results/.lineage/records/tables/t.csv.json")
    assert record == lineage.read_record("results/.lineage/records/cache/c.json")
    assert (
        lineage.find_record("results/cache/c/part.bin") == tmp_path / "results/.lineage/records/cache/c.json"
    )


def test_failed_job_leaves_no_record_not_even_an_old_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("out.csv.lineage.json").write_text("{}")  # from an earlier, successful run
    job = fake_job(tmp_path, {}, {"table": "out.csv"})
    with pytest.raises(RuntimeError), job_logging(job):
        Path("out.csv").write_text("half")
        raise RuntimeError("boom")
    assert not Path("out.csv.lineage.json").exists()


def test_exit_now_keeps_everything_the_job_wrote_and_said(tmp_path):
    """The torch scripts end with exit_now (no interpreter teardown): what the job logged, printed and wrote is
    all there, the exit status is 0, and the teardown (here an atexit handler) did not run."""
    script = tmp_path / "job.py"
    script.write_text(
        "import atexit, logging, sys\n"
        "import torch\n"
        "from dermcompress.provenance.logs import exit_now, job_logging\n"
        "atexit.register(lambda: print('teardown ran'))\n"
        f"with job_logging({str(tmp_path / 'job.log')!r}) as log:\n"
        f"    open({str(tmp_path / 'out.txt')!r}, 'w').write('done')\n"
        "    log.info('last words')\n"
        "    print('said', end='')\n"
        "exit_now()\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "said"
    assert (tmp_path / "job.log").read_text().rstrip().endswith("dermcompress: last words")
    assert (tmp_path / "out.txt").read_text() == "done"
    # A rank under torchrun exits the usual way (its process group is left in an atexit handler).
    env = {**os.environ, "WORLD_SIZE": "2"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout == "saidteardown ran\n", proc.stderr


def test_directory_hash_ignores_records_and_snakemakes_timestamp(tmp_path):
    folder = tmp_path / "cache"
    (folder / "train").mkdir(parents=True)
    (folder / "train/part-0.parquet").write_bytes(b"x")
    before = lineage.describe(folder)
    (folder / "_lineage.json").write_text("{}")
    (folder / ".snakemake_timestamp").touch()
    (folder / "train/part-0.parquet.lineage.json").write_text("{}")
    assert lineage.describe(folder) == before == {"kind": "directory", "sha256": before["sha256"], "files": 1}
    (folder / "train/part-1.parquet").write_bytes(b"y")
    assert lineage.describe(folder)["sha256"] != before["sha256"]


def test_memo_never_outlives_a_rewrite_that_keeps_size_and_mtime(tmp_path):
    """The memo may save a rehash only while the file is the one it hashed: a rewrite of the same size with its
    mtime restored (or `cp -p` over it) changes the ctime, which no program can set back."""
    memo, data = tmp_path / "memo", tmp_path / "big.bin"
    data.write_bytes(b"a" * 1000)
    first = lineage.file_hashes(data, memo_dir=memo)[""]
    assert lineage.file_hashes(data, memo_dir=memo)[""] == first  # unchanged: reused
    stat = data.stat()
    data.write_bytes(b"b" * 1000)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert lineage.file_hashes(data, memo_dir=memo)[""] == hashlib.sha256(b"b" * 1000).hexdigest()
    other = tmp_path / "good.bin"
    other.write_bytes(b"a" * 1000)
    subprocess.run(["cp", "-p", str(other), str(data)], check=True)  # the good bytes back, mtime and all
    assert lineage.file_hashes(data, memo_dir=memo)[""] == first


def test_code_fingerprint_names_the_packages_a_stage_imports():
    train = fingerprint.code_fingerprint("dermcompress.learn.train")
    degrade = fingerprint.code_fingerprint("dermcompress.data.degrade")
    assert {"torch", "timm"} <= set(train["packages"]) and "timm" not in degrade["packages"]
    assert "pillow" in degrade["packages"] and "tqdm" not in degrade["packages"]
    assert train["source"] == fingerprint.module_fingerprint("dermcompress.learn.train")
    assert fingerprint.code_fingerprint("dermcompress.learn.train", packages=False)["packages"] == "env"


def test_runs_column_contract_is_the_aggregations():
    assert (lineage.RUNS_COLUMN, lineage.RUNS_SEPARATOR) == (aggregate.RUNS_COLUMN, aggregate.RUNS_SEPARATOR)
    files = ["results/runs/b/metrics.json", "results/runs/a/history.csv", "results/runs/b"]
    assert lineage.runs_of(files) == ["results/runs/a", "results/runs/b"]


# --------------------------------------------------------------------------------------------- the study

RAW_IMAGES = "results/data/synthetic/ISIC_2019_Training_Input"


def cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dermcompress.cli", "lineage", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)


def run_dir(workdir: Path, experiment: str = "base") -> Path:
    """The evaluation folder of the experiment's first table row."""
    return workdir / pd.read_csv(workdir / f"results/tables/{experiment}.csv")["runs"][0].split(";")[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def study_copy(finished_study, tmp_path) -> Path:
    """A copy of the finished study to tamper with (checkpoints left out: lineage never reads them)."""
    copied = shutil.copytree(finished_study, tmp_path / "copy", ignore=shutil.ignore_patterns("checkpoints"))
    return Path(copied)


@pytest.mark.workflow
def test_table_row_names_the_raw_image_hashes_of_its_test_split(finished_study):
    table = finished_study / "results/tables/base.csv"
    rows = pd.read_csv(table)
    proc = cli(finished_study, "results/tables/base.csv", "--row", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["broken"] == [] and report["files_checked"] > 100
    assert report["runs"] == rows.loc[0, "runs"].split(";")
    # The run's weights, temporary, are gone: removed after use, their hash on record, not a broken link.
    (removed,) = report["removed"]
    assert removed["path"].endswith("weights.safetensors") and not Path(removed["path"]).exists()
    stages = {kind(s["rule"]): s for s in report["stages"]}
    eval_cache = next(e["path"] for e in stages["evaluate"]["inputs"] if e["name"] == "cache_clean")
    test_ids = read_split(finished_study / eval_cache, "test").image_ids
    manifest = pd.read_parquet(finished_study / "results/data/manifest.parquet").set_index("image_id")
    named = {r["image_id"]: r["sha256"] for r in report["images"]["by_split"]["test"]}
    assert sorted(named) == sorted(test_ids)
    splits = pd.read_parquet(finished_study / "results/data/splits.parquet")
    assert set(named) == set(splits.loc[splits["split"] == "test", "image_id"])
    for image_id, digest in named.items():
        raw = finished_study / RAW_IMAGES / manifest.at[image_id, "member"]
        assert digest == sha256(raw)  # hashed here, independently of the pipeline
    # Every stage from the table back to the synthetic raw files, with the parameters that made this row.
    assert set(stages) == {
        "table",
        "evaluate",
        "train",
        "degrade",
        "resize",
        "split",
        "task",
        "ingest",
        "synth",
    }
    assert stages["train"]["params"]["settings"]["lr"] == 1.0e-3
    # Trained on the degraded variant (degrade's cache), evaluated on the clean one (resize's cache).
    degrades = {s["wildcards"]["variant"]: s for s in report["stages"] if s["rule"] == "degrade"}
    assert set(degrades) == {"degraded"}
    assert stages["resize"]["outputs"][0]["path"].endswith("results/cache/16px/clean")
    assert degrades["degraded"]["params"]["variant"]["jpeg_quality"] == 75
    assert stages["split"]["params"]["test_fraction"] == 0.2
    assert stages["resize"]["wildcards"] == {"res": "16"}
    assert stages["degrade"]["code"]["source"] == fingerprint.module_fingerprint("dermcompress.data.degrade")
    text = cli(finished_study, "results/tables/base.md", "--row", "0").stdout
    assert f"test  {test_ids[0]}  sha256 {named[test_ids[0]]}" in text
    assert "OK: all" in text and "Removed after use (1)" in text


@pytest.mark.workflow
def test_a_row_follows_only_its_own_runs(finished_study):
    report = lineage.trace(finished_study / "results/runs/index.csv", verify=False)
    rules = [kind(s["rule"]) for s in report["stages"]]
    assert rules.count("train") == rules.count("linear") == 1  # base's finetune, other's linear probe
    table = finished_study / "results/tables/other.csv"
    report = lineage.trace(table, row=0, verify=False)
    rules = [kind(s["rule"]) for s in report["stages"]]
    assert "linear" in rules and "features" in rules and "train" not in rules
    with pytest.raises(lineage.LineageError, match=r"rows 0\.\.0"):
        lineage.trace(table, row=5)


@pytest.mark.workflow
def test_run_folder_and_cache_shard_walk_back_to_the_raw_images(finished_study):
    run = run_dir(finished_study)
    report = lineage.trace(run)
    assert report["broken"] == []
    assert [kind(s["rule"]) for s in report["stages"][:2]] == ["evaluate", "train"]
    splits = pd.read_parquet(finished_study / "results/data/splits.parquet")
    by_split = {s: {r["image_id"] for r in rows} for s, rows in report["images"]["by_split"].items()}
    assert by_split == {s: set(ids) for s, ids in splits.groupby("split")["image_id"]}

    shard = sorted((finished_study / "results/cache/16px/degraded/train").glob("*.parquet"))[0]
    report = lineage.trace(shard)
    assert [s["rule"] for s in report["stages"][:2]] == ["degrade", "resize"]
    shard_ids = set(pd.read_parquet(shard, columns=["image_id"])["image_id"])
    assert {r["image_id"] for r in report["images"]["by_split"]["train"]} == shard_ids
    assert set(report["images"]["by_split"]) == {"train"}


@pytest.mark.workflow
def test_each_evaluation_of_a_job_that_scored_several_traces_to_its_own_cache(planted_study):
    """One job scored a run on clean, JPEG q75 and q30 (planted_codecs): the lineage of each evaluation is its
    own, the cache and test images it was scored on, not the job's other variants'."""
    (run,) = (planted_study / "results/runs/tiny/32px/clean/finetune").glob("*/labels1/seed0")
    for variant in ("clean", "jpeg_q30"):
        report = lineage.trace(run / "eval" / variant, verify=False)
        evaluate = report["stages"][0]
        assert kind(evaluate["rule"]) == "evaluate" and evaluate["rule"] != "evaluate"
        read = {e["name"] for e in evaluate["inputs"]}
        assert {name for name in read if name.startswith("cache_")} == {f"cache_{variant}"}
        assert {e["name"] for e in evaluate["outputs"]} >= {f"metrics_{variant}", f"predictions_{variant}"}
        scored = pd.read_parquet(run / "eval" / variant / "predictions.parquet")
        by_split = {s: {r["image_id"] for r in rows} for s, rows in report["images"]["by_split"].items()}
        assert by_split["test"] == set(scored.loc[scored["split"] == "test", "image_id"])
        # Upstream: the degrade job of this variant's cache only (clean is resize's, read by every degrade).
        degraded = {s["wildcards"]["variant"] for s in report["stages"] if s["rule"] == "degrade"}
        assert degraded == ({variant} - {"clean"})


@pytest.mark.workflow
def test_records_leave_caches_intact(finished_study):
    cache = finished_study / "results/cache/16px/clean"
    assert lineage.record_path(cache) == finished_study / "results/.lineage/records/cache/16px/clean.json"
    assert lineage.record_path(cache).is_file() and not (cache / "_lineage.json").exists()
    verify_cache(cache)
    recorded = lineage.read_record(lineage.record_path(cache))["outputs"][0]
    assert lineage.describe(cache)["sha256"] == recorded["sha256"]
    splits = pd.read_parquet(finished_study / "results/data/splits.parquet")
    assert sum(load_info(cache)["rows"].values()) == len(splits)


@pytest.mark.workflow
def test_tampered_cache_shard_is_a_broken_link(study_copy):
    shard = sorted((study_copy / "results/cache/16px/clean/test").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = cli(study_copy, str(run_dir(study_copy).relative_to(study_copy)), "--json")
    assert proc.returncode == 1
    broken = {Path(b["path"]): b for b in json.loads(proc.stdout)["broken"]}
    assert broken[shard]["sha256_now"] == sha256(shard)
    assert broken[shard]["recorded"][0]["sha256"] != sha256(shard)
    cache = broken[study_copy / "results/cache/16px/clean"]
    # Written by resize, read by the evaluation and by the degrade job that made the run's training cache.
    assert {kind(r["by"].split("[")[0]) for r in cache["recorded"]} == {"evaluate", "resize", "degrade"}
    text = cli(study_copy, str(shard.relative_to(study_copy))).stdout
    assert "BROKEN LINKS" in text and str(shard.relative_to(study_copy)) in text


@pytest.mark.workflow
def test_tampered_raw_image_is_a_broken_link(study_copy):
    run = run_dir(study_copy)
    test_id = sorted(pd.read_parquet(run / "predictions.parquet")["image_id"])[0]
    manifest = pd.read_parquet(study_copy / "results/data/manifest.parquet").set_index("image_id")
    raw = study_copy / RAW_IMAGES / manifest.at[test_id, "member"]
    raw.write_bytes(raw.read_bytes() + b"tampered")
    proc = cli(study_copy, "results/tables/base.csv", "--row", "0")
    assert proc.returncode == 1
    assert f"(raw image {test_id}, used by this result): changed" in proc.stdout
    report = lineage.trace(study_copy / "results/tables/base.csv", row=0)
    image = next(b for b in report["broken"] if b.get("image_id") == test_id)
    assert image["recorded"] == [{"by": "manifest (ingest)", "sha256": manifest.at[test_id, "sha256"]}]
    assert image["sha256_now"] == sha256(raw) and image["used_by_this_result"]


@pytest.mark.workflow
def test_report_lists_the_runs_behind_each_table_and_figure(finished_study, tmp_path):
    report = tmp_path / "report.html"
    snakemake(finished_study, "--report", str(report))
    text = report.read_text()
    shown = list((finished_study / "results/tables").glob("*.html"))
    shown += list((finished_study / "results/figures").glob("*.png"))
    # Per experiment, one run each: its table, its subgroup table and three figures (curves, reliability,
    # subgroups).
    assert text.count("Runs behind it (1)") == len(shown) == 10
    for experiment in ("base", "other"):
        listed = f">{run_dir(finished_study, experiment).relative_to(finished_study)}</tt></li>"
        assert text.count(listed) == 5  # under each of the experiment's tables and figures


@pytest.mark.workflow
def test_official_zip_layout_names_the_raw_files_and_flags_a_changed_member(tmp_path):
    import zipfile

    from conftest import copy_workflow, write_config

    from dermcompress.data.sources import GROUND_TRUTH, IMAGES_ZIP, METADATA
    from dermcompress.data.synth import make_synthetic

    root = make_synthetic(tmp_path / "isic", n=30, seed=1, as_zip=True)
    workdir = copy_workflow(tmp_path / "wf")
    write_config(workdir / "test.yaml", {"data": {"isic_root": str(root)}, "run_experiments": []})
    snakemake(workdir, "results/data/manifest.parquet", "--configfile", "test.yaml")
    manifest = workdir / "results/data/manifest.parquet"
    report = lineage.trace(manifest)
    assert report["broken"] == [] and [s["rule"] for s in report["stages"]] == ["ingest"]
    raw = {Path(r["path"]).name: r for r in report["raw_files"]}
    assert set(raw) == {GROUND_TRUTH, METADATA, IMAGES_ZIP}
    assert all(r["external"] for r in raw.values())  # the data root lies outside the workflow folder
    archive = root / IMAGES_ZIP
    assert raw[IMAGES_ZIP]["sha256"] == sha256(archive)

    ok = pd.read_parquet(manifest).query("status == 'ok'").iloc[0]
    with zipfile.ZipFile(archive) as z:
        members = {name: z.read(name) for name in z.namelist()}
    members[ok["member"]] += b"tampered"
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    # Outside the workflow folder: listed as external and not read, unless asked to (--external).
    report = lineage.trace(manifest)
    assert report["broken"] == [] and not report["raw_images_checked"]
    assert {Path(e["path"]).name for e in report["external"]} == {GROUND_TRUTH, METADATA, IMAGES_ZIP}
    broken = {b["path"]: b for b in lineage.trace(manifest, external=True)["broken"]}
    assert broken[str(archive)]["recorded"][0]["by"] == "ingest (input images)"
    member = broken[f"{archive}:{ok['member']}"]
    assert member["image_id"] == ok["image_id"] and member["recorded"][0]["sha256"] == ok["sha256"]


# --------------------------------------------------------------------------------------------- tampered records


def edit_record(path: Path, edit) -> None:
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def entry(record: dict, role: str, name: str) -> dict:
    return next(e for e in record[role] if e["name"] == name)


@pytest.mark.workflow
def test_folders_users_browse_hold_no_records(finished_study):
    """results/tables/ and results/figures/ hold tables and figures only; every output's record is in the store
    results/.lineage/records/, a mirror of results/, and nowhere else."""
    results = finished_study / "results"
    for folder, kinds in (("tables", {".csv", ".md", ".html", ".tex"}), ("figures", {".png"})):
        files = [p for p in (results / folder).rglob("*") if p.is_file()]
        assert files and {p.suffix for p in files} <= kinds, folder
        for shown in files:
            record = lineage.record_path(shown)
            assert (
                record
                == results / ".lineage/records" / folder / f"{shown.relative_to(results / folder)}.json"
            )
            assert record.is_file() and lineage.find_record(shown) == record
    outside_store = [
        p for p in results.rglob("*lineage.json") if ".lineage" not in p.relative_to(results).parts
    ]
    assert outside_store == []


@pytest.mark.workflow
def test_record_naming_a_fifo_or_a_folder_as_a_file_is_a_broken_link_never_read(study_copy):
    fifo = study_copy / "results/data/trap.fifo"
    os.mkfifo(fifo)  # reading it would block forever: no writer

    def tamper(record):
        entry(record, "outputs", "report")["path"] = "results/data/trap.fifo"
        record["outputs"].append({**entry(record, "outputs", "splits"), "name": "extra", "path": "src"})

    edit_record(lineage.record_path(study_copy / "results/data/splits.parquet"), tamper)
    proc = cli(study_copy, str(run_dir(study_copy).relative_to(study_copy)), "--json")
    assert proc.returncode == 1, proc.stderr
    broken = {Path(b["path"]): b for b in json.loads(proc.stdout)["broken"]}
    assert broken[fifo]["problem"] == lineage.NOT_REGULAR and broken[fifo]["sha256_now"] is None
    folder = broken[study_copy / "src"]
    assert folder["problem"] == "a folder where the record names a file: never read"
    assert folder["sha256_now"] is None


@pytest.mark.workflow
def test_paths_outside_the_workflow_folder_are_shown_as_external_and_not_read(study_copy):
    outside = study_copy.parent / "outside.txt"
    outside.write_text("not part of the study\n")

    def tamper(record):
        entry(record, "inputs", "manifest")["path"] = "/dev/zero"
        record["inputs"].append(
            {**entry(record, "inputs", "manifest"), "name": "sibling", "path": "../outside.txt"}
        )

    edit_record(lineage.record_path(study_copy / "results/data/task.parquet"), tamper)
    proc = cli(study_copy, "results/data/splits.parquet", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["broken"] == []
    assert {e["path"] for e in report["external"]} == {"/dev/zero", str(study_copy / "../outside.txt")}
    assert {r["path"] for r in report["raw_files"] if r["external"]} == {
        "/dev/zero",
        str(study_copy / "../outside.txt"),
    }
    text = cli(study_copy, "results/data/splits.parquet").stdout
    assert "External (2): outside the workflow folder" in text


@pytest.mark.workflow
def test_malformed_records_are_broken_links_not_tracebacks(study_copy):
    task_record = lineage.record_path(study_copy / "results/data/task.parquet")
    original = task_record.read_text()
    edit_record(task_record, lambda r: r.pop("outputs"))
    proc = cli(study_copy, "results/data/splits.parquet", "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    broken = {Path(b["path"]).name: b for b in json.loads(proc.stdout)["broken"]}
    problem = broken["task.parquet.json"]["problem"]
    assert "malformed lineage record: record: 'outputs' is a required property" in problem
    assert broken["task.parquet.json"]["recorded"][0]["by"] == "split (input task)"

    task_record.write_text(original)
    edit_record(
        lineage.record_path(study_copy / "results/data/manifest.parquet"),
        lambda r: entry(r, "inputs", "images").update(path=5),
    )
    proc = cli(study_copy, "results/data/task.parquet")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "['inputs'][2]['path']: 5 is not of type 'string'" in proc.stdout


@pytest.mark.workflow
def test_missing_upstream_record_is_a_broken_link(study_copy):
    lineage.record_path(study_copy / "results/data/task.parquet").unlink()
    proc = cli(study_copy, str(run_dir(study_copy).relative_to(study_copy)), "--json")
    assert proc.returncode == 1, proc.stderr
    broken = {Path(b["path"]): b for b in json.loads(proc.stdout)["broken"]}
    item = broken[study_copy / "results/data/task.parquet"]
    assert item["problem"].startswith("missing upstream record")
    assert item["recorded"][0]["by"] == "split (input task)"
    stages = {s["rule"] for s in json.loads(proc.stdout)["stages"]}
    assert (
        "task" not in stages and {"train", "split", "ingest"} <= stages
    )  # ingest: through resize's manifest
