"""Writing the training cache (cache.py has its format): shard by shard from a stage, from a pixel table, or
merged from the parts of a scattered job.

Only the resize and degrade stages (and the gather of a scattered resize) write a cache; what trains on or
summarises one needs only cache.py.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from . import integrity
from .cache import (
    BYTES_COLUMNS,
    BYTES_TYPES,
    COLUMNS,
    FORMAT_VERSION,
    INFO,
    INPUT_COLUMNS,
    SPLITS,
    CacheError,
    bytes_stats,
    file_sha256,
    load_info,
)
from .codec import REFERENCE, png_size
from .pixeltable import (
    PIXELS,
    arrow_to_pixels,
    pixels_to_arrow,
    read_parquet,
    read_table_metadata,
    table_shape,
)

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


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


def check_rows(table: pa.Table, where: str | Path, classes: list[str]) -> None:
    """The rows a cache will hold (image_id, split, label at least): unique ids, known splits and classes."""
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be a non-empty list of distinct names, got {classes}")
    if table.num_rows == 0:
        raise ValueError(f"{where}: no rows to cache")
    if pc.count_distinct(table.column("image_id")).as_py() != table.num_rows:
        counts = pc.value_counts(table.column("image_id"))
        dupes = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
        raise ValueError(f"{where}: duplicate image_id(s) {dupes[:5]}")
    unknown = set(pc.unique(table.column("split")).to_pylist()) - set(SPLITS)
    if unknown:
        raise ValueError(f"{where}: unknown split value(s) {sorted(map(str, unknown))}; expected {SPLITS}")
    _label_indices(table, classes)


def shard_plan(
    image_ids: Sequence[str], splits: Sequence[str], rows_per_shard: int
) -> list[tuple[str, np.ndarray]]:
    """(split, row numbers) of every shard: each split's rows in image_id order, rows_per_shard at a time."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    order = np.argsort(np.asarray(image_ids, dtype=object), kind="stable")
    split_of = np.asarray(splits, dtype=object)[order]
    plan = []
    for split in SPLITS:
        rows = order[split_of == split]
        plan += [(split, rows[i : i + rows_per_shard]) for i in range(0, len(rows), rows_per_shard)]
    return plan


def _clear_old_cache(out_dir: Path) -> None:
    """Remove a previous cache's _info.json first (so it never vouches for a mix), then its shards."""
    (out_dir / INFO).unlink(missing_ok=True)
    integrity.checksum_path(out_dir / INFO).unlink(missing_ok=True)
    for split in SPLITS:
        for old in (out_dir / split).glob("part-*.parquet"):
            old.unlink()


class CacheWriter:
    """Writes one cache folder shard by shard (what the stages hold in memory is one shard), then _info.json.

    Each shard and, last, _info.json go through a temporary name and an atomic rename, and a previous cache's
    _info.json is removed first: a crash never leaves an _info.json that vouches for partial shards. A shard is
    compressed, written and hashed on a thread of its own (zstd and sha256 release the GIL) while the caller
    makes the next one; so a shard's pixels must not change after write(), and at most two are in memory.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        classes: list[str],
        rows_per_shard: int,
        row_group_size: int,
        metadata: dict[str, str],
    ) -> None:
        if rows_per_shard < 1 or row_group_size < 1:
            raise ValueError(
                f"rows_per_shard and row_group_size must be >= 1, got {rows_per_shard}, {row_group_size}"
            )
        self.out_dir = Path(out_dir)
        self.classes = [str(c) for c in classes]
        self.rows_per_shard, self.row_group_size = rows_per_shard, row_group_size
        self.metadata = {k: str(v) for k, v in metadata.items() if v is not None}
        self.shards: list[dict[str, Any]] = []
        self.shape: tuple[int, int] | None = None
        self._counters: dict[str, int] = {}
        self._sent: dict[str, dict[str, list]] = {}  # the bytes columns per split, for _info.json
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
        self._writing: Future | None = None
        _clear_old_cache(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write(
        self, split: str, rows: pa.Table | pd.DataFrame, pixels: np.ndarray, number: int | None = None
    ) -> None:
        """One shard of `split`: the rows (image_id, label, split, degradation, degradation_params, and where
        an image was encoded, codec, codec_quality and encoded_bytes; in image_id order) and their
        (N, H, W, 3) uint8 pixels. Rows without encoded_bytes get a PNG's (on the writer's thread). `number`:
        the shard's number within its split (default: the next), for a job that writes every n-th shard."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pandas(rows, preserve_index=False)
        if len(pixels) != table.num_rows:
            raise ValueError(f"{table.num_rows} rows but {len(pixels)} images")
        shape = (int(pixels.shape[1]), int(pixels.shape[2]))
        if self.shape not in (None, shape):
            raise ValueError(f"images of {shape} px in a cache of {self.shape} px")
        self.shape = shape
        coded = {c: table.column(c) for c in BYTES_COLUMNS if c in table.column_names}
        table = pa.table({c: table.column(c) for c in INPUT_COLUMNS if c != PIXELS})
        table = table.add_column(2, "label_idx", _label_indices(table, self.classes))
        number = self._counters.get(split, 0) if number is None else number
        self._counters[split] = number + 1
        self._wait()
        self._writing = self._pool.submit(
            self._write, f"{split}/part-{number:05d}.parquet", split, table, coded, pixels
        )

    def _wait(self) -> None:
        """Let the shard being written finish (its error, if any, is raised here)."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            self.shards.append(writing.result())

    def _write(
        self, rel: str, split: str, table: pa.Table, coded: dict[str, pa.ChunkedArray], pixels: np.ndarray
    ) -> dict[str, Any]:
        table = table.append_column(PIXELS, pixels_to_arrow(pixels))
        for name, column in zip(BYTES_COLUMNS, _bytes_columns(coded, pixels), strict=True):
            table = table.add_column(table.column_names.index(PIXELS), name, column)
        for name in BYTES_COLUMNS:
            self._sent.setdefault(split, {}).setdefault(name, []).extend(table.column(name).to_pylist())
        shape = (int(pixels.shape[1]), int(pixels.shape[2]))
        path = self.out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {k.encode(): v.encode() for k, v in self.metadata.items()}
        meta.update(
            {
                b"classes": json.dumps(self.classes).encode(),
                b"split": split.encode(),
                b"height": str(shape[0]).encode(),
                b"width": str(shape[1]).encode(),
            }
        )
        small_columns = [c for c in COLUMNS if c != PIXELS]
        # Raw pixels are incompressible by dictionaries and huge for statistics: keep both to the small columns.
        # The shard's checksum is _info.json's (hashed as it is written), not a file beside it.
        with integrity.atomic_write(path, checksum=False) as out:
            pq.write_table(
                table.replace_schema_metadata(meta),
                out,
                row_group_size=self.row_group_size,
                compression="zstd",
                use_dictionary=small_columns,
                write_statistics=small_columns,
            )
        return {"path": rel, "split": split, "rows": table.num_rows, "sha256": out.hash.hexdigest()}

    def close(self, *, input: dict[str, Any]) -> dict[str, Any]:
        """Write _info.json (shape, classes, rows per split, every shard and its sha256); return it."""
        self._wait()
        self._pool.shutdown()
        rows_per_split = {
            split: n for split in SPLITS if (n := sum(s["rows"] for s in self.shards if s["split"] == split))
        }
        height, width = self.shape or (0, 0)
        info = {
            "format_version": FORMAT_VERSION,
            "resolution": int(self.metadata["resolution"]) if "resolution" in self.metadata else None,
            "variant": self.metadata.get("variant"),
            "order": self.metadata.get("order"),
            "classes": self.classes,
            "height": height,
            "width": width,
            "dtype": "uint8",
            "layout": "HWC RGB",
            "rows": rows_per_split,
            "rows_per_shard": self.rows_per_shard,
            "row_group_size": self.row_group_size,
            "bytes": {
                split: bytes_stats(
                    sent["encoded_bytes"], height * width, sent["codec"], sent["codec_quality"]
                )
                for split, sent in self._sent.items()
            },
            "input": input,
            "shards": self.shards,
        }
        integrity.write_json(self.out_dir / INFO, info)
        log.info(
            "cached %s rows of %dx%d px into %d shards under %s",
            rows_per_split,
            height,
            width,
            len(self.shards),
            self.out_dir,
        )
        return info


def _bytes_columns(coded: dict[str, pa.ChunkedArray], pixels: np.ndarray) -> list[pa.Array]:
    """codec, codec_quality and encoded_bytes of a shard: as given, and a PNG's for every row given none."""
    given = {
        name: coded[name].to_pylist() if name in coded else [None] * len(pixels) for name in BYTES_COLUMNS
    }
    codecs, quality, sizes = (given[name] for name in BYTES_COLUMNS)
    for i in (i for i, size in enumerate(sizes) if size is None):
        sizes[i], codecs[i], quality[i] = png_size(pixels[i]), REFERENCE, None
    return [pa.array(given[name], BYTES_TYPES[name]) for name in BYTES_COLUMNS]


def run_cache(
    *,
    degraded: str | Path,
    out_dir: str | Path,
    classes: list[str],
    rows_per_shard: int,
    row_group_size: int,
) -> dict[str, Any]:
    """A degraded pixel table (pixeltable.write_pixel_table) -> sharded parquet cache per split + _info.json.

    The workflow's stages write their caches directly (CacheWriter); this turns any pixel table into one.
    """
    classes = [str(c) for c in classes]
    table = read_parquet(degraded)
    missing = [c for c in INPUT_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{degraded}: missing column(s) {missing}; expected a degraded pixel table")
    check_rows(table, degraded, classes)
    height, width = table_shape(table)
    meta = read_table_metadata(degraded)
    writer = CacheWriter(
        out_dir,
        classes=classes,
        rows_per_shard=rows_per_shard,
        row_group_size=row_group_size,
        metadata={k: v for k, v in meta.items() if k not in ("height", "width")},
    )
    plan = shard_plan(table.column("image_id").to_pylist(), table.column("split").to_pylist(), rows_per_shard)
    for split, rows in tqdm(plan, desc="cache shards", unit="shard", mininterval=5):
        shard = table.take(pa.array(rows))
        writer.write(split, shard, arrow_to_pixels(shard.column(PIXELS), height, width))
    return writer.close(input={"path": Path(degraded).as_posix(), "sha256": file_sha256(degraded)})


def merge_caches(
    parts: Sequence[str | Path], out_dir: str | Path, *, input: dict[str, Any]
) -> dict[str, Any]:
    """One cache from the caches of a scattered job (each wrote every n-th shard under its own number): the
    shards moved into `out_dir` in the order one job writes them, rows and bytes summed over the parts, so
    `_info.json` reads as if one job had written it (the `input` aside). The parts are left empty."""
    infos = [load_info(p) for p in parts]
    first = infos[0]
    for part, info in zip(parts, infos, strict=True):
        same = {k: info[k] for k in ("height", "width", "classes", "variant", "rows_per_shard")}
        if same != {k: first[k] for k in same}:
            raise CacheError(f"{part}/_info.json does not match {parts[0]}/_info.json: {same}")
    out_dir = Path(out_dir)
    _clear_old_cache(out_dir)
    shards = sorted(
        (s | {"_from": Path(p)} for p, info in zip(parts, infos, strict=True) for s in info["shards"]),
        key=lambda s: (SPLITS.index(s["split"]), s["path"]),
    )
    paths = [s["path"] for s in shards]
    if len(set(paths)) < len(paths):
        twice = sorted({p for p in paths if paths.count(p) > 1})
        raise CacheError(f"shards {twice[:5]} are in more than one of the parts {[str(p) for p in parts]}")
    sent: dict[str, dict[str, list]] = {}
    for shard in shards:
        source, target = shard.pop("_from") / shard["path"], out_dir / shard["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        columns = pq.read_table(target, columns=list(BYTES_COLUMNS)).to_pydict()
        for name in BYTES_COLUMNS:
            sent.setdefault(shard["split"], {}).setdefault(name, []).extend(columns[name])
    pixels = first["height"] * first["width"]
    info = {
        **first,
        "rows": {
            split: n for split in SPLITS if (n := sum(s["rows"] for s in shards if s["split"] == split))
        },
        "bytes": {
            split: bytes_stats(v["encoded_bytes"], pixels, v["codec"], v["codec_quality"])
            for split, v in sorted(sent.items(), key=lambda kv: SPLITS.index(kv[0]))
        },
        "input": input,
        "shards": shards,
    }
    integrity.write_json(out_dir / INFO, info)
    for part in parts:
        (Path(part) / INFO).unlink(missing_ok=True)
        integrity.checksum_path(Path(part) / INFO).unlink(missing_ok=True)
    log.info("merged %d scattered parts into %s (%d shards)", len(parts), out_dir, len(shards))
    return info
