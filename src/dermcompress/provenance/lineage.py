"""Lineage: what every job read and ran, recorded apart from what it wrote, and the walk from a result back to the
raw files. The API the workflow, the CLI and the tests use; the parts:

hashes.py    sha256 of files and folders (what the job wrote or read and verified, data/integrity.py; a memo
             keyed by size, mtime, ctime and inode; a cache's _info.json)
records.py   a job's record (rule, wildcards, params with the code fingerprint, inputs and outputs with their
             sha256, git, versions, host, times), where it lives (results/.lineage/records/, a mirror of
             results/), reading it back against a schema, and the `runs` column of tables
walk.py      the walk upstream from a record, and the images behind a result
checks.py    rehashing what the records name, every broken link reported
report.py    `dermcompress lineage`: the report, as JSON and as text
"""

from .checks import NOT_REGULAR
from .hashes import describe, file_hashes, listing_digest
from .records import (
    RUNS_COLUMN,
    RUNS_SEPARATOR,
    LineageError,
    clear_records,
    find_record,
    join_runs,
    now,
    read_record,
    record_path,
    runs_of,
    table_runs,
    write_records,
)
from .report import format_text, trace

__all__ = [
    "NOT_REGULAR",
    "RUNS_COLUMN",
    "RUNS_SEPARATOR",
    "LineageError",
    "clear_records",
    "describe",
    "file_hashes",
    "find_record",
    "format_text",
    "join_runs",
    "listing_digest",
    "now",
    "read_record",
    "record_path",
    "runs_of",
    "table_runs",
    "trace",
    "write_records",
]
