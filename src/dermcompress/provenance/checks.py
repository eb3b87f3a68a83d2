"""The hardened checks of the audit: rehash what the walked records name, each path once, and report every
link that does not hold (a changed, missing or unreadable file, a malformed or missing record), without ever
reading a device, a FIFO or, unless asked, a path outside the workflow folder.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from dermcompress.data.cache import INFO

from .hashes import describe, file_hashes, info_hashes, within
from .records import is_temporary
from .walk import Node, Walk

NOT_REGULAR = "not a regular file (a device, FIFO or socket): never read"


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
        return self.read_external or within(path, self.workdir)

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
        for rel, sha in info_hashes(cache_dir).items():
            path = cache_dir / rel
            if not within(path, root):
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


def check_walk(
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
