"""Ingest: the official ISIC 2019 files -> one manifest row per image, each problem quarantined with a reason.

Every image file is read once, hashed (sha256) and decoded to its end (a JPEG at 1/8 scale: every byte is still
entropy-decoded, so a truncated or corrupt file fails as in a full decode). Nothing is dropped silently: an image id seen in either CSV or on disk gets exactly one
row, `ok` or `quarantined` with the first problem found, so listed = ok + quarantined.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zlib
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from dermcompress.data.datasets import (
    LABEL_COLUMNS,
    default_labels,
    join_extra,
    lesion_conflicts,
    read_source,
)
from dermcompress.data.groups import connected_groups
from dermcompress.data.images import ImageError, decode_image, image_size
from dermcompress.data.sources import (
    DEFAULT_MAX_FILE_BYTES,
    SYNTHETIC_BANNER,
    SourceError,
    image_id_of,
    image_paths,
    open_images,
)

log = logging.getLogger(__name__)

# Reasons decided from the CSVs and the file listing; refused names use sources.unsafe_reason() and
# link_outside_root, reading sources.READ_REASONS, decoding images.REASONS. When an image has several problems
# the first in this order wins: refused name (unsafe zip entry, link outside the root), duplicate_row,
# no_label_row, unmapped_diagnosis / invalid_label / no_label / multiple_labels, metadata_conflict (extra
# metadata that contradicts the source's, a lesion given two patients), missing_file, duplicate_file, reading,
# decoding.
CSV_REASONS = (
    "duplicate_row",
    "no_label_row",
    "unmapped_diagnosis",
    "invalid_label",
    "no_label",
    "multiple_labels",
    "metadata_conflict",
    "missing_file",
    "duplicate_file",
)

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
        ("synthetic", pa.bool_()),
    ]
)
QUARANTINE_COLUMNS = ["image_id", "reason", "member", "detail"]
# A cell starting with one of these is a formula to a spreadsheet (OWASP, CSV injection): quarantine.csv
# prefixes it with a quote, so opening the file shows the text and runs nothing.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# The smallest side a JPEG may be decoded to when it is only checked: libjpeg's 1/8 scale, whatever the size.
VERIFY_DRAFT = 1
METADATA_FIELDS = ("lesion_id", "patient_id", "age_approx", "anatom_site_general", "sex")


def inspect_image(data: bytes, *, max_pixels: int) -> dict:
    """Hash and decode one file: sha256, bytes, upright width/height, original mode/format, or why not.

    A JPEG is decoded at 1/8 scale (VERIFY_DRAFT): libjpeg still reads and entropy-decodes every byte of it, so
    truncation and corrupt data are caught as in a full decode, but it skips most of the inverse DCT and colour
    work (3-4x faster). The size is the header's. Runs in worker threads, so it touches nothing shared.
    """
    info: dict = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "reason": None,
        "detail": None,
    }
    try:  # the header alone: what the file is, before conversion to RGB
        with Image.open(io.BytesIO(data)) as header:
            info["mode"], info["format"] = header.mode, header.format
    except Exception:
        info["mode"] = info["format"] = None
    try:
        decode_image(data, max_pixels=max_pixels, draft_size=VERIFY_DRAFT)
        info["width"], info["height"] = image_size(data)
    except ImageError as err:
        info["reason"], info["detail"] = err.reason, err.detail
    return info


def _labels(gt: pd.DataFrame) -> pd.DataFrame:
    """Per ground-truth row: the positive classes, and the cells that are not a one-hot 0.0 or 1.0.

    One-hot means exactly one 1.0 and the rest 0.0: a soft label (0.6 / 0.4), an out-of-range value (2.0), a
    blank or a word is not a label to guess from, so such a row is quarantined with those cells named.
    """
    columns = [c for c in LABEL_COLUMNS if c in gt.columns]
    cells = gt[columns]
    values = cells.apply(pd.to_numeric, errors="coerce")
    positive = (values == 1.0).to_numpy()
    invalid = ~(values.isin([0.0, 1.0])).to_numpy()
    raw = cells.to_numpy(dtype=object)
    rows = []
    for i in range(len(gt)):
        bad = [f"{columns[j]}={_cell(raw[i, j])}" for j in np.flatnonzero(invalid[i])]
        rows.append(([columns[j] for j in np.flatnonzero(positive[i])], bad))
    return pd.DataFrame(
        {"image": gt["image"], "positives": [p for p, _ in rows], "invalid": [b for _, b in rows]}
    )


def _cell(value) -> str:
    return "(blank)" if value is None or (isinstance(value, float) and np.isnan(value)) else repr(str(value))


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """Text cells that a spreadsheet would run as a formula, prefixed with a quote (OWASP's advice)."""
    return frame.map(lambda v: f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_START) else v)


def _unreadable(err: SourceError) -> dict:
    """What the manifest records of a file that was not read (too large, a damaged or encrypted zip entry)."""
    return {"sha256": None, "bytes": None, "reason": err.reason, "detail": err.detail}


def _inspect_files(source, members: list[str], *, max_pixels: int) -> dict[str, dict]:
    """inspect_image() over `members` of `source` (sources.open_images): bytes are read here in order (zip entry by entry), decoded in threads.

    PIL and hashlib release the GIL, so threads decode in parallel. Files waiting for a thread hold at most
    `workers` x max_bytes (and 4 per worker), so memory stays bounded whatever the files declare.
    """
    workers = max(
        1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )
    results: dict[str, dict] = {}
    pending: dict[Future, tuple[str, int]] = {}
    bar = tqdm(total=len(members), desc="ingest", unit="img", mininterval=5)

    def collect(done: set[Future]) -> None:
        for future in done:
            results[pending.pop(future)[0]] = future.result()
            bar.update()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for member in members:
            try:
                data = source.read(member)
            except SourceError as err:
                results[member] = _unreadable(err)
                bar.update()
                continue
            pending[pool.submit(inspect_image, data, max_pixels=max_pixels)] = (member, len(data))
            while pending and (
                len(pending) >= 4 * workers
                or sum(n for _, n in pending.values()) >= workers * source.max_bytes
            ):
                collect(wait(pending, return_when=FIRST_COMPLETED).done)
        collect(wait(pending).done)
    bar.close()
    return results


def _first(value):
    """A CSV cell as a Python value, NaN -> None."""
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else value


def _duplicate_groups(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """image -> the smallest image id of its duplicate pairs' component (only images in some pair): with no
    link column, connected_groups names each component so."""
    if not pairs:
        return {}
    ids = sorted({i for pair in pairs for i in pair})
    return dict(zip(ids, connected_groups(pd.DataFrame({"image_id": ids}), [], pairs), strict=True))


def run_ingest(
    *,
    images: str | Path | list[str],
    manifest_out: str | Path,
    quarantine_out: str | Path,
    max_pixels: int,
    source: str = "isic2019",
    labels: str | Path | None = None,
    metadata: str | Path | None = None,
    duplicates: str | Path | None = None,
    extra_metadata: str | Path | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    synthetic: bool = False,
    part: int = 0,
    parts: int = 1,
) -> pd.DataFrame:
    """Check every listed and present image of `source` (datasets.py: its label file, ISIC 2019's metadata CSV,
    ISIC 2020's duplicates list; one image folder or zip, or several); write the manifest and quarantine.csv;
    return the manifest. `extra_metadata`: a CSV keyed by image id whose patient and lesion ids (and other
    metadata fields) join onto the source's (datasets.join_extra).

    With `parts` > 1 (a scattered job) only the images of part `part` (in_part) are checked, and
    `manifest_out` receives their rows, unfinished (gather_ingest finishes them: groups span parts), and no
    quarantine.csv.

    An input file that cannot be parsed at all (a CSV, the zip) stops the run with a DataFileError naming it.
    """
    if synthetic:
        log.warning(SYNTHETIC_BANNER)
    labels = labels or default_labels(source, images)
    paths = {"labels": labels, "metadata": metadata, "duplicates": duplicates}
    tables = read_source(source, {k: v for k, v in paths.items() if v is not None})
    gt, meta = tables.gt, tables.meta
    log.info("%s labels: %d rows (%s); metadata: %d rows", source, len(gt), labels, len(meta))
    conflicts: dict[str, tuple[str, str]] = {}
    if extra_metadata is not None:
        meta, conflicts = join_extra(meta, extra_metadata)
    for image, problem in lesion_conflicts(meta).items():
        conflicts.setdefault(image, problem)
    duplicate_of = _duplicate_groups(tables.pairs)

    gt_rows = gt["image"].value_counts().to_dict()
    meta_rows = meta["image"].value_counts().to_dict()
    labels_of = _labels(gt).drop_duplicates("image").set_index("image")
    positives, invalid = labels_of["positives"].to_dict(), labels_of["invalid"].to_dict()
    meta_first = meta.drop_duplicates("image").set_index("image").to_dict("index")

    with open_images(images, max_bytes=max_file_bytes) as container:
        listing = list(container.members())
        files: dict[str, list[str]] = {}
        for member, image_id in listing:
            files.setdefault(image_id, []).append(member)
        refused: dict[str, tuple[str, str, str]] = {}
        for name, reason, detail in container.refused:
            image_id = image_id_of(name)
            if image_id is None:
                log.warning(
                    "refused %r (%s: %s); not an image name, so it has no manifest row", name, reason, detail
                )
            else:
                refused.setdefault(image_id, (name, reason, detail))
        if container.ignored:
            log.info(
                "%d non-image file(s) in %s, not in the manifest: %s",
                len(container.ignored),
                images,
                ", ".join(container.ignored[:50]) + (" ..." if len(container.ignored) > 50 else ""),
            )
        log.info(
            "%d image file(s) in %s, %d refused (unsafe zip entries, links out of the folder)",
            len(listing),
            images,
            len(container.refused),
        )
        to_decode = sorted(
            members[0]
            for image_id, members in files.items()
            if image_id not in refused and in_part(image_id, part, parts)
        )
        inspected = _inspect_files(container, to_decode, max_pixels=max_pixels)

    rows = []
    for image_id in sorted(set(gt_rows) | set(meta_rows) | set(files) | set(refused)):
        if not in_part(image_id, part, parts):
            continue
        members = files.get(image_id, [])
        problems: list[tuple[str, str]] = []  # (reason, detail), in the order of precedence
        if image_id in refused:
            problems.append(refused[image_id][1:])
        n_gt, n_meta = gt_rows.get(image_id, 0), meta_rows.get(image_id, 0)
        if n_gt > 1 or n_meta > 1:
            problems.append(("duplicate_row", f"{n_gt} ground-truth row(s), {n_meta} metadata row(s)"))
        if image_id not in gt_rows:
            where = "a file" if members else "only a metadata row"
            problems.append(("no_label_row", f"{where}, no row in the ground truth"))
        elif image_id in tables.problems:  # an unmapped diagnosis, a label the source contradicts
            problems.append(tables.problems[image_id])
        else:
            classes = positives[image_id]
            if invalid[image_id]:
                problems.append(
                    (
                        "invalid_label",
                        f"{', '.join(invalid[image_id])} in the ground truth: one-hot labels are exactly one 1.0 "
                        "and the rest 0.0",
                    )
                )
            elif not classes:
                problems.append(("no_label", "no positive class in the ground-truth row"))
            elif len(classes) > 1:
                problems.append(("multiple_labels", f"positive for {', '.join(classes)}"))
        if image_id in conflicts:
            problems.append(conflicts[image_id])
        if not members and image_id not in refused:
            problems.append(("missing_file", "no image file with this id"))
        if len(members) > 1:
            problems.append(("duplicate_file", f"{len(members)} files with this id: {', '.join(members)}"))
        info = inspected.get(members[0], {}) if members and image_id not in refused else {}
        if info.get("reason"):
            problems.append((info["reason"], info["detail"]))

        classes = positives.get(image_id, []) if not invalid.get(image_id) else []
        fields = meta_first.get(image_id, {})
        record = {f: _first(fields.get(f)) for f in METADATA_FIELDS}
        reason, detail = problems[0] if problems else (None, None)
        rows.append(
            {
                "image_id": image_id,
                "status": "quarantined" if problems else "ok",
                "reason": reason,
                "detail": detail,
                "member": refused[image_id][0] if image_id in refused else (members[0] if members else None),
                **{k: info.get(k) for k in ("sha256", "bytes", "width", "height", "mode", "format")},
                "label": classes[0] if len(classes) == 1 else None,
                **record,
                "group_id": None,  # below: the connected components of shared patients, lesions, duplicates
                "duplicate_group": duplicate_of.get(image_id),
                "synthetic": bool(synthetic),
            }
        )
    columns = {"patient_id": "patient_id" in meta.columns, "duplicate_group": bool(duplicate_of)}
    about = {
        "source": source,
        "images": ";".join(image_paths(images)),
        "max_pixels": str(max_pixels),
        "synthetic": str(bool(synthetic)),
    }
    if parts > 1:
        part_table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
        keep = {f"keep_{c}": str(v) for c, v in columns.items()}
        Path(manifest_out).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(part_table.replace_schema_metadata({**about, **keep}), manifest_out)
        log.info("part %d of %d: %d image ids, written to %s", part + 1, parts, len(rows), manifest_out)
        return part_table.to_pandas()
    if not rows:
        raise ValueError(f"no image listed in {labels} or {metadata}, and none found in {images}")
    return write_manifest(rows, columns, about, manifest_out=manifest_out, quarantine_out=quarantine_out)


def in_part(image_id: str, part: int, parts: int) -> bool:
    """Whether an image id belongs to part `part` of `parts` (a stable hash of the id alone, so every file, row
    and problem of one id lands in one part, whatever the listing order)."""
    return parts == 1 or zlib.crc32(image_id.encode()) % parts == part


def gather_ingest(
    parts: list[str | Path], *, manifest_out: str | Path, quarantine_out: str | Path
) -> pd.DataFrame:
    """The manifest and quarantine.csv from a scattered ingest's parts: the same files one job would write."""
    tables = [pq.read_table(p) for p in parts]
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
    Path(manifest_out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, manifest_out)
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
