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
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from dermcompress import ISIC_CLASSES
from dermcompress.images import ImageError, decode_image, image_size
from dermcompress.sources import (
    DEFAULT_MAX_FILE_BYTES,
    SYNTHETIC_BANNER,
    DataFileError,
    ImageSource,
    SourceError,
    image_id_of,
)

log = logging.getLogger(__name__)

# Reasons decided from the CSVs and the file listing; refused names use sources.unsafe_reason() and
# link_outside_root, reading sources.READ_REASONS, decoding images.REASONS. When an image has several problems
# the first in this order wins: refused name (unsafe zip entry, link outside the root), duplicate_row,
# no_label_row, invalid_label / no_label / multiple_labels, missing_file, duplicate_file, reading, decoding.
CSV_REASONS = (
    "duplicate_row",
    "no_label_row",
    "invalid_label",
    "no_label",
    "multiple_labels",
    "missing_file",
    "duplicate_file",
)
LABEL_COLUMNS = (*ISIC_CLASSES, "UNK")

# manifest.parquet; patient_id only when the metadata has that column (ISIC 2019 has not).
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


def _read_csv(path: str | Path, **kwargs) -> pd.DataFrame:
    """pd.read_csv, with every way the file can be unreadable said in one line that names it."""
    try:
        return pd.read_csv(path, skipinitialspace=True, **kwargs)
    except pd.errors.EmptyDataError:
        raise DataFileError(path, "the file is empty (no header row)") from None
    except UnicodeDecodeError as err:
        raise DataFileError(
            path,
            f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); save it as UTF-8",
        ) from None
    except pd.errors.ParserError as err:
        raise DataFileError(path, f"not a well-formed CSV: {str(err).strip()}") from None


def _read_ground_truth(path: str | Path) -> pd.DataFrame:
    gt = _read_csv(path, dtype=str)
    missing = [c for c in ("image", *ISIC_CLASSES) if c not in gt.columns]
    if missing:
        raise DataFileError(
            path,
            f"ground-truth CSV lacks column(s) {missing}; expected the official header "
            f"image,{','.join(LABEL_COLUMNS)}",
        )
    return _drop_blank_ids(gt, path)


def _drop_blank_ids(frame: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Strip ids; rows without one cannot be matched to anything, so they are logged and left out."""
    frame["image"] = frame["image"].str.strip()
    blank = frame["image"].isna() | (frame["image"] == "")
    if blank.any():
        log.warning(
            "%s: %d row(s) with an empty image id ignored (data rows %s)",
            path,
            blank.sum(),
            ", ".join(str(i + 1) for i in frame.index[blank][:20]),
        )
    return frame[~blank].reset_index(drop=True)


def _read_metadata(path: str | Path) -> pd.DataFrame:
    text_columns = {c: str for c in ("image", "lesion_id", "patient_id", "anatom_site_general", "sex")}
    meta = _read_csv(path, dtype=text_columns)
    if "image" not in meta.columns:
        raise DataFileError(path, f"metadata CSV has no 'image' column (columns: {list(meta.columns)})")
    meta = _drop_blank_ids(meta, path)
    if "age_approx" in meta.columns:
        meta["age_approx"] = pd.to_numeric(meta["age_approx"], errors="coerce")
    return meta


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


def _inspect_files(source: ImageSource, members: list[str], *, max_pixels: int) -> dict[str, dict]:
    """inspect_image() over `members`: bytes are read here in order (zip entry by entry), decoded in threads.

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


def run_ingest(
    *,
    ground_truth: str | Path,
    metadata: str | Path,
    images: str | Path,
    manifest_out: str | Path,
    quarantine_out: str | Path,
    max_pixels: int,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    synthetic: bool = False,
) -> pd.DataFrame:
    """Check every listed and present image; write the manifest and quarantine.csv; return the manifest.

    An input file that cannot be parsed at all (a CSV, the zip) stops the run with a DataFileError naming it.
    """
    if synthetic:
        log.warning(SYNTHETIC_BANNER)
    gt = _read_ground_truth(ground_truth)
    meta = _read_metadata(metadata)
    log.info("ground truth: %d rows (%s); metadata: %d rows (%s)", len(gt), ground_truth, len(meta), metadata)

    gt_rows = gt["image"].value_counts().to_dict()
    meta_rows = meta["image"].value_counts().to_dict()
    labels = _labels(gt).drop_duplicates("image").set_index("image")
    positives, invalid = labels["positives"].to_dict(), labels["invalid"].to_dict()
    meta_first = meta.drop_duplicates("image").set_index("image").to_dict("index")

    with ImageSource(Path(images), max_bytes=max_file_bytes) as source:
        listing = list(source.members())
        files: dict[str, list[str]] = {}
        for member, image_id in listing:
            files.setdefault(image_id, []).append(member)
        refused: dict[str, tuple[str, str, str]] = {}
        for name, reason, detail in source.refused:
            image_id = image_id_of(name)
            if image_id is None:
                log.warning(
                    "refused %r (%s: %s); not an image name, so it has no manifest row", name, reason, detail
                )
            else:
                refused.setdefault(image_id, (name, reason, detail))
        if source.ignored:
            log.info(
                "%d non-image file(s) in %s, not in the manifest: %s",
                len(source.ignored),
                images,
                ", ".join(source.ignored),
            )
        log.info(
            "%d image file(s) in %s, %d refused (unsafe zip entries, links out of the folder)",
            len(listing),
            images,
            len(source.refused),
        )
        to_decode = sorted(members[0] for image_id, members in files.items() if image_id not in refused)
        inspected = _inspect_files(source, to_decode, max_pixels=max_pixels)

    rows = []
    for image_id in sorted(set(gt_rows) | set(meta_rows) | set(files) | set(refused)):
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
        group = record["patient_id"] or record["lesion_id"] or image_id
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
                "group_id": group,
                "synthetic": bool(synthetic),
            }
        )
    if not rows:
        raise ValueError(f"no image listed in {ground_truth} or {metadata}, and none found in {images}")

    schema = MANIFEST_SCHEMA
    if "patient_id" not in meta.columns:
        # No column rather than an all-null one: the split takes the first group column that exists.
        schema = schema.remove(schema.get_field_index("patient_id"))
    table = pa.Table.from_pylist(rows, schema=schema)
    table = table.replace_schema_metadata(
        {"images": str(images), "max_pixels": str(max_pixels), "synthetic": str(bool(synthetic))}
    )
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
