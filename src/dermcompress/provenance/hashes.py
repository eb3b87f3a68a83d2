"""Hashes of what jobs read and write: a file's sha256 over its bytes, a folder's over its listing (one
`sha256  relative/path` line per content file, as sha256sum prints them).

A job's record states, for each file it wrote or read through data/integrity.py (every file one stage hands to
another), the sha256 of the very bytes it wrote or read and verified. Other files (raw inputs, a cache's
_info.json) are hashed once: later jobs reuse a hash from a memo (results/.lineage/hashes) only while the file's
size, mtime, ctime, inode and device are all unchanged. The ctime is what makes that safe against a rewrite that
restores the mtime (`touch -r`, `os.utime`, `cp -p` over it): no program can set it back. Rot below the file
system changes nothing a stat shows; the checksums readers verify (integrity.py, cache _info.json) catch it.
A cache's shard hashes come from its _info.json, which its readers verify. The audit trusts none of that and
rehashes everything it checks (checks.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dermcompress.data import integrity
from dermcompress.data.cache import INFO, file_sha256

MEMO_DIR = Path("results/.lineage/hashes")
# The names of records kept beside outputs outside a results/ folder (records.py): never a folder's content.
RECORD_SUFFIX = ".lineage.json"
RECORD_IN_DIR = "_lineage.json"
# Files inside a directory output that are not its content: such a record and Snakemake's time stamp.
NOT_CONTENT = (RECORD_IN_DIR, ".snakemake_timestamp")


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
            if os.path.islink(full) and not within(Path(full), root):
                continue
            found.append(Path(full).relative_to(directory).as_posix())
    return sorted(found)


def within(path: Path, root: Path) -> bool:
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
    return list(integrity.stat_key(path))


def _memo_file(memo_dir: Path, path: Path) -> Path:
    return memo_dir / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]}.json"


def read_json(path: Path, max_bytes: int = 64 * 2**20) -> Any:
    """A JSON file's content, or None if it is not a regular file (a FIFO would block), too big or invalid."""
    try:
        if not path.is_file() or path.stat().st_size > max_bytes:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_atomic(path: Path, text: str) -> None:
    """A record or memo, atomically (a unique temporary name, removed on error). Not fsynced: a crash can
    leave one empty, which the audit reports as malformed (a record) or the next job rehashes (a memo)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = integrity.temporary_name(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def info_hashes(directory: Path) -> dict[str, str]:
    """Shard hashes a cache's _info.json vouches for (the job that wrote the cache hashed them as it wrote them)."""
    info = read_json(directory / INFO)
    shards = info.get("shards", []) if isinstance(info, dict) else []
    return {s["path"]: s["sha256"] for s in shards if isinstance(s, dict) and "path" in s and "sha256" in s}


def file_hashes(
    path: str | Path, *, memo_dir: Path | None = None, trust_info: bool = False, seen: bool = False
) -> dict[str, str]:
    """{relative path: sha256} of a directory's content files, or {"": sha256} of a file.

    With `seen`, the hash this process wrote or read and verified a file with (integrity.seen_sha256); with
    `memo_dir`, hashes whose file is still the one it was (integrity.stat_key) are reused and new ones
    remembered; with `trust_info`, a cache directory's shard hashes are taken from its _info.json.
    """
    path = Path(path)
    rels = _content_files(path) if path.is_dir() else [""]
    stats = {rel: _stat(path / rel) for rel in rels}
    known = info_hashes(path) if trust_info and path.is_dir() else {}
    memo = (read_json(_memo_file(memo_dir, path)) or {}) if memo_dir else {}
    width = len(next(iter(stats.values()), []))
    hashes = {}
    for rel in rels:
        if seen and (sha := integrity.seen_sha256(path / rel if rel else path)):
            hashes[rel] = sha
        elif rel in known:
            hashes[rel] = known[rel]
        elif isinstance(memo.get(rel), list) and memo[rel][:width] == stats[rel]:
            hashes[rel] = memo[rel][width]
    todo = [rel for rel in rels if rel not in hashes]
    hashes.update(zip(todo, _hash_all([path / rel for rel in todo]), strict=True))
    if memo_dir and todo:
        memo = {rel: [*stats[rel], hashes[rel]] for rel in rels}
        write_atomic(_memo_file(memo_dir, path), json.dumps(memo))
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
