"""The training cache: one resolution x variant as sharded, checksummed parquet files per split.

Layout of `out_dir`:

    {split}/part-00000.parquet ...   rows sorted by image_id; image_id, label, label_idx, split, degradation,
                                     degradation_params, pixels (raw uint8 H x W x 3, exactly the input's)
    _info.json                       shape, classes, rows per split, and every shard with its sha256

Shards are written first and _info.json last (each through a temporary name and an atomic rename), so a crash
never leaves an _info.json that points at partial shards. Readers verify the checksums before trusting a shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from .pixeltable import PIXELS, arrow_to_pixels, read_table_metadata, table_shape

log = logging.getLogger(__name__)

INFO = "_info.json"
SPLITS = ("train", "val", "test")
COLUMNS = ("image_id", "label", "label_idx", "split", "degradation", "degradation_params", PIXELS)
INPUT_COLUMNS = tuple(c for c in COLUMNS if c != "label_idx")
FORMAT_VERSION = 1


class CacheError(Exception):
    """A cache that cannot be read as it is: _info.json missing or garbled, a shard missing or wrong."""


class ChecksumError(CacheError):
    """A shard whose bytes differ from what _info.json recorded."""


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _label_indices(table: pa.Table, classes: list[str]) -> pa.Array:
    """label -> its index in `classes`; an error that names the images whose label is not a class."""
    idx = pc.index_in(table.column("label"), value_set=pa.array(classes, pa.string()))
    if idx.null_count:
        bad = pc.is_null(idx)
        ids = table.column("image_id").filter(bad).to_pylist()
        labels = table.column("label").filter(bad).to_pylist()
        shown = ", ".join(f"{i} (label {lab!r})" for i, lab in zip(ids[:5], labels[:5], strict=True))
        more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
        raise ValueError(f"{len(ids)} image(s) have a label not in classes {classes}: {shown}{more}")
    return pc.cast(idx, pa.int64()).combine_chunks()


def _check_input(table: pa.Table, path: str | Path, classes: list[str]) -> None:
    missing = [c for c in INPUT_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected a degraded pixel table")
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be a non-empty list of distinct names, got {classes}")
    if table.num_rows == 0:
        raise ValueError(f"{path}: no rows to cache")
    if pc.count_distinct(table.column("image_id")).as_py() != table.num_rows:
        counts = pc.value_counts(table.column("image_id"))
        dupes = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
        raise ValueError(f"{path}: duplicate image_id(s) {dupes[:5]}")
    unknown = set(pc.unique(table.column("split")).to_pylist()) - set(SPLITS)
    if unknown:
        raise ValueError(f"{path}: unknown split value(s) {sorted(map(str, unknown))}; expected {SPLITS}")


def _clear_old_cache(out_dir: Path) -> None:
    """Remove a previous cache's _info.json first (so it never vouches for a mix), then its shards."""
    (out_dir / INFO).unlink(missing_ok=True)
    for split in SPLITS:
        for old in (out_dir / split).glob("part-*.parquet"):
            old.unlink()


def run_cache(
    *,
    degraded: str | Path,
    out_dir: str | Path,
    classes: list[str],
    rows_per_shard: int,
    row_group_size: int,
) -> dict[str, Any]:
    """Degraded pixel table -> sharded parquet cache per split + _info.json; returns the info dict."""
    if rows_per_shard < 1 or row_group_size < 1:
        raise ValueError(
            f"rows_per_shard and row_group_size must be >= 1, got {rows_per_shard}, {row_group_size}"
        )
    classes = [str(c) for c in classes]
    out_dir = Path(out_dir)
    table = pq.read_table(degraded)
    _check_input(table, degraded, classes)
    height, width = table_shape(table)
    meta = read_table_metadata(degraded)
    table = table.select(list(INPUT_COLUMNS))
    table = table.add_column(2, "label_idx", _label_indices(table, classes))
    # Shards carry the input's description (shape, resolution, variant, order) but not pandas' stale index info.
    shard_meta = {k.encode(): v.encode() for k, v in meta.items()}
    shard_meta[b"classes"] = json.dumps(classes).encode()
    table = table.replace_schema_metadata(shard_meta)

    # Sorting indices, not the table, so peak memory is the input plus one shard.
    order = pc.sort_indices(table, sort_keys=[("image_id", "ascending")])
    split_of = pc.take(table.column("split"), order)
    plan = []
    for split in SPLITS:
        rows = pc.filter(order, pc.equal(split_of, split))
        for start in range(0, len(rows), rows_per_shard):
            plan.append((split, rows.slice(start, rows_per_shard)))

    _clear_old_cache(out_dir)
    small_columns = [c for c in COLUMNS if c != PIXELS]
    shards = []
    counters: dict[str, int] = {}
    for split, rows in tqdm(plan, desc="cache shards", unit="shard", mininterval=5):
        number = counters.get(split, 0)
        counters[split] = number + 1
        rel = f"{split}/part-{number:05d}.parquet"
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        shard = table.take(rows)
        shard = shard.replace_schema_metadata({**shard_meta, b"split": split.encode()})
        # Raw pixels are incompressible by dictionaries and huge for statistics: keep both to the small columns.
        pq.write_table(
            shard,
            tmp,
            row_group_size=row_group_size,
            compression="zstd",
            use_dictionary=small_columns,
            write_statistics=small_columns,
        )
        os.replace(tmp, path)
        shards.append({"path": rel, "split": split, "rows": shard.num_rows, "sha256": file_sha256(path)})

    rows_per_split = {
        split: n for split in SPLITS if (n := sum(s["rows"] for s in shards if s["split"] == split))
    }
    info = {
        "format_version": FORMAT_VERSION,
        "resolution": int(meta["resolution"]) if "resolution" in meta else None,
        "variant": meta.get("variant"),
        "order": meta.get("order"),
        "classes": classes,
        "height": height,
        "width": width,
        "dtype": "uint8",
        "layout": "HWC RGB",
        "rows": rows_per_split,
        "rows_per_shard": rows_per_shard,
        "row_group_size": row_group_size,
        "input": {"path": Path(degraded).as_posix(), "sha256": file_sha256(degraded)},
        "shards": shards,
    }
    tmp = out_dir / f".{INFO}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out_dir / INFO)
    log.info(
        "cached %s rows of %dx%d px into %d shards under %s",
        rows_per_split,
        height,
        width,
        len(shards),
        out_dir,
    )
    return info


def load_info(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / INFO
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(
            f"{path} is missing: the cache was never completed (rerun the cache stage)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path} is not valid JSON ({err}): rerun the cache stage") from None
    required = ("classes", "height", "width", "rows", "shards")
    if not isinstance(info, dict) or any(k not in info for k in required):
        raise CacheError(f"{path} lacks required keys {list(required)}: rerun the cache stage")
    return info


def _shards_of(info: dict[str, Any], split: str | None) -> list[dict[str, Any]]:
    return [s for s in info["shards"] if split is None or s["split"] == split]


def _verify_shards(cache_dir: Path, shards: list[dict[str, Any]]) -> None:
    for shard in shards:
        path = cache_dir / shard["path"]
        if not path.is_file():
            raise CacheError(f"shard {path} listed in {INFO} is missing")
        actual = file_sha256(path)
        if actual != shard["sha256"]:
            raise ChecksumError(
                f"shard {path} is corrupt or was changed: sha256 {actual}, but {INFO} recorded {shard['sha256']}"
            )


def verify_cache(cache_dir: str | Path, split: str | None = None) -> None:
    """Raise CacheError / ChecksumError unless every shard (of `split`, or all) matches _info.json."""
    _verify_shards(Path(cache_dir), _shards_of(load_info(cache_dir), split))


@dataclass
class CacheSplit:
    pixels: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64 index into classes
    image_ids: list[str]
    degradations: list[str]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def read_split(cache_dir: str | Path, split: str, *, verify: bool = True) -> CacheSplit:
    """All rows of one split, in image_id order, pixels as one (N, H, W, 3) uint8 array."""
    cache_dir = Path(cache_dir)
    info = load_info(cache_dir)
    if split not in info["rows"]:
        raise CacheError(f"{cache_dir} has no split {split!r}; it has {sorted(info['rows'])}")
    shards = _shards_of(info, split)
    if verify:
        _verify_shards(cache_dir, shards)
    else:
        missing = [s["path"] for s in shards if not (cache_dir / s["path"]).is_file()]
        if missing:
            raise CacheError(f"shard(s) {missing} listed in {cache_dir / INFO} are missing")
    columns = ["image_id", "label_idx", "degradation", PIXELS]
    table = pa.concat_tables(pq.read_table(cache_dir / s["path"], columns=columns) for s in shards)
    if table.num_rows != info["rows"][split]:
        raise CacheError(f"{cache_dir}/{split}: {table.num_rows} rows, but {INFO} says {info['rows'][split]}")
    return CacheSplit(
        pixels=arrow_to_pixels(table.column(PIXELS), int(info["height"]), int(info["width"])),
        labels=table.column("label_idx").to_numpy().astype(np.int64, copy=False),
        image_ids=table.column("image_id").to_pylist(),
        degradations=table.column("degradation").to_pylist(),
        classes=list(info["classes"]),
    )
