"""Parquet columns of fixed-size images: how the caches store pixels, and pixel tables that
cache_write.run_cache turns into a cache.

Pixels are stored raw (uint8 RGB, row-major H x W x 3) in a fixed_size_binary column, so what is stored is
exactly what the model gets, and reading a batch back is one memory copy, no decode.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # pandas only where a frame is asked for
    import pandas as pd

PIXELS = "pixels"


def pixels_to_arrow(pixels: np.ndarray) -> pa.FixedSizeBinaryArray:
    """(N, H, W, 3) uint8 -> one fixed_size_binary value per image."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    n = pixels.shape[0]
    width = int(np.prod(pixels.shape[1:])) if n else 0
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(pixels.reshape(-1))])


def arrow_to_pixels(column: pa.ChunkedArray | pa.Array, height: int, width: int) -> np.ndarray:
    """fixed_size_binary column -> (N, H, W, 3) uint8 (one copy)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    size = height * width * 3
    parts = []
    for chunk in chunks:
        if chunk.null_count:
            raise ValueError("pixel column has nulls")
        data = np.frombuffer(chunk.buffers()[1], dtype=np.uint8)
        parts.append(data[chunk.offset * size : (chunk.offset + len(chunk)) * size])
    flat = np.concatenate(parts) if parts else np.empty(0, np.uint8)
    return flat.reshape(-1, height, width, 3)


def write_pixel_table(
    path: str | Path,
    meta: pd.DataFrame,
    pixels: np.ndarray,
    *,
    row_group_size: int = 64,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `meta` (one row per image) with the images as a `pixels` column; height/width go to the schema."""
    if len(meta) != len(pixels):
        raise ValueError(f"{len(meta)} metadata rows but {len(pixels)} images")
    table = pa.Table.from_pandas(meta.reset_index(drop=True), preserve_index=False)
    table = table.append_column(PIXELS, pixels_to_arrow(pixels))
    height, width = (int(pixels.shape[1]), int(pixels.shape[2])) if len(pixels) else (0, 0)
    schema_meta = {
        **(table.schema.metadata or {}),
        b"height": str(height).encode(),
        b"width": str(width).encode(),
    }
    schema_meta.update({k.encode(): v.encode() for k, v in (metadata or {}).items()})
    table = table.replace_schema_metadata(schema_meta)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # zstd shrinks raw pixels well at little cost; small row groups keep random access cheap.
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """One parquet file as a table (with its key/value metadata).

    pq.ParquetFile, not pq.read_table: that one imports pyarrow.dataset to read a single file, half a second of
    every job's start-up.
    """
    with pq.ParquetFile(path) as file:
        return file.read(columns=columns)


def table_shape(table_or_schema: pa.Table | pa.Schema) -> tuple[int, int]:
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    meta = schema.metadata or {}
    return int(meta[b"height"]), int(meta[b"width"])


def read_pixel_table(path: str | Path, columns: list[str] | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """(metadata frame, (N, H, W, 3) uint8 pixels) of a table written by write_pixel_table."""
    table = read_parquet(path, columns=None if columns is None else [*columns, PIXELS])
    height, width = table_shape(table)
    pixels = arrow_to_pixels(table.column(PIXELS), height, width)
    meta = table.drop_columns([PIXELS]).to_pandas()
    return meta, pixels


def read_table_metadata(path: str | Path) -> dict[str, str]:
    """The key/value metadata written with the table (height, width and whatever the stage added)."""
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k != b"pandas"}
