"""Degrade stage: the study's transmission artefacts (JPEG, Gaussian blur, colour quantization) on a share of images.

It reads the clean variant's cache (what the resize stage wrote) shard by shard and writes the variant's cache
with the same shards, rows and order: one stored copy of the pixels per variant, one shard in memory at a time.

Which image gets which operation, with which drawn parameters, follows from (seed, image_id) alone: a per-image
generator seeded from a SHA-256 of both. Adding, removing or reordering other images changes nothing for an image,
and the plan is the same on every machine and Python run (unlike hash()).

A variant with a transmission codec (codec.py) then encodes every image of its splits, degraded or not, and
keeps the decoded pixels and the encoded bytes. What each row costs on the wire (`encoded_bytes`), always at
the cached size: its codec's bytes, else its jpeg degradation's (after_resize: the small image was sent as that
JPEG), else a PNG of its pixels (before_resize's jpeg too: _degrade_task), sized in the degradation's thread
pool, or the clean cache's own where the image is untouched.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from dermcompress.data import codec
from dermcompress.data.cache import BYTES_TYPES, iter_shards, load_info, verify_cache
from dermcompress.data.cache_write import CacheWriter
from dermcompress.data.imagepool import (
    SourceChangedError,
    available_threads,
    changed_error,
    map_images,
    read_member,
    source_changed,
)
from dermcompress.data.images import ImageError, decode_image
from dermcompress.data.pixeltable import PIXELS, arrow_to_pixels, read_parquet, read_table_metadata
from dermcompress.data.resize import NONE, PathOrFrame, read_table, resize_image
from dermcompress.data.sources import DEFAULT_MAX_FILE_BYTES, image_paths

log = logging.getLogger(__name__)

# In the order plan_degradation lays their fractions out on [0, 1).
DEGRADATIONS = ("jpeg", "blur", "quantize")
ORDERS = ("after_resize", "before_resize")
QUANTIZE_METHODS = {
    "maxcoverage": Image.Quantize.MAXCOVERAGE,
    "mediancut": Image.Quantize.MEDIANCUT,
    "fastoctree": Image.Quantize.FASTOCTREE,
}


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """A generator that depends on (seed, image_id) only; all 256 bits of the digest seed it."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


def plan_degradation(image_id: str, variant: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(operation, parameters) for one image: u ~ U(0,1) falls into the cumulative fractions jpeg, blur, quantize
    (in that order) or past them (none); the operation's parameters are drawn next from the same generator."""
    fractions = variant["fractions"]
    if not any(fractions.values()):
        return NONE, {}
    rng = image_rng(variant["seed"], image_id)
    u = rng.random()
    edge = 0.0
    for op in DEGRADATIONS:
        edge += fractions.get(op, 0.0)
        if u < edge:
            return op, _draw_params(op, rng, variant)
    return NONE, {}


def _draw_params(op: str, rng: np.random.Generator, variant: dict[str, Any]) -> dict[str, Any]:
    if op == "jpeg":
        return {"quality": int(variant["jpeg_quality"])}
    if op == "blur":
        low, high = variant["blur_sigma"]
        return {
            "kernel": int(rng.choice(variant["blur_kernel_sizes"])),
            "sigma": float(rng.uniform(low, high)),
        }
    low, high = variant["quantize_colors"]
    return {"colors": int(rng.integers(low, high, endpoint=True)), "method": variant["quantize_method"]}


def apply_degradation(pixels: np.ndarray, op: str, params: dict[str, Any]) -> np.ndarray:
    """(H, W, 3) uint8 -> the same shape, degraded by `op` with `params` (as planned by plan_degradation)."""
    return degrade_image(pixels, op, params)[0]


def degrade_image(pixels: np.ndarray, op: str, params: dict[str, Any]) -> tuple[np.ndarray, int | None]:
    """apply_degradation, and the bytes the jpeg degradation sent (None for the others)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    if op == NONE:
        return pixels, None
    if op == "jpeg":
        # An in-memory round trip through PIL's encoder: the artefacts a JPEG transmission really leaves.
        return codec.transmit(pixels, {"format": "jpeg", "quality": int(params["quality"])})
    if op == "blur":
        k = int(params["kernel"])
        return cv2.GaussianBlur(pixels, (k, k), float(params["sigma"])), None
    if op == "quantize":
        method = QUANTIZE_METHODS[params["method"]]
        palette = Image.fromarray(pixels).quantize(colors=int(params["colors"]), method=method)
        return np.asarray(palette.convert("RGB"), dtype=np.uint8), None
    raise ValueError(f"unknown degradation {op!r}; expected none or one of {', '.join(DEGRADATIONS)}")


def plan_images(
    image_ids: Sequence[str], splits: Sequence[str], variant: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """(degradation, degradation_params as JSON with sorted keys) per image; images outside the variant's
    splits: none."""
    degraded_splits = set(variant.get("splits", ()))
    plans = [
        plan_degradation(image_id, variant) if split in degraded_splits else (NONE, {})
        for image_id, split in zip(image_ids, splits, strict=True)
    ]
    return [op for op, _ in plans], [json.dumps(params, sort_keys=True) for _, params in plans]


def plan_rows(rows: Any, variant: dict[str, Any]) -> Any:
    """A pandas frame with image_id and split, with its `degradation` and `degradation_params` added."""
    ops, params = plan_images(rows["image_id"].tolist(), rows["split"].tolist(), variant)
    return rows.assign(degradation=ops, degradation_params=params)


def _apply_task(task: tuple[np.ndarray, str, str]) -> tuple[np.ndarray, int | None]:
    pixels, op, params = task
    return degrade_image(pixels, op, json.loads(params))


def _sized(
    fn: Callable[[Any], tuple[np.ndarray, int | None]], task: Any, *, png: bool
) -> tuple[np.ndarray, tuple[str, int] | None]:
    """`fn`'s degraded pixels and what they cost to send: ("jpeg", bytes) where a jpeg degradation sent them,
    else with `png` (REFERENCE, the bytes of their lossless PNG), else None. The PNG is sized here in the thread
    pool (a few ms an image at 224 px, with the GIL released), not on the cache writer's one thread."""
    pixels, sent = fn(task)
    if sent is not None:
        return pixels, ("jpeg", sent)
    return pixels, ((codec.REFERENCE, codec.png_size(pixels)) if png else None)


def _sent_bytes(
    ops: list[str], params: list[str], sizes: dict[int, tuple[str, int] | None], clean: pa.Table
) -> dict[str, list]:
    """The bytes columns (cache.BYTES_COLUMNS) of a shard's rows before any transmission codec: what each
    degraded image sent (`sizes`: row -> (codec, bytes), _sized); the clean cache's own (its PNG) where the
    image is left as it was, the same pixels; None elsewhere (the cache writer then sizes a PNG)."""
    given = {name: clean[name].to_pylist() if name in clean.column_names else None for name in BYTES_TYPES}
    out: dict[str, list] = {name: [None] * len(ops) for name in BYTES_TYPES}
    for i, op in enumerate(ops):
        if (sent := sizes.get(i)) is not None:
            name, size = sent
            quality = json.loads(params[i])["quality"] if name == "jpeg" else None
            out["codec"][i], out["codec_quality"][i], out["encoded_bytes"][i] = name, quality, size
        elif op == NONE and given["encoded_bytes"] is not None:
            for name in BYTES_TYPES:
                out[name][i] = given[name][i]
    return out


def _codec_task(pixels: np.ndarray, *, settings: dict[str, Any]) -> tuple[np.ndarray, int]:
    return codec.transmit(pixels, settings)


def _degrade_task(
    task: tuple[str, str, str, str, str],
    *,
    images: tuple[str, ...],
    size: int,
    policy: str,
    max_pixels: int,
    max_file_bytes: int,
) -> tuple[np.ndarray, int | None]:
    """before_resize: the raw image degraded at its full resolution (a reduced decode would change what a blur
    kernel means), then resized as the resize stage does; no bytes (None).

    A jpeg degradation here is the source's: the image was stored compressed at full size, then shrunk. What is
    transmitted is the shrunk image, at the cache's size, and no JPEG of that exists; so it is charged, like a
    blurred or untouched one, a lossless PNG of the cached pixels (the cache writer's), or the variant's codec.
    The full-size JPEG's bytes would be bits per pixel of another image (hundreds of "bpp" over the cache's
    pixels) and could not be compared with any other row of the variant."""
    image_id, member, sha256, op, params = task
    data = read_member(images, image_id, member, sha256, max_file_bytes)
    try:
        img = decode_image(data, max_pixels=max_pixels)
    except ImageError as err:
        raise source_changed(image_id, member, err) from None
    degraded = apply_degradation(np.asarray(img), op, json.loads(params))
    return resize_image(Image.fromarray(degraded), size, policy), None


def _plan_counts(clean: Path, variant: dict[str, Any]) -> str:
    """Images per operation and split, as a small table (from the image ids alone, before any pixel is read)."""
    tables = [
        read_parquet(clean / s["path"], columns=["image_id", "split"]) for s in load_info(clean)["shards"]
    ]
    ids = [i for t in tables for i in t["image_id"].to_pylist()]
    splits = [x for t in tables for x in t["split"].to_pylist()]
    counts = Counter(zip(plan_images(ids, splits, variant)[0], splits, strict=True))
    columns = [s for s in ("train", "val", "test") if s in splits]
    lines = [f"{'':<12}" + "".join(f"{c:>7}" for c in [*columns, "all"])]
    for op in [NONE, *DEGRADATIONS]:
        row = [counts[(op, c)] for c in columns]
        if sum(row):
            lines.append(f"{op:<12}" + "".join(f"{n:>7}" for n in [*row, sum(row)]))
    return "\n".join(lines)


def run_degrade(
    *,
    clean: str | Path,
    out_dir: str | Path,
    variant: dict[str, Any],
    order: str,
    manifest: PathOrFrame | None = None,
    images: str | Path | list[str] | None = None,
    max_pixels: int | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    threads: int | None = None,
) -> dict[str, Any]:
    """One resolution x one variant: the clean cache `clean` -> the variant's cache in `out_dir`; its _info.

    Each row records its degradation and parameters. after_resize degrades the clean (resized) pixels;
    before_resize degrades the raw images (`images`, checked against the `manifest`'s sha256) at source
    resolution and then resizes them with the clean cache's policy. Rows left undegraded are the clean pixels.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown degrade order {order!r}; expected one of {', '.join(ORDERS)}")
    if order == "before_resize" and (manifest is None or images is None or max_pixels is None):
        raise ValueError("order=before_resize needs `manifest`, `images` and `max_pixels`")
    clean = Path(clean)
    verify_cache(clean)  # every shard against its checksum, before anything is read from it
    info = load_info(clean)
    clean_meta = read_table_metadata(clean / info["shards"][0]["path"])
    resolution, policy = int(info["height"]), clean_meta.get("policy", "squash")
    log.info(
        "variant %s at %dpx, %s; images per operation and split:\n%s",
        variant["name"],
        resolution,
        order,
        _plan_counts(clean, variant),
    )
    threads = threads or available_threads()
    if threads > 1:  # one of our threads per core already; OpenCV's own pool (blur) would oversubscribe them
        cv2.setNumThreads(1)
    if order == "after_resize":
        degrade = _Degrader(threads=threads)
    else:
        degrade = _raw_degrade(
            manifest,
            threads=threads,
            images=image_paths(images),
            size=resolution,
            policy=policy,
            max_pixels=max_pixels,
            max_file_bytes=max_file_bytes,
        )
    writer = CacheWriter(
        out_dir,
        classes=info["classes"],
        rows_per_shard=info["rows_per_shard"],
        row_group_size=info["row_group_size"],
        metadata={
            "resolution": resolution,
            "variant": variant["name"],
            "order": order,
            "policy": policy,
            "reduced_decode": clean_meta.get("reduced_decode"),
            "variant_settings": json.dumps(variant, sort_keys=True),
        },
    )
    _write_shards(writer, clean, variant, degrade, resolution=resolution, total=sum(info["rows"].values()))
    out = writer.close(input={"clean": clean.as_posix()})
    log.info("wrote %s (%s images per split)", out_dir, out["rows"])
    return out


@dataclass
class _Degrader:
    """How a shard's images are degraded: after_resize, its clean pixels (`raw` None, `fn` _apply_task);
    before_resize, the raw files of `raw` (image_id -> member, sha256) by `fn` (_degrade_task)."""

    threads: int
    raw: dict[str, tuple[str, str]] | None = None
    fn: Callable[[Any], tuple[np.ndarray, int | None]] = _apply_task

    def __call__(
        self, pixels: np.ndarray, ids: list[str], ops: list[str], params: list[str], bar: tqdm, *, png: bool
    ) -> dict[int, tuple[str, int] | None]:
        """Degrade the rows of `pixels` that `ops` names, in place; row -> what it cost to send (_sized: with
        `png`, a lossless PNG's bytes where no jpeg degradation sent it). A raw file that changed since ingest
        is a SourceChangedError (after every image was looked at)."""
        todo = [i for i, op in enumerate(ops) if op != NONE]
        bar.update(len(ids) - len(todo))
        sizes: list[tuple[str, int] | None] = []
        if todo:
            # jpeg and blur take < 1 ms at <= 224 px, MAXCOVERAGE quantize ~50-100 ms (most of this stage's
            # time), and Pillow releases the GIL while it quantizes: a thread pool pays.
            if self.raw is None:
                tasks = [(pixels[i], ops[i], params[i]) for i in todo]
            else:
                tasks = [(ids[i], *self.raw[ids[i]], ops[i], params[i]) for i in todo]
            fn = functools.partial(_sized, self.fn, png=png)
            pixels[todo] = map_images(
                fn, tasks, shape=pixels.shape[1:], threads=self.threads, bar=bar, sizes=sizes
            )
        return dict(zip(todo, sizes, strict=True))


def _raw_degrade(manifest: PathOrFrame, *, threads: int, **settings: Any) -> _Degrader:
    """before_resize: each raw file (from the manifest, checked against its sha256) degraded by _degrade_task."""
    man = read_table(manifest, ["image_id", "member", "sha256"])
    files = zip(man["member"].to_pylist(), man["sha256"].to_pylist(), strict=True)
    raw = dict(zip(man["image_id"].to_pylist(), files, strict=True))
    return _Degrader(threads=threads, raw=raw, fn=functools.partial(_degrade_task, **settings))


def _write_shards(
    writer: CacheWriter,
    clean: Path,
    variant: dict[str, Any],
    degrade: _Degrader,
    *,
    resolution: int,
    total: int,
) -> None:
    """Every shard of the clean cache, degraded as planned (and encoded, where the variant has a codec), written
    as the variant's; raw files that changed since ingest fail it, all named."""
    settings = variant.get("codec")
    coded_splits = set(variant.get("splits", ())) if settings else set()
    changed: list[SourceChangedError] = []
    with tqdm(total=total, desc=f"degrade {variant['name']}", unit="img", mininterval=5) as bar:
        for shard, table in iter_shards(clean, verify=False):
            ids = table["image_id"].to_pylist()
            ops, params = plan_images(ids, table["split"].to_pylist(), variant)
            pixels = arrow_to_pixels(table.column(PIXELS), resolution, resolution).copy()
            transmitted = bool(settings) and shard["split"] in coded_splits
            try:
                # PNGs sized in the pool, unless a codec sends the split instead.
                sizes = degrade(pixels, ids, ops, params, bar, png=not transmitted)
            except SourceChangedError as err:  # look at every image before failing, to name them all
                changed.append(err)
                continue
            if changed:
                continue
            sent = _sent_bytes(ops, params, sizes, table)
            if transmitted:
                sent = _transmit(pixels, settings, threads=degrade.threads)
            writer.write(shard["split"], _variant_rows(table, ops, params, sent), pixels)
    if changed:
        raise changed_error(changed)


def _transmit(pixels: np.ndarray, settings: dict[str, Any], *, threads: int) -> dict[str, list]:
    """Encode and decode every image of a shard with the variant's codec, in place; the bytes columns it sent.

    Encoded in the thread pool too: AVIF takes ~10 ms an image at 224 px, and Pillow releases the GIL while it
    encodes. The image sent is the degraded one, and its bytes are the codec's.
    """
    sizes: list[int | None] = []
    task = functools.partial(_codec_task, settings=settings)
    pixels[:] = map_images(
        task, list(pixels), shape=pixels.shape[1:], threads=threads, sizes=sizes, desc="encode"
    )
    return {
        "codec": [settings["format"]] * len(pixels),
        "codec_quality": [settings["quality"]] * len(pixels),
        "encoded_bytes": sizes,
    }


def _variant_rows(table: pa.Table, ops: list[str], params: list[str], sent: dict[str, list]) -> pa.Table:
    """The variant's cache columns of a clean shard's rows: its degradations and what each image sent."""
    rows = table.select(["image_id", "label", "split"])
    rows = rows.append_column("degradation", pa.array(ops, pa.string()))
    rows = rows.append_column("degradation_params", pa.array(params, pa.string()))
    for name, values in sent.items():
        rows = rows.append_column(name, pa.array(values, BYTES_TYPES[name]))
    return rows
