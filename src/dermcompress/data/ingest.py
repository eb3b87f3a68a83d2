"""Ingest: the official ISIC 2019 files -> one manifest row per image, each problem quarantined with a reason.

Every image file is read once, hashed (sha256) and decoded to its end (a JPEG at 1/8 scale: every byte is still
entropy-decoded, so a truncated or corrupt file fails as in a full decode). Nothing is dropped silently: an
image id seen in either CSV or on disk gets exactly one row, `ok` or `quarantined` with the first problem found,
so listed = ok + quarantined. The manifest's columns and its writing: manifest.py.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zlib
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from dermcompress.data.datasets import (
    DEFAULT_IMAGE_TYPES,
    LABEL_COLUMNS,
    METADATA_FIELDS,
    default_labels,
    find_synthetic_marker,
    image_type_problems,
    join_extra,
    lesion_conflicts,
    read_source,
)
from dermcompress.data.groups import connected_groups
from dermcompress.data.images import ImageError, decode_image, image_size
from dermcompress.data.manifest import write_manifest, write_part
from dermcompress.data.sources import (
    DEFAULT_MAX_FILE_BYTES,
    SYNTHETIC_BANNER,
    SourceError,
    image_id_of,
    image_paths,
    open_images,
    synthetic_banner,
)

log = logging.getLogger(__name__)

# Reasons decided from the CSVs and the file listing; refused names use sources.unsafe_reason() and
# link_outside_root, reading sources.READ_REASONS, decoding images.REASONS. When an image has several problems
# the first in this order wins: refused name (unsafe zip entry, link outside the root), duplicate_row,
# no_label_row, excluded_image_type (not an image type of data.image_types: the Archive's clinical, TBP and RCM
# images), unmapped_diagnosis / invalid_label / no_label / multiple_labels, metadata_conflict (extra metadata
# that contradicts the source's, a lesion given two patients), missing_file, duplicate_file, reading, decoding.
CSV_REASONS = (
    "duplicate_row",
    "no_label_row",
    "excluded_image_type",
    "unmapped_diagnosis",
    "invalid_label",
    "no_label",
    "multiple_labels",
    "metadata_conflict",
    "missing_file",
    "duplicate_file",
)

# The smallest side a JPEG may be decoded to when it is only checked: libjpeg's 1/8 scale, whatever the size.
VERIFY_DRAFT = 1


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


def _unreadable(err: SourceError) -> dict:
    """What the manifest records of a file that was not read (too large, a damaged or encrypted zip entry)."""
    return {"sha256": None, "bytes": None, "reason": err.reason, "detail": err.detail}


def _inspect_files(source, members: list[str], *, max_pixels: int) -> dict[str, dict]:
    """inspect_image() over `members` of `source` (sources.open_images): bytes are read here in order (zip entry
    by entry), decoded in threads.

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


@dataclass
class _Listed:
    """What the source's CSVs say, per image id."""

    gt_rows: dict[str, int]  # ground-truth rows
    meta_rows: dict[str, int]  # metadata rows
    positives: dict[str, list[str]]  # the positive classes of its (first) ground-truth row
    invalid: dict[str, list[str]]  # the cells of that row that are not a one-hot 0.0 or 1.0
    meta_first: dict[str, dict]  # its first metadata row
    label_problems: dict[str, tuple[str, str]]  # an unmapped diagnosis, a label the source contradicts
    excluded: dict[str, tuple[str, str]]  # excluded_image_type: not an image type of data.image_types
    conflicts: dict[str, tuple[str, str]]  # metadata_conflict: extra metadata against the source's, lesions
    duplicate_of: dict[str, str]  # the duplicate group of an image in some duplicate pair
    has_patient_id: bool


@dataclass
class _Found:
    """What is on disk, per image id: its image files, a refused name, and what inspecting its file found."""

    files: dict[str, list[str]]
    refused: dict[str, tuple[str, str, str]]  # (name, reason, detail)
    inspected: dict[str, dict]  # member -> inspect_image() or _unreadable()


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
    image_types: tuple[str, ...] | list[str] = DEFAULT_IMAGE_TYPES,
    synthetic: bool = False,
    part: int = 0,
    parts: int = 1,
) -> pd.DataFrame:
    """Check every listed and present image of `source` (datasets.py: its label file, ISIC 2019's metadata CSV,
    ISIC 2020's duplicates list; one image folder or zip, or several); write the manifest and quarantine.csv;
    return the manifest. `extra_metadata`: a CSV keyed by image id whose patient and lesion ids (and other
    metadata fields) join onto the source's (datasets.join_extra). An image whose metadata names an image_type
    outside `image_types` (data.image_types: dermoscopic) is quarantined as excluded_image_type.

    With `parts` > 1 (a scattered job) only the images of part `part` (in_part) are checked, and
    `manifest_out` receives their rows, unfinished (manifest.gather_ingest finishes them: groups span parts),
    and no quarantine.csv.

    An input file that cannot be parsed at all (a CSV, the zip) stops the run with a DataFileError naming it.
    """
    labels = labels or default_labels(source, images)
    # A set `dermcompress synth` wrote is synthetic wherever it lies: its marker file says so (data.isic_root
    # pointed at it by hand, where the workflow itself did not generate it).
    marker = find_synthetic_marker(_data_root(labels, images))
    if synthetic:
        log.warning(SYNTHETIC_BANNER)
    elif marker is not None:
        log.warning(synthetic_banner(marker))
    synthetic = bool(synthetic or marker)
    listed = _read_listing(source, labels, metadata, duplicates, extra_metadata, image_types)
    found = _find_images(images, max_file_bytes=max_file_bytes, max_pixels=max_pixels, part=part, parts=parts)
    ids = set(listed.gt_rows) | set(listed.meta_rows) | set(found.files) | set(found.refused)
    rows = [
        _manifest_row(image_id, listed, found, synthetic=synthetic)
        for image_id in sorted(ids)
        if in_part(image_id, part, parts)
    ]
    columns = {"patient_id": listed.has_patient_id, "duplicate_group": bool(listed.duplicate_of)}
    about = {
        "source": source,
        "images": ";".join(image_paths(images)),
        "max_pixels": str(max_pixels),
        "synthetic": str(bool(synthetic)),
        "synthetic_marker": marker or "",
        "image_types": ";".join(image_types),
    }
    if parts > 1:
        return write_part(rows, columns, about, manifest_out=manifest_out, part=part, parts=parts)
    if not rows:
        raise ValueError(f"no image listed in {labels} or {metadata}, and none found in {images}")
    return write_manifest(rows, columns, about, manifest_out=manifest_out, quarantine_out=quarantine_out)


def _data_root(labels, images) -> Path:
    """The data.isic_root a source's files lie in: the label file's folder (the Archive's is its image folder),
    else the image container's."""
    if labels is not None:
        return Path(labels).parent
    return Path(image_paths(images)[0]).parent


def _read_listing(source: str, labels, metadata, duplicates, extra_metadata, image_types) -> _Listed:
    """The source's label file, metadata and duplicates list (those given), and the extra metadata joined on."""
    paths = {"labels": labels, "metadata": metadata, "duplicates": duplicates}
    tables = read_source(source, {k: v for k, v in paths.items() if v is not None})
    gt, meta = tables.gt, tables.meta
    log.info("%s labels: %d rows (%s); metadata: %d rows", source, len(gt), labels, len(meta))
    conflicts: dict[str, tuple[str, str]] = {}
    if extra_metadata is not None:
        meta, conflicts = join_extra(meta, extra_metadata)
    excluded = image_type_problems(meta, tuple(image_types), required=source == "isic_archive")
    if source == "isic_archive" and "image_type" not in meta.columns:
        log.warning(
            "%s has no image_type column: its images cannot be told dermoscopic or not (clinical, TBP, RCM), "
            "so none is excluded by type; download the metadata again with isic-cli to filter them",
            labels,
        )
    for image, problem in lesion_conflicts(meta).items():
        conflicts.setdefault(image, problem)
    labels_of = _labels(gt).drop_duplicates("image").set_index("image")
    return _Listed(
        gt_rows=gt["image"].value_counts().to_dict(),
        meta_rows=meta["image"].value_counts().to_dict(),
        positives=labels_of["positives"].to_dict(),
        invalid=labels_of["invalid"].to_dict(),
        meta_first=meta.drop_duplicates("image").set_index("image").to_dict("index"),
        label_problems=tables.problems,
        excluded=excluded,
        conflicts=conflicts,
        duplicate_of=_duplicate_groups(tables.pairs),
        has_patient_id="patient_id" in meta.columns,
    )


def _find_images(images, *, max_file_bytes: int, max_pixels: int, part: int, parts: int) -> _Found:
    """The image files of `images` per image id, the names refused, and the first file of every image id of
    part `part` that was not refused, inspected."""
    with open_images(images, max_bytes=max_file_bytes) as container:
        listing = list(container.members())
        files: dict[str, list[str]] = {}
        for member, image_id in listing:
            files.setdefault(image_id, []).append(member)
        refused = _refused(container)
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
        return _Found(files, refused, _inspect_files(container, to_decode, max_pixels=max_pixels))


def _refused(container) -> dict[str, tuple[str, str, str]]:
    """image id -> (name, reason, detail) of the first file refused under a name with that id."""
    refused: dict[str, tuple[str, str, str]] = {}
    for name, reason, detail in container.refused:
        image_id = image_id_of(name)
        if image_id is None:
            log.warning(
                "refused %r (%s: %s); not an image name, so it has no manifest row", name, reason, detail
            )
        else:
            refused.setdefault(image_id, (name, reason, detail))
    return refused


def _problems(image_id: str, listed: _Listed, found: _Found, info: dict) -> list[tuple[str, str]]:
    """Every problem of one image id, as (reason, detail), in the order of precedence (CSV_REASONS)."""
    members = found.files.get(image_id, [])
    problems: list[tuple[str, str]] = []
    if image_id in found.refused:
        problems.append(found.refused[image_id][1:])
    n_gt, n_meta = listed.gt_rows.get(image_id, 0), listed.meta_rows.get(image_id, 0)
    if n_gt > 1 or n_meta > 1:
        problems.append(("duplicate_row", f"{n_gt} ground-truth row(s), {n_meta} metadata row(s)"))
    if image_id not in listed.gt_rows:
        where = "a file" if members else "only a metadata row"
        problems.append(("no_label_row", f"{where}, no row in the ground truth"))
    if image_id in listed.excluded:
        problems.append(listed.excluded[image_id])
    if image_id in listed.gt_rows:
        problems += _label_problems(image_id, listed)
    if image_id in listed.conflicts:
        problems.append(listed.conflicts[image_id])
    if not members and image_id not in found.refused:
        problems.append(("missing_file", "no image file with this id"))
    if len(members) > 1:
        problems.append(("duplicate_file", f"{len(members)} files with this id: {', '.join(members)}"))
    if info.get("reason"):
        problems.append((info["reason"], info["detail"]))
    return problems


def _label_problems(image_id: str, listed: _Listed) -> list[tuple[str, str]]:
    """What is wrong with the label of an image the ground truth lists: a problem the source's reader found, a
    cell that is not one-hot, no positive class, or several."""
    if image_id in listed.label_problems:
        return [listed.label_problems[image_id]]
    classes, invalid = listed.positives[image_id], listed.invalid[image_id]
    if invalid:
        detail = (
            f"{', '.join(invalid)} in the ground truth: one-hot labels are exactly one 1.0 and the rest 0.0"
        )
        return [("invalid_label", detail)]
    if not classes:
        return [("no_label", "no positive class in the ground-truth row")]
    if len(classes) > 1:
        return [("multiple_labels", f"positive for {', '.join(classes)}")]
    return []


def _manifest_row(image_id: str, listed: _Listed, found: _Found, *, synthetic: bool) -> dict:
    """One image id's manifest row: `ok`, or `quarantined` with its first problem."""
    members = found.files.get(image_id, [])
    refused = found.refused.get(image_id)
    info = found.inspected.get(members[0], {}) if members and refused is None else {}
    problems = _problems(image_id, listed, found, info)
    classes = listed.positives.get(image_id, []) if not listed.invalid.get(image_id) else []
    fields = listed.meta_first.get(image_id, {})
    reason, detail = problems[0] if problems else (None, None)
    return {
        "image_id": image_id,
        "status": "quarantined" if problems else "ok",
        "reason": reason,
        "detail": detail,
        "member": refused[0] if refused is not None else (members[0] if members else None),
        **{k: info.get(k) for k in ("sha256", "bytes", "width", "height", "mode", "format")},
        "label": classes[0] if len(classes) == 1 else None,
        **{f: _first(fields.get(f)) for f in METADATA_FIELDS},
        "group_id": None,  # write_manifest: the connected components of shared patients, lesions, duplicates
        "duplicate_group": listed.duplicate_of.get(image_id),
        "synthetic": bool(synthetic),
    }


def in_part(image_id: str, part: int, parts: int) -> bool:
    """Whether an image id belongs to part `part` of `parts` (a stable hash of the id alone, so every file, row
    and problem of one id lands in one part, whatever the listing order)."""
    return parts == 1 or zlib.crc32(image_id.encode()) % parts == part
