"""The training cache: one resolution x variant as sharded, checksummed parquet files per split; its format and
reading it.

The resize stage writes the `clean` variant's cache straight from the resized pixels, and the degrade stage each
other variant's, shard by shard from the clean cache's (cache_write.CacheWriter): one stored copy of the pixels
per variant.

Layout of `out_dir`:

    {split}/part-00000.parquet ...   rows sorted by image_id; image_id, label, label_idx, split, degradation,
                                     degradation_params, codec, codec_quality, encoded_bytes, pixels (raw
                                     uint8 H x W x 3, exactly the input's)
    _info.json                       shape, classes, rows per split, bytes per image per split, and every
                                     shard with its sha256

`encoded_bytes` is what the image costs on the wire in its variant: its codec's bytes (`codec` jpeg, webp or
avif, at `codec_quality`) where the variant or the image's degradation encoded it, else a lossless PNG of the
cached pixels (`codec` png, the reference), which the writer computes for every row that does not bring one.

Shards are written first and _info.json last (each through a temporary name and an atomic rename), so a crash
never leaves an _info.json that points at partial shards. Readers verify the checksums before trusting a shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import integrity
from .integrity import file_sha256
from .pixeltable import PIXELS, arrow_to_pixels, read_parquet

INFO = "_info.json"
SPLITS = ("train", "val", "test")
# What an image costs on the wire, and the Arrow type of each column.
BYTES_TYPES = {"codec": pa.string(), "codec_quality": pa.int32(), "encoded_bytes": pa.int64()}
BYTES_COLUMNS = tuple(BYTES_TYPES)
COLUMNS = (
    "image_id",
    "label",
    "label_idx",
    "split",
    "degradation",
    "degradation_params",
    *BYTES_COLUMNS,
    PIXELS,
)
INPUT_COLUMNS = tuple(c for c in COLUMNS if c != "label_idx" and c not in BYTES_COLUMNS)
# 2: the bytes columns (codec, codec_quality, encoded_bytes) and _info.json's `bytes`.
FORMAT_VERSION = 2
RERUN = "rerun the job that writes it (resize for the clean variant, degrade for the others)"


def rerun(cache_dir: str | Path) -> str:
    """How to recover a cache that cannot be used."""
    return f"{RERUN}: snakemake --forcerun {cache_dir}, or delete the folder and run snakemake again"


class CacheError(Exception):
    """A cache that cannot be read as it is: _info.json missing or garbled, a shard missing or wrong."""


class ChecksumError(CacheError, integrity.ChecksumError):
    """A shard whose bytes differ from what _info.json recorded."""


def bytes_stats(
    sizes: np.ndarray, pixels_per_image: int, codecs: Sequence[str] = (), qualities: Sequence[Any] = ()
) -> dict[str, Any]:
    """Mean and median kB (1000 bytes) per image and bits per pixel, of encoded sizes in bytes; the codec
    (`mixed` when the images were sent several ways) and its quality (None unless one)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    formats, levels = set(codecs), set(qualities)
    return {
        "images": len(sizes),
        "mean_kb": float(sizes.mean() / 1000),
        "median_kb": float(np.median(sizes) / 1000),
        "bpp": float(8 * sizes.mean() / pixels_per_image),
        "codec": formats.pop() if len(formats) == 1 else "mixed" if formats else None,
        "quality": levels.pop() if len(levels) == 1 else None,
    }


def iter_shards(cache_dir: str | Path, *, verify: bool = True) -> Iterator[tuple[dict[str, Any], pa.Table]]:
    """(shard entry of _info.json, its table) for every shard of a cache, in _info.json's order; each shard's
    checksum is verified before it is read (unless verify=False)."""
    cache_dir = Path(cache_dir)
    for shard in load_info(cache_dir)["shards"]:
        if verify:
            _verify_shards(cache_dir, [shard])
        yield shard, read_parquet(cache_dir / shard["path"])


def load_info(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / INFO
    try:
        info = json.loads(integrity.read_bytes(path))
    except FileNotFoundError:
        raise CacheError(f"{path} is missing: the cache was never completed ({rerun(cache_dir)})") from None
    except integrity.ChecksumError:
        raise ChecksumError(
            f"{path} is corrupt or was changed after it was written: {rerun(cache_dir)}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path} is not valid JSON ({err}): {rerun(cache_dir)}") from None
    required = ("classes", "height", "width", "rows", "shards")
    if not isinstance(info, dict) or any(k not in info for k in required):
        raise CacheError(f"{path} lacks required keys {list(required)}: {rerun(cache_dir)}")
    return info


def _shards_of(info: dict[str, Any], split: str | None) -> list[dict[str, Any]]:
    return [s for s in info["shards"] if split is None or s["split"] == split]


def _verify_shards(cache_dir: Path, shards: list[dict[str, Any]]) -> None:
    for shard in shards:
        path = cache_dir / shard["path"]
        if not path.is_file():
            raise CacheError(f"shard {path} listed in {INFO} is missing: {rerun(cache_dir)}")
        actual = file_sha256(path)
        if actual != shard["sha256"]:
            raise ChecksumError(
                f"shard {path} is corrupt or was changed: sha256 {actual}, but {INFO} recorded "
                f"{shard['sha256']}; {rerun(cache_dir)}"
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
            raise CacheError(
                f"shard(s) {missing} listed in {cache_dir / INFO} are missing: {rerun(cache_dir)}"
            )
    columns = ["image_id", "label_idx", "degradation", PIXELS]
    table = pa.concat_tables(read_parquet(cache_dir / s["path"], columns=columns) for s in shards)
    if table.num_rows != info["rows"][split]:
        raise CacheError(f"{cache_dir}/{split}: {table.num_rows} rows, but {INFO} says {info['rows'][split]}")
    return CacheSplit(
        pixels=arrow_to_pixels(table.column(PIXELS), int(info["height"]), int(info["width"])),
        labels=table.column("label_idx").to_numpy().astype(np.int64, copy=False),
        image_ids=table.column("image_id").to_pylist(),
        degradations=table.column("degradation").to_pylist(),
        classes=list(info["classes"]),
    )
