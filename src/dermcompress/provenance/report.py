"""`dermcompress lineage`: everything a result (a file, a run folder, a table or one of its rows) came from, as a
JSON-ready report and as text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .checks import Checker, check_walk
from .hashes import within
from .records import (
    RUN_FILE,
    RUNS_COLUMN,
    LineageError,
    find_record,
    is_table,
    jsonable,
    table_csv,
    table_runs,
    workdir_of,
)
from .walk import Node, Walk, ids_by_split, is_run, manifest_of, merge_ids, run_images, walk


def _starts(path: Path, row: int | None, workdir: Path) -> tuple[list[Path], list[str], list[Path]]:
    """The records to walk from, and the runs a table (row) names, as written and as folders (none otherwise)."""
    if is_table(path):
        csv = table_csv(path)
        table_record = find_record(csv, workdir)
        runs = table_runs(csv, row)
        run_dirs = [workdir / r for r in runs]
        outside = [str(r) for r in run_dirs if not within(r, workdir)]
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


def _unrecorded(path: Path, workdir: Path) -> list[dict[str, Any]]:
    """A table (or its CSV twin) that no job's record vouches for: a broken link, never passed over (a crash
    can leave one truncated once Snakemake's own markers are gone)."""
    if not is_table(path):
        return []
    return [
        {
            "path": str(p.absolute()),
            "problem": "missing record: no job of the workflow recorded writing this table (a crash, or a "
            "copy); rerun the job that writes it (snakemake --forcerun PATH)".replace("PATH", str(p)),
            "by": "the result asked for",
        }
        for p in dict.fromkeys([path, table_csv(path)])
        if find_record(p, workdir) is None
    ]


def _images_used(path: Path, found: Walk, run_dirs: list[Path], workdir: Path) -> dict[str, frozenset[str]]:
    """Image ids per split behind the result: its runs' (a table), the run's, or those the file itself holds."""
    if run_dirs:
        runs = [n for n in found.nodes if is_run(n) and any(n.written.is_relative_to(r) for r in run_dirs)]
        return merge_ids([run_images(n, found, workdir) for n in runs])
    if found.nodes and is_run(found.nodes[0]):
        return run_images(found.nodes[0], found, workdir)
    return ids_by_split(path.absolute(), workdir)


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
    workdir = Path(os.path.realpath(workdir_of(path)))
    starts, runs, run_dirs = _starts(path, row, workdir)

    def follow(node: Node, entry: dict[str, Any]) -> bool:
        if not node.reads(entry):  # another eval variant's input of a job that scored several
            return False
        # A table row follows, of the table's inputs, only those of its own runs.
        if row is None or node.file != starts[0] or is_run(node):
            return True
        return any(node.resolve(entry["path"]).is_relative_to(r) for r in run_dirs)

    found = walk(starts, follow, workdir)
    used = _images_used(path, found, run_dirs, workdir)
    manifest, source = manifest_of(found.nodes, workdir)
    checker = Checker(workdir, external=external)
    for item in found.problems + _unrecorded(path, workdir):
        checker.problem(item)
    if verify:
        check_walk(checker, found, follow, manifest, source, frozenset().union(*used.values()))
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

    values = pd.read_csv(table_csv(path)).iloc[row].drop(RUNS_COLUMN)
    return jsonable({k: None if pd.isna(v) else v for k, v in values.items()})


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
