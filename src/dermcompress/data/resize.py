"""Resize stage: every image of the split, decoded once, to one square resolution: the `clean` variant's cache.

The resized pixels are the clean variant (it has no degradation), so they are written straight into its cache
(cache_write.CacheWriter), shard by shard: one stored copy, and one shard in memory at a time. Decoding the
JPEG is the bottleneck, so a JPEG is decoded at reduced scale (libjpeg's 1/2, 1/4, 1/8 DCT scaling) when the
target is far smaller than the source, and images are spread over a thread pool (imagepool.map_images: Pillow
and OpenCV release the GIL while they decode, resample and filter).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps
from tqdm import tqdm

from dermcompress.data import integrity
from dermcompress.data.cache import BYTES_TYPES, CacheError, load_info
from dermcompress.data.cache_write import CacheWriter, check_rows, shard_plan
from dermcompress.data.codec import REFERENCE, png_size
from dermcompress.data.imagepool import (
    SourceChangedError,
    available_threads,
    changed_error,
    map_images,
    read_member,
    source_changed,
)
from dermcompress.data.images import ImageError, decode_image
from dermcompress.data.sources import DEFAULT_MAX_FILE_BYTES, image_paths

log = logging.getLogger(__name__)

POLICIES = ("squash", "center_crop", "pad")
# Lanczos is PIL's sharpest antialiased filter (its support widens with the reduction factor, so nothing aliases).
# Its cost grows with the pixels it reads: ~13 ms for 1024 -> 224, ~1-2 ms once the reduced decode has brought
# the image within 2x of the target. OpenCV INTER_AREA and PIL BILINEAR are no faster after a reduced decode and
# depart further from the full-decode Lanczos reference.
RESAMPLE = Image.Resampling.LANCZOS
# Reduced decode keeps both sides at least this many times the target: libjpeg's scaled IDCT (itself a low-pass
# filter over each 8x8 block) is then followed by a Lanczos reduction of 1-2x. Measured on photo-like JPEGs of
# the three ISIC sizes against a full decode + Lanczos: 0.6 / 0.9 / 0.9 grey levels (mean absolute) at
# 224 / 112 / 56 px, at 12 ms of CPU per image for the three; a margin of 2 gives 0.1 / 0.3 / 0.4 grey levels at
# 16 ms, because the 600x450 images can then not be decoded at 1/2 scale for 224 px.
DRAFT_MARGIN = 1.0
# Measured on 2 cores: below ~1000 images a job's work is shorter than its start-up (see job_threads).
IMAGES_PER_THREAD = 1000
CLEAN = "clean"
NONE = "none"  # the degradation of every clean row
# The stages read parquet files (pixeltable.read_parquet); tests and notebooks may pass pandas frames.
PathOrFrame = Any


def resize_image(img: Image.Image, size: int, policy: str) -> np.ndarray:
    """An RGB PIL image -> (size, size, 3) uint8, antialiased.

    squash: stretch the whole image to a square (the study's choice; every pixel kept, aspect lost).
    center_crop: the central square (aspect kept, the sides of a landscape image lost).
    pad: the whole image fitted inside the square, short side padded with black (aspect and content kept).
    """
    target = (size, size)
    img = img if img.mode == "RGB" else img.convert("RGB")
    if policy == "squash":
        out = img.resize(target, RESAMPLE)
    elif policy == "center_crop":
        # Crop first: resize(box=...) (what ImageOps.fit does) lets Lanczos read pixels outside the crop.
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        out = img.crop((left, top, left + side, top + side)).resize(target, RESAMPLE)
    elif policy == "pad":
        # Fitting first and padding after gives the same geometry as padding first, with far fewer pixels
        # to resample, and keeps the black border crisp.
        out = ImageOps.pad(img, target, RESAMPLE, color=(0, 0, 0))
    else:
        raise ValueError(f"unknown resize policy {policy!r}; expected one of {', '.join(POLICIES)}")
    return np.asarray(out, dtype=np.uint8)


def draft_size_for(resolutions: Iterable[int], reduced_decode: bool) -> int | None:
    """The smallest side the JPEG decoder may produce, or None for a full decode."""
    return math.ceil(max(resolutions) * DRAFT_MARGIN) if reduced_decode else None


def load_resized(
    data: bytes, resolutions: Sequence[int], *, policy: str, reduced_decode: bool, max_pixels: int
) -> dict[int, np.ndarray]:
    """Decode the image bytes once and resize the result to every resolution."""
    img = decode_image(data, max_pixels=max_pixels, draft_size=draft_size_for(resolutions, reduced_decode))
    return {int(res): resize_image(img, int(res), policy) for res in resolutions}


def numbered(plan: list[tuple[str, np.ndarray]]) -> Iterator[tuple[str, int, np.ndarray]]:
    """(split, the shard's number within its split, its rows) for every shard of cache_write.shard_plan."""
    counts: dict[str, int] = {}
    for split, rows in plan:
        counts[split] = counts.get(split, -1) + 1
        yield split, counts[split], rows


def job_threads(images: int) -> int:
    """Threads a resize or degrade job asks for: one per IMAGES_PER_THREAD images (at least one).

    A small job is mostly its interpreter's start-up (~1 s), which no thread shortens: on a few cores two such
    jobs side by side finish sooner than one after the other with two threads each. Snakemake caps the answer
    at --cores; a profile's set-threads replaces it.
    """
    return max(1, math.ceil(images / IMAGES_PER_THREAD))


def images_in(path: str | Path) -> int | None:
    """Images in a split table or a cache folder (its _info.json), None while it does not exist yet."""
    path = Path(path)
    try:
        if path.is_dir():
            return sum(load_info(path)["rows"].values())
        with pq.ParquetFile(path) as table:
            return table.metadata.num_rows
    except (OSError, CacheError):
        return None


def _resize_task(
    task: tuple[str, str, str], *, images: tuple[str, ...], max_file_bytes: int, **settings: Any
) -> tuple[np.ndarray, int]:
    image_id, member, sha256 = task
    data = read_member(images, image_id, member, sha256, max_file_bytes)
    try:
        (pixels,) = load_resized(data, **settings).values()
    except ImageError as err:
        raise source_changed(image_id, member, err) from None
    # What the clean image costs to send: a lossless PNG, sized here in the pool rather than on the writer's
    # one thread (1.4 ms an image at 224 px).
    return pixels, png_size(pixels)


def read_table(source: PathOrFrame, columns: list[str]) -> pa.Table:
    """`columns` of a parquet file, or of a pandas frame (tests, notebooks), as a pyarrow table; text as plain
    `string` (pandas writes `large_string`, which a join cannot match with `string`)."""
    if isinstance(source, str | Path):
        table = integrity.read_parquet(source, columns=columns)
    else:
        table = pa.Table.from_pandas(source[columns], preserve_index=False)
    schema = pa.schema(
        [f.with_type(pa.string()) if pa.types.is_large_string(f.type) else f for f in table.schema]
    )
    return table.cast(schema)


def split_members(splits: PathOrFrame, manifest: PathOrFrame) -> pa.Table:
    """The split's rows (image_id, split, label, member, sha256), sorted by image_id; every one must be ok at
    ingest."""
    rows = read_table(splits, ["image_id", "split", "label"]).sort_by("image_id")
    man = read_table(manifest, ["image_id", "status", "member", "sha256"])
    for name, table in (("split", rows), ("manifest", man)):
        if pc.count_distinct(table["image_id"]).as_py() != table.num_rows:
            raise ValueError(f"the {name} lists some image_id more than once")
    # A lookup, not Table.join: that one loads pyarrow's query engine (acero, dataset) for a dict's work.
    known = dict(zip(man["image_id"].to_pylist(), man.drop_columns(["image_id"]).to_pylist(), strict=True))
    found = [known.get(image_id) for image_id in rows["image_id"].to_pylist()]
    missing = [i for i, row in zip(rows["image_id"].to_pylist(), found, strict=True) if row is None]
    if missing:
        raise ValueError(f"{len(missing)} image(s) of the split are not in the manifest, e.g. {missing[:5]}")
    bad = [i for i, row in zip(rows["image_id"].to_pylist(), found, strict=True) if row["status"] != "ok"]
    if bad:
        raise ValueError(f"{len(bad)} image(s) of the split are not 'ok' in the manifest, e.g. {bad[:5]}")
    for column in ("member", "sha256"):
        rows = rows.append_column(column, pa.array([row[column] for row in found], pa.string()))
    return rows


def clean_rows(rows: pa.Table) -> pa.Table:
    """The cache columns of undegraded rows."""
    n = rows.num_rows
    return pa.table(
        {
            "image_id": rows["image_id"],
            "label": rows["label"],
            "split": rows["split"],
            "degradation": pa.array([NONE] * n, pa.string()),
            "degradation_params": pa.array(["{}"] * n, pa.string()),
        }
    )


def run_resize(
    *,
    splits: PathOrFrame,
    manifest: PathOrFrame,
    images: str | Path,
    out_dir: str | Path,
    resolution: int,
    policy: str,
    reduced_decode: bool,
    max_pixels: int,
    classes: list[str],
    rows_per_shard: int,
    row_group_size: int,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    threads: int | None = None,
    part: int = 0,
    parts: int = 1,
) -> dict[str, Any]:
    """Every image of splits.parquet at (res x res) -> the clean variant's cache in `out_dir`; its _info.
    With `parts` > 1, only every `parts`-th shard from the `part`-th (a scattered job; cache_write.merge_caches
    gathers them).

    Each raw file is checked against the sha256 ingest recorded; any that changed fail the job, all named.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown resize policy {policy!r}; expected one of {', '.join(POLICIES)}")
    rows = split_members(splits, manifest)
    check_rows(rows, splits, [str(c) for c in classes])
    threads = threads or available_threads()
    log.info(
        "resizing %d images from %s to %dpx (policy=%s, reduced_decode=%s, %d threads)",
        rows.num_rows, images, resolution, policy, reduced_decode, threads,
    )  # fmt: skip
    fn = functools.partial(
        _resize_task,
        images=image_paths(images),
        resolutions=[resolution],
        policy=policy,
        reduced_decode=reduced_decode,
        max_pixels=max_pixels,
        max_file_bytes=max_file_bytes,
    )
    writer = CacheWriter(
        out_dir,
        classes=classes,
        rows_per_shard=rows_per_shard,
        row_group_size=row_group_size,
        metadata={
            "resolution": resolution,
            "variant": CLEAN,
            "policy": policy,
            "reduced_decode": bool(reduced_decode),
        },
    )
    plan = [
        (split, number, shard)
        for g, (split, number, shard) in enumerate(
            numbered(shard_plan(rows["image_id"].to_pylist(), rows["split"].to_pylist(), rows_per_shard))
        )
        if g % parts == part
    ]
    _write_shards(writer, plan, rows, fn, resolution=resolution, threads=threads)
    info = writer.close(input={"images": ";".join(image_paths(images))})
    log.info("wrote the clean cache %s (%d images, %s per split)", out_dir, rows.num_rows, info["rows"])
    return info


def _write_shards(
    writer: CacheWriter,
    plan: list[tuple[str, int, np.ndarray]],
    rows: pa.Table,
    fn: Callable[[tuple[str, str, str]], tuple[np.ndarray, int]],
    *,
    resolution: int,
    threads: int,
) -> None:
    """Resize the images of every (split, number, rows) shard of `plan` with `fn` and write the shard; any raw
    file that changed since ingest fails it, once every image has been looked at, to name them all."""
    tasks = list(
        zip(rows["image_id"].to_pylist(), rows["member"].to_pylist(), rows["sha256"].to_pylist(), strict=True)
    )
    changed: list[SourceChangedError] = []
    with tqdm(
        total=sum(len(s) for *_, s in plan), desc=f"resize {resolution}px", unit="img", mininterval=5
    ) as bar:
        for split, number, shard in plan:
            sizes: list[int | None] = []
            try:
                pixels = map_images(
                    fn,
                    [tasks[i] for i in shard],
                    shape=(resolution, resolution, 3),
                    threads=threads,
                    bar=bar,
                    sizes=sizes,
                )
            except SourceChangedError as err:
                changed.append(err)
                continue
            if not changed:
                writer.write(split, _clean_shard(rows.take(shard), sizes), pixels, number=number)
    if changed:
        raise changed_error(changed)


def _clean_shard(rows: pa.Table, sizes: list[int | None]) -> pa.Table:
    """A shard's cache columns: the clean rows, sent as the lossless PNGs of `sizes` bytes."""
    n = rows.num_rows
    sent = {"codec": [REFERENCE] * n, "codec_quality": [None] * n, "encoded_bytes": sizes}
    table = clean_rows(rows)
    for name, values in sent.items():
        table = table.append_column(name, pa.array(values, BYTES_TYPES[name]))
    return table
