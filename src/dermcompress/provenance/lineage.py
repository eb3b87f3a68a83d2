"""Lineage: what every job read and ran, recorded next to what it wrote, and the walk from a result to raw files.

Records. When a stage job succeeds (logs.job_logging), it writes one JSON record per output: `<file>.lineage.json`
beside a file output, `_lineage.json` inside a directory output. Snakemake never sees them (they are not declared,
and a directory output's time lives in its .snakemake_timestamp), and no hash here counts them as content. A record
holds the rule, wildcards and params (the code fingerprint among them), every input and output with its sha256,
the git commit, package versions, host and times.

Hashes. A file's sha256 is over its bytes; a directory's over its listing, one `sha256  relative/path` line per
file as sha256sum prints them. A job hashes each file once: later jobs reuse a hash while the file's size and
mtime are unchanged (a memo under results/.lineage/), and a cache's shard hashes come from its _info.json. The
audit (`dermcompress lineage`) trusts none of that and hashes everything it checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from dermcompress.data.cache import INFO, file_sha256
from dermcompress.learn.runs import RUN_FILES, TEMPORARY_FILES

from .fingerprint import PACKAGE_DIR, package_versions

FORMAT = "dermcompress-lineage/1"
RECORD_SUFFIX = ".lineage.json"
RECORD_IN_DIR = "_lineage.json"
# Files inside a directory output that are not its content: our record and Snakemake's time stamp.
NOT_CONTENT = (RECORD_IN_DIR, ".snakemake_timestamp")
MEMO_DIR = Path("results/.lineage/hashes")
RUNS_COLUMN = "runs"
RUNS_SEPARATOR = ";"
RUN_FILE = "metrics.json"  # every run folder has one; its record is the run's


class LineageError(Exception):
    """A path with no lineage to show: no record, or a table row that does not exist."""


# ---------------------------------------------------------------------------------------------------- hashing


def record_path(output: str | Path) -> Path:
    """Where the record of the job that wrote `output` lives."""
    output = Path(output)
    return output / RECORD_IN_DIR if output.is_dir() else output.with_name(output.name + RECORD_SUFFIX)


def _content_files(directory: Path) -> list[str]:
    """The regular files of a folder (links only when they stay inside it), records and time stamps left out.

    Nothing else is ever read: not a FIFO or device (reading one could block forever), not a folder or file
    that a link leads to outside (which would make the folder's hash cover the world).
    """
    root = Path(os.path.realpath(directory))
    found = []
    for top, _, files in os.walk(directory):
        for name in files:
            full = os.path.join(top, name)
            if name in NOT_CONTENT or name.endswith(RECORD_SUFFIX) or not os.path.isfile(full):
                continue
            if os.path.islink(full) and not _within(Path(full), root):
                continue
            found.append(Path(full).relative_to(directory).as_posix())
    return sorted(found)


def _within(path: Path, root: Path) -> bool:
    """Whether `path`, links resolved, lies in `root` (itself resolved)."""
    real = Path(os.path.realpath(path))
    return real == root or real.is_relative_to(root)


def _hash_all(paths: list[Path]) -> list[str]:
    """sha256 of many files in chunks, on a few threads (hashlib releases the GIL, so they run in parallel)."""
    if len(paths) < 2:
        return [file_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(file_sha256, paths))


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _memo_file(memo_dir: Path, path: Path) -> Path:
    return memo_dir / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]}.json"


def _read_json(path: Path, max_bytes: int = 64 * 2**20) -> Any:
    """A JSON file's content, or None if it is not a regular file (a FIFO would block), too big or invalid."""
    try:
        if not path.is_file() or path.stat().st_size > max_bytes:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _info_hashes(directory: Path) -> dict[str, str]:
    """Shard hashes a cache's _info.json vouches for (the job that wrote the cache hashed them as it wrote them)."""
    info = _read_json(directory / INFO)
    shards = info.get("shards", []) if isinstance(info, dict) else []
    return {s["path"]: s["sha256"] for s in shards if isinstance(s, dict) and "path" in s and "sha256" in s}


def file_hashes(
    path: str | Path, *, memo_dir: Path | None = None, trust_info: bool = False
) -> dict[str, str]:
    """{relative path: sha256} of a directory's content files, or {"": sha256} of a file.

    With `memo_dir`, hashes whose file kept its size and mtime are reused and new ones remembered; with
    `trust_info`, a cache directory's shard hashes are taken from its _info.json.
    """
    path = Path(path)
    rels = _content_files(path) if path.is_dir() else [""]
    stats = {rel: _stat(path / rel) for rel in rels}
    known = _info_hashes(path) if trust_info and path.is_dir() else {}
    memo = (_read_json(_memo_file(memo_dir, path)) or {}) if memo_dir else {}
    hashes = {}
    for rel in rels:
        if rel in known:
            hashes[rel] = known[rel]
        elif isinstance(memo.get(rel), list) and memo[rel][:2] == stats[rel]:
            hashes[rel] = memo[rel][2]
    todo = [rel for rel in rels if rel not in hashes]
    hashes.update(zip(todo, _hash_all([path / rel for rel in todo]), strict=True))
    if memo_dir and todo:
        memo = {rel: [*stats[rel], hashes[rel]] for rel in rels}
        _write_atomic(_memo_file(memo_dir, path), json.dumps(memo))
    return hashes


def listing_digest(hashes: dict[str, str]) -> str:
    """sha256 over a directory's listing, `sha256  relative/path` per file in path order."""
    listing = "".join(f"{sha}  {rel}\n" for rel, sha in sorted(hashes.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def describe(path: str | Path, hashes: dict[str, str] | None = None, **hash_options) -> dict[str, Any]:
    """What a record says about a file or directory: kind, sha256 and size (files) or file count (folders)."""
    path = Path(path)
    if not path.exists():
        return {"kind": "missing", "sha256": None}
    hashes = file_hashes(path, **hash_options) if hashes is None else hashes
    if path.is_dir():
        return {"kind": "directory", "sha256": listing_digest(hashes), "files": len(hashes)}
    return {"kind": "file", "sha256": hashes[""], "bytes": path.stat().st_size}


# ---------------------------------------------------------------------------------------------------- records


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
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
    hash_options = {"memo_dir": memo_dir, "trust_info": True}
    return {
        "format": FORMAT,
        "job": uuid.uuid4().hex,
        "rule": job.rule,
        "wildcards": dict(job.wildcards.items()),
        "params": _jsonable(dict(job.params.items())),
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
    """Remove the records of a job's previous outputs, so that a failed rerun leaves none that vouch for it."""
    for _, path in _files(job.output):
        record_path(path).unlink(missing_ok=True)


def write_records(job: Any, *, started: str) -> list[Path]:
    """Write the job's record next to each of its outputs; return where."""
    record = job_record(job, started=started)
    text = json.dumps(record, indent=2) + "\n"
    written = [record_path(out["path"]) for out in record["outputs"]]
    for path in written:
        _write_atomic(path, text)
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
    record = _read_json(path)
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
    if workdir is not None and not _within(path, workdir):
        return None
    if record_path(path).is_file():
        return record_path(path)
    for parent in path.parents:
        if workdir is not None and not _within(parent, workdir):
            break
        if (parent / RECORD_IN_DIR).is_file():
            return parent / RECORD_IN_DIR
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

    frame = pd.read_csv(_table_csv(Path(table)))
    if RUNS_COLUMN not in frame.columns:
        raise LineageError(f"{table} has no {RUNS_COLUMN!r} column")
    if row is not None:
        if not 0 <= row < len(frame):
            raise LineageError(f"{table} has rows 0..{len(frame) - 1}, not {row}")
        frame = frame.iloc[[row]]
    return sorted({r for cell in frame[RUNS_COLUMN].dropna() for r in str(cell).split(RUNS_SEPARATOR) if r})


def _table_csv(path: Path) -> Path:
    """A Markdown table's CSV twin (same stem), or the path itself."""
    return path.with_suffix(".csv") if path.suffix == ".md" and path.with_suffix(".csv").is_file() else path


def is_table(path: str | Path) -> bool:
    import pandas as pd

    path = _table_csv(Path(path))
    return path.suffix == ".csv" and path.is_file() and RUNS_COLUMN in pd.read_csv(path, nrows=0).columns


def _workdir_of(path: Path) -> Path:
    """The workflow folder a result lies in (the parent of its `results` folder); else the current folder."""
    path = path.absolute()
    return next((p.parent for p in path.parents if p.name == "results"), Path.cwd())


# ---------------------------------------------------------------------------------------------------- the walk


@dataclass
class Node:
    """One job met on the walk: its record, where the record lies, and the folder its relative paths start from."""

    record: dict[str, Any]
    file: Path
    root: Path

    @classmethod
    def load(cls, file: Path) -> Node:
        """The record in `file`; its relative paths start where the recorded output path says (else in the
        workflow folder the record lies in)."""
        record = read_record(file)
        written = (
            file.parent if file.name == RECORD_IN_DIR else file.with_name(file.name[: -len(RECORD_SUFFIX)])
        )
        recorded = next(
            (Path(o["path"]) for o in record["outputs"] if Path(o["path"]).name == written.name), None
        )
        if recorded is None or recorded.is_absolute():
            return cls(record, file, _workdir_of(written))
        root = written.absolute()
        for _ in recorded.parts:
            root = root.parent
        return cls(record, file, root)

    def resolve(self, path: str) -> Path:
        return self.root / path

    @property
    def label(self) -> str:
        wildcards = ", ".join(f"{k}={v}" for k, v in self.record["wildcards"].items())
        return f"{self.record['rule']}[{wildcards}]" if wildcards else self.record["rule"]


@dataclass
class Walk:
    nodes: list[Node] = field(default_factory=list)
    # Inputs no job of the workflow wrote (raw files; `external` when outside the workflow folder), by path.
    raw: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Links the walk could not follow: a malformed record, an output of the workflow with no record.
    problems: list[dict[str, Any]] = field(default_factory=list)


def walk(starts: list[Path], follow=lambda node, entry: True, workdir: Path | None = None) -> Walk:
    """Every job upstream of the given records, nearest first; `follow(node, input)` may prune inputs.

    The walk stays inside `workdir` (default: the workflow folder of the first record): an input outside it is
    an external raw file, whose folder is never searched for records. An input under its `results/` folder was
    written by a job of the workflow, so a missing or malformed record there is a problem, not a raw file.
    """
    result, seen_jobs, seen_files = Walk(), set(), set()
    workdir = Path(os.path.realpath(workdir or _workdir_of(starts[0])))
    todo = []

    def load(file: Path, wanted_by: str) -> None:
        try:
            todo.append(Node.load(file))
        except LineageError as err:
            result.problems.append(
                {"path": str(file), "problem": f"malformed record ({err})", "by": wanted_by}
            )

    for file in starts:
        load(file, "the result asked for")
    while todo:
        node = todo.pop(0)
        if node.record["job"] in seen_jobs:
            continue
        seen_jobs.add(node.record["job"])
        result.nodes.append(node)
        for entry in node.record["inputs"]:
            if not follow(node, entry):
                continue
            path = node.resolve(entry["path"])
            external = not _within(path, workdir)
            producer = None if external else find_record(path, workdir)
            if producer is None and is_temporary(path) and not os.path.lexists(path):
                continue  # a temporary output, deleted after use with its record: the checks list it as removed
            if producer is None and not external and _within(path, workdir / "results"):
                result.problems.append(
                    {
                        "path": str(path),
                        "problem": "missing upstream record: an output of the workflow that no job's record vouches for",
                        "by": f"{node.label} (input {entry['name']})",
                    }
                )
            elif producer is None:
                raw = result.raw.setdefault(
                    str(path), {**entry, "path": str(path), "external": external, "read_by": []}
                )
                raw["read_by"].append(node.label)
            elif producer not in seen_files:
                seen_files.add(producer)
                load(producer, f"{node.label} (input {entry['name']})")
    return result


# ---------------------------------------------------------------------------------------------------- images


@cache  # a cache's shards are read once per walk, however many runs share it
def _ids_by_split(path: Path, workdir: Path) -> dict[str, frozenset[str]]:
    """Image ids per split in a cache folder, a cache shard or any parquet table with an image_id column
    inside `workdir` (none from a file that cannot be read: the checks report it)."""
    import pyarrow.parquet as pq

    if not _within(path, workdir):
        return {}
    if path.is_dir() and (path / INFO).is_file():
        return _merge([_ids_by_split(path / rel, workdir) for rel in _info_hashes(path)])
    if path.suffix != ".parquet" or not path.is_file():
        return {}
    try:
        columns = [c for c in ("image_id", "split") if c in pq.read_schema(path).names]
        table = pq.read_table(path, columns=columns).to_pydict() if "image_id" in columns else {}
    except (OSError, ValueError):  # a damaged file (pyarrow's errors derive from these)
        return {}
    if not table:
        return {}
    splits = table.get("split", ["all"] * len(table["image_id"]))
    found: dict[str, set[str]] = {}
    for image_id, split in zip(table["image_id"], splits, strict=True):
        found.setdefault(str(split), set()).add(str(image_id))
    return {split: frozenset(ids) for split, ids in found.items()}


def _role(node: Node, name: str, kind: str = "inputs") -> Path | None:
    """The path a record names under `name` among its inputs (or outputs), if any."""
    return next((node.resolve(e["path"]) for e in node.record[kind] if e["name"] == name), None)


def _writer(found: Walk, path: Path | None) -> Node | None:
    """The walked job that wrote `path`."""
    for node in found.nodes:
        if path is not None and any(node.resolve(e["path"]) == path for e in node.record["outputs"]):
            return node
    return None


def _train_images(node: Node | None, workdir: Path) -> frozenset[str]:
    """The images a training saw: the train split of a finetune's cache, or of a probe's train features."""
    if node is None:
        return frozenset()
    if (cache := _role(node, "cache")) is not None:
        return _ids_by_split(cache, workdir).get("train", frozenset())
    if (features := _role(node, "train")) is not None:
        return frozenset().union(*_ids_by_split(features, workdir).values())
    return frozenset()


def _run_images(node: Node, found: Walk, workdir: Path) -> dict[str, frozenset[str]]:
    """An evaluation's images: those its model trained on, and the val and test images it was scored on."""
    used = {s: ids for s, ids in _ids_by_split(_role(node, "predictions", "outputs"), workdir).items()}
    if (bank := _role(node, "bank")) is not None:  # kNN: the train features are its model
        train = frozenset().union(*_ids_by_split(bank, workdir).values())
    else:
        train = _train_images(_writer(found, _role(node, "weights") or _role(node, "head")), workdir)
    return {s: ids for s, ids in {"train": train, **used}.items() if ids and s != "all"}


def _is_run(node: Node) -> bool:
    """An evaluation of a run (rules evaluate, evaluate_probe): what a table row and a run folder stand for."""
    return _role(node, "predictions", "outputs") is not None


def _merge(parts: list[dict[str, frozenset[str]]]) -> dict[str, frozenset[str]]:
    merged: dict[str, frozenset[str]] = {}
    for part in parts:
        for split, ids in part.items():
            merged[split] = merged.get(split, frozenset()) | ids
    return merged


def _manifest(nodes: list[Node], workdir: Path) -> tuple[Any, Path | None]:
    """The ingest manifest met on the walk (pandas frame indexed by image_id) and the raw image source it read."""
    import pandas as pd

    for node in nodes:
        outputs = {o["name"]: o["path"] for o in node.record["outputs"]}
        inputs = {i["name"]: i["path"] for i in node.record["inputs"]}
        manifest = node.resolve(outputs["manifest"]) if "manifest" in outputs else None
        if manifest and "images" in inputs and _within(manifest, workdir) and manifest.is_file():
            try:
                frame = pd.read_parquet(manifest, columns=["image_id", "sha256", "member"])
            except (OSError, ValueError, KeyError):  # damaged: its own hash check reports it
                return None, None
            # Several image folders or zips (HAM10000's two parts): the folder that holds them.
            parts = [node.resolve(i["path"]) for i in node.record["inputs"] if i["name"] == "images"]
            source = parts[0] if len(parts) == 1 else Path(os.path.commonpath(parts))
            return frame.set_index("image_id"), source
    return None, None


# ---------------------------------------------------------------------------------------------------- checks

NOT_REGULAR = "not a regular file (a device, FIFO or socket): never read"


# The parts of a scattered ingest or resize ('2-of-8.parquet', 'clean.parts/2-of-8'), temporary like weights.
SCATTER_PART = re.compile(r"\d+-of-\d+(\.parquet)?")


def is_temporary(path: Path) -> bool:
    """Whether a missing file was a temporary output, deleted after use by design (not a broken link)."""
    return path.name in TEMPORARY_FILES or SCATTER_PART.fullmatch(path.name) is not None


class Checker:
    """Hashes what is on disk now (each path once) and compares it with what records say.

    Only regular files are read, and only inside the workflow folder unless `external`: a path outside it is
    listed as external, unread; a folder, device or FIFO where a record names a file is a broken link.
    """

    def __init__(self, workdir: Path, external: bool = False) -> None:
        self.workdir = Path(os.path.realpath(workdir))
        self.read_external = external
        self.hashes: dict[Path, dict[str, str]] = {}
        self.broken: dict[str, dict[str, Any]] = {}
        self.external: dict[str, dict[str, Any]] = {}
        self.removed: dict[str, dict[str, Any]] = {}  # temporary outputs, deleted after use by design
        self.checked = 0

    def in_scope(self, path: Path) -> bool:
        return self.read_external or _within(path, self.workdir)

    def now(self, path: Path, kind: str) -> tuple[str | None, str | None]:
        """(sha256 now, or None; the problem when the path is not what the record says it is)."""
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return None, None if kind == "missing" else "missing"
        except OSError as err:
            return None, f"unreadable ({err.strerror})"
        if stat.S_ISDIR(mode) and kind != "directory":
            return None, "a folder where the record names a file: never read"
        if stat.S_ISREG(mode) and kind == "directory":
            return None, "a file where the record names a folder: never read"
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            return None, NOT_REGULAR
        if path not in self.hashes:
            self.hashes[path] = file_hashes(path)
        return describe(path, self.hashes[path])["sha256"], None

    def check(self, node: Node, entry: dict[str, Any], role: str) -> None:
        path = node.resolve(entry["path"])
        by = f"{node.label} ({role} {entry['name']})"
        if not self.in_scope(path):
            item = self.external.setdefault(str(path), {"path": str(path), "recorded": []})
            item["recorded"].append({"by": by, "sha256": entry["sha256"]})
            return
        sha, problem = self.now(path, entry["kind"])
        self.checked += 1
        if problem == "missing" and is_temporary(path):
            item = self.removed.setdefault(str(path), {"path": str(path), "recorded": []})
            item["recorded"].append({"by": by, "sha256": entry["sha256"]})
        elif problem or sha != entry["sha256"]:
            self.flag(path, problem or "changed", sha, by, entry["sha256"])

    def flag(
        self, path: Path, problem: str, current: str | None, by: str, recorded: str | None, **extra
    ) -> None:
        item = self.broken.setdefault(
            str(path), {"path": str(path), "problem": problem, "sha256_now": current, "recorded": [], **extra}
        )
        item["recorded"].append({"by": by, "sha256": recorded})

    def problem(self, item: dict[str, Any]) -> None:
        """A link the walk could not follow (malformed or missing record)."""
        self.flag(Path(item["path"]), item["problem"], None, item["by"], None)

    def shards(self, cache_dir: Path) -> None:
        """Pinpoint which shards of a cache differ from its _info.json (shards named inside the cache only)."""
        root = Path(os.path.realpath(cache_dir))
        for rel, sha in _info_hashes(cache_dir).items():
            path = cache_dir / rel
            if not _within(path, root):
                self.flag(
                    path,
                    f"named by {INFO} but outside its cache: never read",
                    None,
                    f"{INFO} of its cache",
                    sha,
                )
                continue
            now, problem = self.hashes.get(cache_dir, {}).get(rel), None
            if now is None:
                now, problem = self.now(path, "file")
            if problem or now != sha:
                self.flag(path, problem or "changed", now, f"{INFO} of its cache", sha)

    def raw_images(self, manifest: Any, source: Path, used: frozenset[str]) -> None:
        """Rehash every raw image the manifest vouches for (folder or zip) and flag those that changed."""
        from dermcompress.data.sources import ImageSource

        listed = manifest[manifest["sha256"].notna() & manifest["member"].notna()]
        if source.is_dir():
            hashes = self.hashes.get(source) or file_hashes(source)
            current = {m: hashes.get(m) for m in listed["member"]}
        else:
            with ImageSource(source) as images:
                current = {m: _read_sha(images, m) for m in listed["member"]}
        for image_id, row in listed.iterrows():
            if current[row["member"]] != row["sha256"]:
                self.flag(
                    source / row["member"] if source.is_dir() else Path(f"{source}:{row['member']}"),
                    "changed" if current[row["member"]] else "missing",
                    current[row["member"]],
                    "manifest (ingest)",
                    row["sha256"],
                    image_id=image_id,
                    used_by_this_result=image_id in used,
                )
        self.checked += len(listed)


def _read_sha(images: Any, member: str) -> str | None:
    """sha256 of a zip member (bounded read, as ingest's), None if it is gone or unreadable."""
    from dermcompress.data.sources import SourceError

    try:
        return hashlib.sha256(images.read(member)).hexdigest()
    except (KeyError, OSError, ValueError, SourceError):
        return None


# ---------------------------------------------------------------------------------------------------- trace


def _starts(path: Path, row: int | None, workdir: Path) -> tuple[list[Path], list[str], list[Path]]:
    """The records to walk from, and the runs a table (row) names, as written and as folders (none otherwise)."""
    if is_table(path):
        csv = _table_csv(path)
        table_record = find_record(csv, workdir)
        runs = table_runs(csv, row)
        run_dirs = [workdir / r for r in runs]
        outside = [str(r) for r in run_dirs if not _within(r, workdir)]
        if outside:
            raise LineageError(f"{path} lists run(s) {outside} outside the workflow folder {workdir}")
        missing = [str(r) for r in run_dirs if find_record(r / RUN_FILE, workdir) is None]
        if missing:
            raise LineageError(f"no lineage record for run(s) {missing} listed in {path}")
        starts = [table_record] if table_record else []
        return starts + [find_record(r / RUN_FILE, workdir) for r in run_dirs], runs, run_dirs
    if row is not None:
        raise LineageError(f"--row applies to tables (a CSV with a {RUNS_COLUMN!r} column), not {path}")
    start = find_record(path, workdir)
    if start is None and path.is_dir() and (path / RUN_FILE).is_file():
        start = find_record(path / RUN_FILE, workdir)  # a run folder: its metrics' record is the run's
    if start is None:
        raise LineageError(
            f"no lineage record for {path}: not written by a job of this workflow (a raw input?)"
        )
    return [start], [], []


def _images_used(path: Path, found: Walk, run_dirs: list[Path], workdir: Path) -> dict[str, frozenset[str]]:
    """Image ids per split behind the result: its runs' (a table), the run's, or those the file itself holds."""
    if run_dirs:
        runs = [n for n in found.nodes if _is_run(n) and any(n.file.is_relative_to(r) for r in run_dirs)]
        return _merge([_run_images(n, found, workdir) for n in runs])
    if found.nodes and _is_run(found.nodes[0]):
        return _run_images(found.nodes[0], found, workdir)
    return _ids_by_split(path.absolute(), workdir)


def _verify(
    checker: Checker, found: Walk, follow, manifest: Any, source: Path | None, used: frozenset[str]
) -> None:
    """Rehash everything the walked records name, the shards of every cache, and the raw images."""
    for node in found.nodes:
        for entry in node.record["outputs"]:
            checker.check(node, entry, "output")
        for entry in node.record["inputs"]:
            if follow(node, entry):
                checker.check(node, entry, "input")
    for node in found.nodes:
        for entry in node.record["outputs"]:
            out = node.resolve(entry["path"])
            if checker.in_scope(out) and out.is_dir() and (out / INFO).is_file():
                checker.shards(out)
    if manifest is not None and source is not None and checker.in_scope(source) and source.exists():
        checker.raw_images(manifest, source, used)


def trace(
    path: str | Path, *, row: int | None = None, verify: bool = True, external: bool = False
) -> dict[str, Any]:
    """Everything a result came from, as a JSON-ready dict: stages, raw files, raw images, broken links.

    Stays inside the result's workflow folder: paths outside it (raw data kept elsewhere) are listed as external
    and not read, unless `external`. Malformed or missing records are broken links, as changed files are.
    """
    path = Path(path)
    if not path.exists():
        raise LineageError(f"{path} does not exist")
    workdir = Path(os.path.realpath(_workdir_of(path)))
    starts, runs, run_dirs = _starts(path, row, workdir)

    def follow(node: Node, entry: dict[str, Any]) -> bool:
        # A table row follows, of the table's inputs, only those of its own runs.
        if row is None or node.file != starts[0] or _is_run(node):
            return True
        return any(node.resolve(entry["path"]).is_relative_to(r) for r in run_dirs)

    found = walk(starts, follow, workdir)
    used = _images_used(path, found, run_dirs, workdir)
    manifest, source = _manifest(found.nodes, workdir)
    checker = Checker(workdir, external=external)
    for item in found.problems:
        checker.problem(item)
    if verify:
        _verify(checker, found, follow, manifest, source, frozenset().union(*used.values()))
    return {
        "target": str(path),
        "workdir": str(workdir),
        "row": row,
        "row_values": _row_values(path, row) if run_dirs and row is not None else None,
        "runs": runs,
        "verified": verify,
        "files_checked": checker.checked,
        "broken": list(checker.broken.values()),
        "external": list(checker.external.values()),
        "removed": list(checker.removed.values()),
        "stages": [_stage(n, follow) for n in found.nodes],
        "raw_files": list(found.raw.values()),
        "images": _image_table(used, manifest),
        "raw_image_source": str(source) if source else None,
        "raw_images_checked": bool(verify and source and checker.in_scope(source)),
    }


def _row_values(path: Path, row: int) -> dict[str, Any]:
    import pandas as pd

    values = pd.read_csv(_table_csv(path)).iloc[row].drop(RUNS_COLUMN)
    return _jsonable({k: None if pd.isna(v) else v for k, v in values.items()})


def _stage(node: Node, follow) -> dict[str, Any]:
    record = node.record
    return {
        "label": node.label,
        "record": str(node.file),
        **{k: record.get(k) for k in ("rule", "wildcards", "params", "git", "versions", "host", "finished")},
        "code": record["params"].get("code"),
        "inputs": [{**e, "path": str(node.resolve(e["path"]))} for e in record["inputs"] if follow(node, e)],
        "outputs": [{**e, "path": str(node.resolve(e["path"]))} for e in record["outputs"]],
    }


def _image_table(used: dict[str, frozenset[str]], manifest: Any) -> dict[str, Any]:
    """The raw images behind a result, per split, with the sha256 and file the ingest recorded for each."""
    by_split = {}
    for split in sorted(used):
        rows = []
        for image_id in sorted(used[split]):
            known = manifest is not None and image_id in manifest.index
            rows.append(
                {
                    "image_id": image_id,
                    "sha256": manifest.at[image_id, "sha256"] if known else None,
                    "member": manifest.at[image_id, "member"] if known else None,
                }
            )
        by_split[split] = rows
    return {"count": len(set().union(*used.values())) if used else 0, "by_split": by_split}


# ---------------------------------------------------------------------------------------------------- text


def _short(sha: str | None) -> str:
    return sha[:16] if sha else "-"


def _show(path: str) -> str:
    """A path as short as it can be said from here."""
    return os.path.relpath(path) if Path(path).is_relative_to(Path.cwd()) else path


def _code(code: Any) -> str:
    if not isinstance(code, dict):
        return str(code)
    packages = code.get("packages")
    listed = ", ".join(f"{k}=={v}" for k, v in packages.items()) if isinstance(packages, dict) else packages
    return f"source {code.get('source')}; packages {listed}"


def format_text(report: dict[str, Any]) -> str:
    """The report of `trace` as readable text."""
    lines = [
        f"Lineage of {report['target']}" + (f", row {report['row']}" if report["row"] is not None else "")
    ]
    if report["row_values"]:
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in report["row_values"].items()))
    if not report["verified"]:
        lines.append("Not verified (--no-verify): hashes are as recorded.")
    if report["broken"]:
        lines.append(
            f"BROKEN LINKS ({len(report['broken'])}): files that differ from what a record says, records that "
            "are malformed or missing"
        )
        for item in report["broken"]:
            what = ""
            if "image_id" in item:
                used = ", used by this result" if item["used_by_this_result"] else ""
                what = f" (raw image {item['image_id']}{used})"
            problem = f"{item['problem']}, sha256 now {_short(item['sha256_now'])}"
            lines.append(f"  ! {_show(item['path'])}{what}: {problem}")
            for rec in item["recorded"]:
                lines.append(f"      recorded {_short(rec['sha256'])} by {rec['by']}")
    elif report["verified"]:
        removed = f" (but {len(report['removed'])} temporary, removed after use)" if report["removed"] else ""
        lines.append(f"OK: all {report['files_checked']} recorded hashes match the files on disk{removed}.")
    if report["removed"]:
        lines.append(
            f"Removed after use ({len(report['removed'])}): temporary outputs (a run's weights, deleted once its "
            "evaluations had read them); their hashes stay on record"
        )
        for item in report["removed"]:
            lines.append(f"  {_show(item['path'])}  recorded {_short(item['recorded'][0]['sha256'])}")
    if report["external"]:
        lines.append(
            f"External ({len(report['external'])}): outside the workflow folder {report['workdir']}, so not read "
            "(--external checks them too)"
        )
        for item in report["external"]:
            lines.append(
                f"  {item['path']}  recorded {_short(item['recorded'][0]['sha256'])} by {item['recorded'][0]['by']}"
            )
    if report["runs"]:
        lines.append(f"\nRuns ({len(report['runs'])}):")
        lines += [f"  {run}" for run in report["runs"]]
    lines.append("\nStages, from the result back to the raw files:")
    for stage in report["stages"]:
        git = stage["git"] or {}
        commit = (git.get("commit") or "")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
        lines.append(f"  {stage['label']}  finished {stage['finished']} on {stage['host']}")
        lines.append(f"    code: {_code(stage['code'])}; git {commit or 'none'}")
        for name, value in stage["params"].items():
            if name != "code":
                lines.append(f"    param {name} = {json.dumps(value)}")
        for entry in stage["inputs"]:
            lines.append(f"    in  {entry['name']}: {_show(entry['path'])}  sha256 {_short(entry['sha256'])}")
        for entry in stage["outputs"]:
            lines.append(f"    out {entry['name']}: {_show(entry['path'])}  sha256 {_short(entry['sha256'])}")
    lines.append("\nRaw files (read by the workflow, written by none of its jobs):")
    for raw in report["raw_files"]:
        where = " (external)" if raw.get("external") else ""
        lines.append(
            f"  {_show(raw['path'])}{where}  sha256 {raw['sha256']}  read by {', '.join(raw['read_by'])}"
        )
    if not report["raw_files"]:
        lines.append("  none: every input was generated by the workflow (synthetic data)")
    images = report["images"]
    counts = ", ".join(f"{split} {len(rows)}" for split, rows in images["by_split"].items())
    lines.append(f"\nRaw images: {images['count']} ({counts or 'no image-level content'})")
    if report["raw_image_source"]:
        checked = (
            "" if report["raw_images_checked"] or not report["verified"] else " (not rehashed: external)"
        )
        lines.append(f"  from {_show(report['raw_image_source'])}{checked}")
    for split, rows in images["by_split"].items():
        lines += [f"  {split:5} {r['image_id']}  sha256 {r['sha256']}  {r['member']}" for r in rows]
    return "\n".join(lines) + "\n"
