"""Lineage records: what a finished job read, ran and wrote, one JSON record per output.

When a stage job succeeds (logs.job_logging), it writes a record for each of its outputs. Under a workflow's
results/ folder the records live in a mirror of it, results/.lineage/records/<path below results>.json, so that
the folders users browse (tables, figures, caches, runs) hold only what they open; an output outside a results/
folder has its record beside it (`<file>.lineage.json`, or `_lineage.json` inside a folder). Snakemake never sees
them. A record holds the rule, wildcards and params (the code fingerprint among them), every input and output
with its sha256, the git commit, package versions, host and times.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dermcompress.learn.runs import RUN_FILES, TEMPORARY_FILES

from .fingerprint import PACKAGE_DIR, package_versions
from .hashes import MEMO_DIR, RECORD_IN_DIR, RECORD_SUFFIX, describe, read_json, within, write_atomic

FORMAT = "dermcompress-lineage/1"
# Below a results/ folder: where the records of its outputs live, beside the hash memo.
STORE = Path(".lineage/records")
RECORD_NAME = ".json"
RUNS_COLUMN = "runs"
RUNS_SEPARATOR = ";"
RUN_FILE = "metrics.json"  # every run folder has one; its record is the run's


class LineageError(Exception):
    """A path with no lineage to show: no record, or a table row that does not exist."""


def results_of(path: Path) -> Path | None:
    """The results/ folder `path` lies below (the nearest), None if it lies below none."""
    return next((p for p in path.absolute().parents if p.name == "results"), None)


def workdir_of(path: Path) -> Path:
    """The workflow folder a result lies in (the parent of its `results` folder); else the current folder."""
    results = results_of(path)
    return results.parent if results is not None else Path.cwd()


def record_path(output: str | Path) -> Path:
    """Where the record of the job that wrote `output` lives: in the store of its results/ folder, else beside it."""
    output = Path(output)
    results = results_of(output)
    if results is not None and not output.absolute().is_relative_to(results / ".lineage"):
        relative = output.absolute().relative_to(results)
        return results / STORE / relative.with_name(relative.name + RECORD_NAME)
    return output / RECORD_IN_DIR if output.is_dir() else output.with_name(output.name + RECORD_SUFFIX)


def output_of(record: Path) -> Path:
    """The output a record (as record_path places it) is the record of."""
    record = record.absolute()
    results = next(
        (p.parent for p in record.parents if p.parent.name == "results" and p.name == ".lineage"), None
    )
    if results is not None and record.is_relative_to(results / STORE):
        relative = record.relative_to(results / STORE)
        return results / relative.with_name(relative.name.removesuffix(RECORD_NAME))
    return (
        record.parent
        if record.name == RECORD_IN_DIR
        else record.with_name(record.name.removesuffix(RECORD_SUFFIX))
    )


# ---------------------------------------------------------------------------------------------------- records


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _files(files: Any) -> list[tuple[str, str]]:
    """(name, path) of each file in a Snakemake input or output list; an unnamed one is named by its position."""
    named: list[tuple[str, str]] = []
    for name, value in files.items():
        named += [(name, str(f)) for f in ([value] if isinstance(value, str) else value)]
    seen = {path for _, path in named}
    return named + [(str(i), str(f)) for i, f in enumerate(files) if str(f) not in seen]


def git_state(start: str | Path = PACKAGE_DIR) -> dict[str, Any] | None:
    """The commit of the repository holding `start` and whether tracked files differ from it; None without git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(start), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20
        )
        if head.returncode:
            return None
        status = subprocess.run(
            ["git", "-C", str(start), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {
        "commit": head.stdout.strip(),
        "dirty": bool(status.stdout.strip()) if not status.returncode else None,
    }


def job_record(job: Any, *, started: str, memo_dir: Path | None = MEMO_DIR) -> dict[str, Any]:
    """The lineage record of a finished Snakemake job (the script's `snakemake` object)."""
    # What the job wrote, or read and verified, is stated by the hash of those very bytes (integrity.py).
    hash_options = {"memo_dir": memo_dir, "trust_info": True, "seen": True}
    return {
        "format": FORMAT,
        "job": uuid.uuid4().hex,
        "rule": job.rule,
        "wildcards": dict(job.wildcards.items()),
        "params": jsonable(dict(job.params.items())),
        "inputs": [{"name": n, "path": p, **describe(p, **hash_options)} for n, p in _files(job.input)],
        "outputs": [{"name": n, "path": p, **describe(p, **hash_options)} for n, p in _files(job.output)],
        "git": git_state(),
        "versions": package_versions(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "workdir": os.getcwd(),
        "started": started,
        "finished": now(),
    }


def clear_records(job: Any) -> None:
    """Remove the records of a job's previous outputs, so that a failed rerun leaves none that vouch for it;
    and a file's record beside it, where versions before the store wrote it (a folder's went with the folder)."""
    for _, path in _files(job.output):
        record_path(path).unlink(missing_ok=True)
        Path(f"{path}{RECORD_SUFFIX}").unlink(missing_ok=True)


def write_records(job: Any, *, started: str) -> list[Path]:
    """Write the job's record next to each of its outputs; return where."""
    record = job_record(job, started=started)
    text = json.dumps(record, indent=2) + "\n"
    written = [record_path(out["path"]) for out in record["outputs"]]
    for path in written:
        write_atomic(path, text)
    return written


# What a record must hold for the walk to use it; anything else is a malformed record (a broken link).
_ENTRY = {
    "type": "object",
    "required": ["name", "path", "kind", "sha256"],
    "properties": {
        "name": {"type": "string"},
        "path": {"type": "string", "minLength": 1},
        "kind": {"enum": ["file", "directory", "missing"]},
        "sha256": {"type": ["string", "null"]},
    },
}
RECORD_SCHEMA = {
    "type": "object",
    "required": ["format", "job", "rule", "wildcards", "params", "inputs", "outputs"],
    "properties": {
        "format": {"const": FORMAT},
        "job": {"type": "string"},
        "rule": {"type": "string"},
        "wildcards": {"type": "object", "additionalProperties": {"type": "string"}},
        "params": {"type": "object"},
        "inputs": {"type": "array", "items": _ENTRY},
        "outputs": {"type": "array", "items": _ENTRY},
        "git": {"type": ["object", "null"]},
        "versions": {"type": ["object", "null"]},
        "host": {"type": ["string", "null"]},
        "finished": {"type": ["string", "null"]},
    },
}
MAX_RECORD_BYTES = 16 * 2**20  # records are a few kB


def read_record(path: str | Path) -> dict[str, Any]:
    """A lineage record, checked against RECORD_SCHEMA; LineageError says what is wrong with it."""
    import jsonschema

    path = Path(path)
    if not path.is_file() or path.stat().st_size > MAX_RECORD_BYTES:
        raise LineageError(
            f"{path} is not a lineage record (not a regular file of at most {MAX_RECORD_BYTES} bytes)"
        )
    record = read_json(path)
    if record is None:
        raise LineageError(f"{path} is not a lineage record (not valid JSON)")
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(RECORD_SCHEMA).iter_errors(record)
    )
    if error is not None:
        where = "".join(f"[{p!r}]" for p in error.absolute_path)
        raise LineageError(f"{path} is a malformed lineage record: {where or 'record'}: {error.message}")
    return record


def find_record(path: str | Path, workdir: Path | None = None) -> Path | None:
    """The record of the job that wrote `path`: a file or directory output, or a file inside a directory output.

    With `workdir`, only records inside it count (and folders above it are not searched).
    """
    path = Path(path).absolute()
    if workdir is not None and not within(path, workdir):
        return None
    for written in [path, *path.parents]:  # the path's own record, or the folder output's it lies in
        if workdir is not None and not within(written, workdir):
            break
        if (record := record_path(written)).is_file():
            return record
    return None


# ---------------------------------------------------------------------------------------------------- tables


def runs_of(paths: list[str]) -> list[str]:
    """The run folders of the given run files (or folders), sorted, each once: what a table row aggregates."""
    return sorted({(Path(p).parent if Path(p).name in RUN_FILES else Path(p)).as_posix() for p in paths})


def join_runs(runs: list[str]) -> str:
    """The `runs` cell of a table row."""
    return RUNS_SEPARATOR.join(runs_of(runs))


def table_runs(table: str | Path, row: int | None = None) -> list[str]:
    """The run folders a table (or one of its rows, counted from 0) aggregates, from its `runs` column."""
    import pandas as pd

    frame = pd.read_csv(table_csv(Path(table)))
    if RUNS_COLUMN not in frame.columns:
        raise LineageError(f"{table} has no {RUNS_COLUMN!r} column")
    if row is not None:
        if not 0 <= row < len(frame):
            raise LineageError(f"{table} has rows 0..{len(frame) - 1}, not {row}")
        frame = frame.iloc[[row]]
    return sorted({r for cell in frame[RUNS_COLUMN].dropna() for r in str(cell).split(RUNS_SEPARATOR) if r})


def table_csv(path: Path) -> Path:
    """A Markdown table's CSV twin (same stem), or the path itself."""
    return path.with_suffix(".csv") if path.suffix == ".md" and path.with_suffix(".csv").is_file() else path


def is_table(path: str | Path) -> bool:
    import pandas as pd

    path = table_csv(Path(path))
    return path.suffix == ".csv" and path.is_file() and RUNS_COLUMN in pd.read_csv(path, nrows=0).columns


# The parts of a scattered ingest or resize ('2-of-8.parquet', 'clean.parts/2-of-8'), temporary like weights.
SCATTER_PART = re.compile(r"\d+-of-\d+(\.parquet)?")


def is_temporary(path: Path) -> bool:
    """Whether a missing file was a temporary output, deleted after use by design (not a broken link)."""
    return path.name in TEMPORARY_FILES or SCATTER_PART.fullmatch(path.name) is not None
