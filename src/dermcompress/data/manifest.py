"""The manifest (one row per image id, `ok` or `quarantined`) and quarantine.csv: their columns and writing them,
from one ingest job or gathered from the parts of a scattered one.

Group ids are only given here, over all rows at once: a patient's or a lesion's images may fall in different
parts of a scattered ingest.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa

from dermcompress.data import integrity
from dermcompress.data.groups import connected_groups

log = logging.getLogger(__name__)

# manifest.parquet; patient_id only when the metadata has that column (ISIC 2019 has not), duplicate_group only
# when the source lists duplicate pairs (ISIC 2020).
MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("member", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("mode", pa.string()),
        ("format", pa.string()),
        ("label", pa.string()),
        ("lesion_id", pa.string()),
        ("patient_id", pa.string()),
        ("group_id", pa.string()),
        ("duplicate_group", pa.string()),
        ("age_approx", pa.float64()),
        ("anatom_site_general", pa.string()),
        ("sex", pa.string()),
        # What some sources give (datasets.METADATA_FIELDS), null elsewhere: the subgroup analysis may use it.
        ("fitzpatrick_skin_type", pa.string()),
        ("image_type", pa.string()),
        ("dermoscopic_type", pa.string()),
        ("diagnosis_confirm_type", pa.string()),
        ("synthetic", pa.bool_()),
    ]
)
QUARANTINE_COLUMNS = ["image_id", "reason", "member", "detail"]
# A cell starting with one of these is a formula to a spreadsheet (OWASP, CSV injection): quarantine.csv
# prefixes it with a quote, so opening the file shows the text and runs nothing.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """Text cells that a spreadsheet would run as a formula, prefixed with a quote (OWASP's advice)."""
    return frame.map(lambda v: f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_START) else v)


def write_part(
    rows: list[dict], columns: dict[str, bool], about: dict[str, str], *, manifest_out, part: int, parts: int
) -> pd.DataFrame:
    """The rows of one part of a scattered ingest, unfinished (no group ids; gather_ingest gives them), with the
    optional `columns` to keep and the schema metadata `about` recorded for the gather."""
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    keep = {f"keep_{c}": str(v) for c, v in columns.items()}
    integrity.write_parquet(manifest_out, table.replace_schema_metadata({**about, **keep}))
    log.info("part %d of %d: %d image ids, written to %s", part + 1, parts, len(rows), manifest_out)
    return table.to_pandas()


def gather_ingest(
    parts: list[str | Path], *, manifest_out: str | Path, quarantine_out: str | Path
) -> pd.DataFrame:
    """The manifest and quarantine.csv from a scattered ingest's parts: the same files one job would write."""
    tables = [integrity.read_parquet(p) for p in parts]
    meta = {k.decode(): v.decode() for k, v in (tables[0].schema.metadata or {}).items()}
    columns = {c: meta.pop(f"keep_{c}") == "True" for c in ("patient_id", "duplicate_group")}
    rows = sorted((r for t in tables for r in t.to_pylist()), key=lambda r: r["image_id"])
    if not rows:
        raise ValueError(f"no image in any of the {len(parts)} ingest parts {[str(p) for p in parts]}")
    return write_manifest(rows, columns, meta, manifest_out=manifest_out, quarantine_out=quarantine_out)


def write_manifest(
    rows: list[dict], columns: dict[str, bool], about: dict[str, str], *, manifest_out, quarantine_out
) -> pd.DataFrame:
    """Group ids (the connected components of shared patients, lesions and duplicates, over all rows), the
    manifest with the optional `columns` it keeps and the schema metadata `about`, quarantine.csv, and the
    log's counts."""
    frame = pd.DataFrame(rows)
    for row, group in zip(
        rows, connected_groups(frame, ["patient_id", "lesion_id", "duplicate_group"], ()), strict=True
    ):
        row["group_id"] = group
    schema = MANIFEST_SCHEMA
    # No column rather than an all-null one: the split links images by the id columns that exist.
    for column, keep in columns.items():
        if not keep:
            schema = schema.remove(schema.get_field_index(column))
    table = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(about)
    integrity.write_parquet(manifest_out, table)
    manifest = table.to_pandas()
    quarantined = manifest[manifest["status"] == "quarantined"]
    Path(quarantine_out).parent.mkdir(parents=True, exist_ok=True)
    neutralise_formulas(quarantined[QUARANTINE_COLUMNS]).to_csv(
        quarantine_out, index=False, lineterminator="\n"
    )

    listed, ok = len(manifest), int((manifest["status"] == "ok").sum())
    assert manifest["image_id"].is_unique, "manifest has a duplicated image_id"
    assert listed == ok + len(quarantined), (listed, ok, len(quarantined))
    per_reason = Counter(quarantined["reason"])
    for reason, count in per_reason.most_common():
        example = quarantined[quarantined["reason"] == reason].iloc[0]
        log.warning("quarantined %d: %s (e.g. %s: %s)", count, reason, example["image_id"], example["detail"])
    log.info("wrote %s and %s", manifest_out, quarantine_out)
    log.info(
        "listed=%d ok=%d quarantined=%d%s",
        listed,
        ok,
        len(quarantined),
        "".join(f" {r}={c}" for r, c in sorted(per_reason.items())),
    )
    return manifest
