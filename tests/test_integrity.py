"""Nothing silently wrong after a fault: files the stages hand on are checksummed by their writer and verified by
their reader (data/integrity.py), lineage records state what a job read, the audit fails for a result no record
vouches for, and a full disk names the file and leaves nothing partial behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import flip_bit, snakemake

from dermcompress.data import integrity
from dermcompress.learn import checkpoints
from dermcompress.learn.features import write_features
from dermcompress.provenance import hashes, lineage

# ------------------------------------------------------------------------------------------------ the helper


def test_a_flipped_bit_anywhere_is_refused_naming_the_file_and_the_way_back(tmp_path):
    path = tmp_path / "splits.parquet"
    frame = pd.DataFrame({"image_id": [f"ISIC_{i:07d}" for i in range(50)], "split": ["train", "test"] * 25})
    integrity.write_parquet(path, frame)
    assert integrity.checksum_path(path).read_text().split() == [
        integrity.file_sha256(path),
        "splits.parquet",
    ]
    pd.testing.assert_frame_equal(integrity.read_frame(path), frame)
    size = path.stat().st_size
    for offset in (0, size // 3, size - 30, size - 1):  # data pages, the footer (schema, metadata), the magic
        rotten = tmp_path / f"rotten-{offset}.parquet"
        shutil.copy2(path, rotten)
        shutil.copy2(integrity.checksum_path(path), integrity.checksum_path(rotten))
        flip_bit(rotten, offset)
        with pytest.raises(integrity.ChecksumError, match=rf"{rotten.name} is corrupt.*--forcerun {rotten}"):
            integrity.read_frame(rotten)


def test_temporary_names_are_unique_per_process_and_attempt(tmp_path):
    path = tmp_path / "checkpoint.pt"
    names = {integrity.temporary_name(path) for _ in range(100)}
    assert len(names) == 100 and all(f".{path.name}.{os.getpid()}." in n.name for n in names)


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A 64 kB tmpfs (root only): a real full disk."""
    folder = tmp_path / "small"
    folder.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)]).returncode
    ):
        pytest.skip("needs root to mount a small tmpfs (test_write_error_... simulates ENOSPC instead)")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a file a library left open


def test_a_full_disk_names_the_file_and_leaves_no_partial_file(full_disk):
    """pyarrow's "Error writing bytes" and torch's "iostream error" name no file; and a partial temporary file
    would hold the very space the user needs back."""
    state = {"model": {"w": torch.randn(64, 1024)}}
    with pytest.raises(OSError, match=rf"could not write {full_disk}/checkpoint\.pt: the disk is full"):
        checkpoints.save(full_disk / "checkpoint.pt", state)
    feats = np.random.default_rng(0).normal(size=(200, 512))
    ids = [f"ISIC_{i:07d}" for i in range(200)]
    with pytest.raises(OSError, match=rf"could not write {full_disk}/train\.parquet: the disk is full"):
        write_features(full_disk / "train.parquet", ids, ["MEL"] * 200, feats, {"classes": ["MEL"]})
    assert sorted(os.listdir(full_disk)) == []


def test_write_error_is_named_and_cleaned_up_whatever_the_library(tmp_path, monkeypatch):
    """The same as on a real full disk, ENOSPC simulated (for machines where no tmpfs can be mounted)."""

    class Full:
        """A file on a disk with room for one write."""

        def __init__(self, path, mode):
            self.file, self.writes = open(path, mode), 0  # noqa: SIM115 - closed by __exit__

        def write(self, data):
            self.writes += 1
            if self.writes > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(integrity, "open", Full, raising=False)
    with pytest.raises(integrity.WriteError, match=r"could not write .*checkpoint\.pt: the disk is full"):
        checkpoints.save(tmp_path / "checkpoint.pt", {"w": torch.randn(1000)})
    assert sorted(os.listdir(tmp_path)) == []


# ------------------------------------------------------------------------------------------------ the study


def flip(path: Path) -> None:
    """Rot one bit of a file's data pages (past the parquet magic), its size and mtime kept."""
    flip_bit(path, 200)


@pytest.fixture
def copied(finished_study, tmp_path) -> Path:
    return Path(
        shutil.copytree(finished_study, tmp_path / "copy", ignore=shutil.ignore_patterns("checkpoints"))
    )


def predictions_of(workdir: Path) -> Path:
    return (
        workdir
        / pd.read_csv(workdir / "results/tables/base.csv")["runs"][0].split(";")[0]
        / "predictions.parquet"
    )


def logs_saying(workdir: Path, text: str) -> list[Path]:
    return [p for p in (workdir / "results/logs").rglob("*.log") if text in p.read_text()]


def audit(workdir: Path, target: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dermcompress.cli", "lineage", target, "--json"]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)


@pytest.mark.workflow
def test_rotten_predictions_fail_the_table_job_naming_them(copied):
    predictions = predictions_of(copied)
    flip(predictions)
    table = "results/tables/base.csv"
    proc = snakemake(copied, table, "--forcerun", table, check=False)
    assert proc.returncode != 0, proc.stderr[-3000:]
    rel = predictions.relative_to(copied)
    assert logs_saying(copied, f"{rel} is corrupt or was changed"), proc.stderr[-3000:]
    assert not (copied / table).exists()


@pytest.mark.workflow
def test_audit_fails_for_a_table_built_from_rotten_input_after_the_good_bytes_are_copied_back(
    copied, tmp_path
):
    """The table's record states the hash of what its job read, not a remembered one: rot that its checksum
    did not catch (here the checksum was rewritten with it), then `cp -p` of the good bytes back, which keeps
    the mtime: the table holds numbers of bytes no longer there, and the audit says so."""
    predictions = predictions_of(copied)
    # The hash memo as an earlier job in this folder leaves it (the copy's paths are new to it).
    hashes.file_hashes(predictions, memo_dir=copied / hashes.MEMO_DIR)
    good = tmp_path / "good"
    good.mkdir()
    for path in (predictions, integrity.checksum_path(predictions)):
        if path.exists():
            shutil.copy2(path, good / path.name)
    flip(predictions)
    integrity.checksum_path(predictions).write_text(
        f"{integrity.file_sha256(predictions)}  {predictions.name}\n"
    )
    table = "results/tables/base.csv"
    snakemake(copied, table, "--forcerun", table)
    for path in good.iterdir():
        subprocess.run(["cp", "-p", str(path), str(predictions.parent / path.name)], check=True)
    proc = audit(copied, table)
    assert proc.returncode == 1, proc.stdout[-3000:]
    broken = {b["path"]: b for b in json.loads(proc.stdout)["broken"]}
    assert broken[str(predictions)]["problem"] == "changed"


@pytest.mark.workflow
def test_rotten_splits_stop_the_next_cache_build(copied):
    """A flipped bit in splits.parquet can move a test image into train: the cache build refuses the file
    before it writes a shard."""
    splits = copied / "results/data/splits.parquet"
    flip(splits)
    cache = "results/cache/16px/clean"
    proc = snakemake(copied, cache, "--forcerun", cache, check=False)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert logs_saying(copied, "results/data/splits.parquet is corrupt or was changed")
    assert not (copied / cache / "_info.json").exists() and not list((copied / cache).rglob("*.parquet"))


@pytest.mark.workflow
def test_a_table_without_a_lineage_record_fails_the_audit(copied):
    """After a crash, once Snakemake's incomplete markers are gone, a table no job recorded writing (it may be
    truncated) must not pass as OK."""
    table = copied / "results/tables/base.csv"
    assert audit(copied, "results/tables/base.csv").returncode == 0
    lineage.record_path(table).unlink()
    proc = audit(copied, "results/tables/base.csv")
    assert proc.returncode == 1, proc.stdout[-3000:]
    broken = {b["path"]: b for b in json.loads(proc.stdout)["broken"]}
    assert broken[str(table)]["problem"].startswith("missing record")
