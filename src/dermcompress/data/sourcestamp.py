"""What of a data source's files decides whether ingest reruns: a stamp the ingest rule carries as a param.

Snakemake reruns a job when an input is newer than its outputs, or when the set of input paths changes. Neither
sees a label file replaced by another with an older time (`cp -p`, an archive extracted with its own dates), nor
images added to or changed in a folder whose own time stays (a folder input counts by its own mtime). The stamp
does, cheaply enough to compute at every start (~0.1 s for 33,000 images): a label, metadata or duplicates file
(a few MB) by its sha256, an image zip (GBs) by its size and mtime, an image folder by the name, size and mtime
of every file in it. The param changing reruns ingest (Snakemake's params trigger), and what follows through
the manifest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

# Digits of each stamp kept: a change detector, not an identity.
DIGITS = 16


def source_stamp(paths: Mapping[str, str | list[str]]) -> dict[str, str]:
    """{role: stamp} of a source's files (datasets.source_paths: labels, metadata, duplicates, images, and any
    extra CSV); a list of paths (HAM10000's two image parts) is stamped as one."""
    stamps = {}
    for role, value in sorted(paths.items()):
        digest = hashlib.sha256()
        for path in [value] if isinstance(value, str | Path) else value:
            digest.update(f"{Path(path).name}\0{_stamp(Path(path))}\n".encode())
        stamps[role] = digest.hexdigest()[:DIGITS]
    return stamps


def _stamp(path: Path) -> str:
    if path.is_dir():
        return _folder_stamp(path)
    if path.suffix.lower() == ".zip":
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _folder_stamp(folder: Path) -> str:
    """A hash over `relative name, size, mtime` of every file under `folder` (links followed to what they name;
    one that leads nowhere counts by its name)."""
    lines = []
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            full = os.path.join(top, name)
            try:
                st = os.stat(full)
                lines.append(f"{os.path.relpath(full, folder)}\0{st.st_size}\0{st.st_mtime_ns}")
            except OSError:
                lines.append(f"{os.path.relpath(full, folder)}\0-")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
