"""Files that stages hand to each other: written so that a fault never publishes a partial one, with a checksum
the writer records and every reader verifies before use.

Every such file (splits, task, manifest, predictions, metrics, features, probe heads, kept weights, checkpoints)
is written through `atomic_write`: a temporary name unique to the process and the attempt, fsync, then an atomic
rename; on an error the temporary file is removed, and a full disk is reported naming the file. Beside it the
writer stores the sha256 of its bytes, `.<name>.sha256` in sha256sum's format (`sha256sum -c` checks it by hand),
written before the rename so that a crash never pairs a new file with no checksum. A reader (`read_bytes` and
the typed readers below) reads the file once, hashes the bytes in memory and parses those very bytes; a
mismatch raises ChecksumError naming the file and how to recover. It is what a cache folder's `_info.json`
does for its shards (cache.py), generalised to single files: one whole-file sha256, whatever the format.

Why beside the file and not inside it: a checksum in a parquet footer or a JSON key cannot cover itself, so it
would leave the footer (schema, column names, offsets) or the key unchecked; a sidecar covers every byte of any
format, and travels with the folder. The hash is sha256, the one lineage records and cache shards state, so the
job's record (provenance/records.py) takes each file's hash from here (`seen_sha256`): what the job wrote, or
read and verified, and never a remembered value.

A file with no checksum (written by hand, or by a version before checksums) is read with a warning: its hash is
still the one of the bytes read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger(__name__)

SUFFIX = ".sha256"
# What a full disk or quota looks like from the libraries that write files for us.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class IntegrityError(Exception):
    """A file that cannot be used as it is."""


class ChecksumError(IntegrityError):
    """A file whose bytes differ from the checksum its writer recorded."""


class WriteError(OSError):
    """A write that failed (a full disk, most often); nothing partial was left behind."""


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checksum_path(path: str | Path) -> Path:
    """Where the checksum of `path` lives: `.<name>.sha256` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}{SUFFIX}")


def is_checksum(path: str | Path) -> bool:
    name = Path(path).name
    return name.startswith(".") and name.endswith(SUFFIX)


def recovery(path: str | Path) -> str:
    return (
        f"to recover, rerun the job that writes it (snakemake --forcerun {path}), "
        "or delete it and run snakemake again"
    )


# ------------------------------------------------------------------------------------------ what was hashed

# sha256 of every file this process wrote or read and verified, with its stat_key then: what the job's lineage
# record states (a file changed since is hashed again).
_SEEN: dict[str, tuple[str, tuple[int, ...]]] = {}


def _key(path: str | Path) -> str:
    return os.path.realpath(path)


def stat_key(path: str | Path) -> tuple[int, ...]:
    """What says a file is still the one it was: size, mtime and ctime (which no program can set back, so
    rewriting a file and restoring its mtime, or `cp -p` over it, changes it), inode and device."""
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _remember(path: str | Path, sha: str) -> None:
    _SEEN[_key(path)] = (sha, stat_key(path))


def seen_sha256(path: str | Path) -> str | None:
    """The sha256 this process wrote or read `path` with, if the file is still the one it was; else None."""
    known = _SEEN.get(_key(path))
    if known is None:
        return None
    try:
        return known[0] if stat_key(path) == known[1] else None
    except OSError:
        return None


# ------------------------------------------------------------------------------------------ writing


class _HashingFile:
    """A binary file that hashes what is written to it and keeps the first OSError (a library may swallow it
    into an error of its own that names no file)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.hash, self.error = raw, hashlib.sha256(), None
        self.closed = False

    def write(self, data) -> int:
        try:
            written = self.raw.write(data)
        except OSError as err:
            self.error = self.error or err
            raise
        self.hash.update(memoryview(data)[:written] if written is not None else data)
        return len(memoryview(data)) if written is None else written

    def flush(self) -> None:
        try:
            self.raw.flush()
        except OSError as err:
            self.error = self.error or err
            raise

    def tell(self) -> int:
        return self.raw.tell()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False


def temporary_name(path: Path) -> Path:
    """A temporary name beside `path`, unique to this process and attempt (a requeued job racing its retry)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _write_small(path: Path, text: str) -> None:
    tmp = temporary_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | Path, *, checksum: bool = True) -> Iterator[_HashingFile]:
    """A binary file to write `path` through: a unique temporary name, fsync, its checksum beside it, then an
    atomic rename. On any error the temporary file is removed; a full disk (or any OSError) is re-raised as a
    WriteError that names `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    out = None
    try:
        with open(tmp, "wb") as raw:
            out = _HashingFile(raw)
            yield out
            out.flush()
            os.fsync(raw.fileno())
        sha = out.hash.hexdigest()
        if checksum:
            # Before the rename: a crash in between leaves the old file with the new checksum, a mismatch
            # every reader reports, never a new file with none (or an old one).
            _write_small(checksum_path(path), f"{sha}  {path.name}\n")
        else:
            checksum_path(path).unlink(missing_ok=True)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        _remember(path, sha)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = out.error if out is not None and out.error is not None else err
        if isinstance(cause, OSError) and not isinstance(cause, WriteError):
            full = cause.errno in DISK_FULL
            what = "the disk is full" if full else cause.strerror or str(cause)
            raise WriteError(
                cause.errno,
                f"could not write {path}: {what} ({err}); no partial file was left behind"
                + ("; free some space and run again" if full else ""),
            ) from err
        raise


def write_bytes(path: str | Path, data: bytes | memoryview, *, checksum: bool = True) -> str:
    """Write `data` to `path` (atomic_write); its sha256."""
    with atomic_write(path, checksum=checksum) as f:
        f.write(data)
    return f.hash.hexdigest()


def write_text(path: str | Path, text: str) -> str:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, payload: Any, **dumps: Any) -> str:
    """`payload` as JSON (indent 2 unless given), a newline at the end."""
    return write_text(path, json.dumps(payload, **{"indent": 2, **dumps}) + "\n")


def write_parquet(path: str | Path, table: pa.Table | pd.DataFrame, **options: Any) -> str:
    """A table (or a frame, without its index) as parquet, through atomic_write; options go to pq.write_table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_write(path) as f:
        pq.write_table(table, f, **options)
    return f.hash.hexdigest()


# ------------------------------------------------------------------------------------------ reading


def recorded_sha256(path: str | Path) -> str | None:
    """The checksum the writer stored for `path`, None if there is none."""
    try:
        text = checksum_path(path).read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ChecksumError(f"the checksum of {path} is unreadable ({err}): {recovery(path)}") from None
    return text.split(maxsplit=1)[0] if text.strip() else ""


def verify_bytes(path: str | Path, data: bytes | memoryview) -> str:
    """Check bytes read from `path` against its recorded checksum; their sha256. Raises ChecksumError."""
    sha = sha256_bytes(data)
    recorded = recorded_sha256(path)
    if recorded is None:
        log.warning("%s has no checksum (written by hand or by an older version): not verified", path)
    elif sha != recorded:
        raise ChecksumError(
            f"{path} is corrupt or was changed after it was written: sha256 {sha}, but its writer recorded "
            f"{recorded} (in {checksum_path(path)}); {recovery(path)}"
        )
    _remember(path, sha)
    return sha


def read_bytes(path: str | Path) -> bytes:
    """The bytes of `path`, verified against its checksum."""
    data = Path(path).read_bytes()
    verify_bytes(path, data)
    return data


def verify_file(path: str | Path) -> str:
    """Verify `path` without keeping its bytes (a file a library reads by name); its sha256."""
    sha = file_sha256(path)
    recorded = recorded_sha256(path)
    if recorded is None:
        log.warning("%s has no checksum (written by hand or by an older version): not verified", path)
    elif sha != recorded:
        raise ChecksumError(
            f"{path} is corrupt or was changed after it was written: sha256 {sha}, but its writer recorded "
            f"{recorded} (in {checksum_path(path)}); {recovery(path)}"
        )
    _remember(path, sha)
    return sha


def read_json(path: str | Path) -> Any:
    return json.loads(read_bytes(path))


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A parquet file's table (or some columns), read from its verified bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = read_bytes(path)
    with pq.ParquetFile(pa.BufferReader(data)) as file:
        return file.read(columns=columns)


def read_frame(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """read_parquet as a pandas frame (the pandas dtypes the file recorded)."""
    return read_parquet(path, columns).to_pandas()
