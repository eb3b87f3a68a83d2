"""Shared fixtures: a private copy of the workflow to run Snakemake in, and a helper to call it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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
