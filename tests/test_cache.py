"""The cache stage: lossless, sharded, checksummed parquet; readers refuse anything that does not match."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from dermcompress.data.cache import CacheError, ChecksumError, load_info, read_split, verify_cache
from dermcompress.data.cache_write import CacheWriter, merge_caches, run_cache, shard_plan
from dermcompress.data.integrity import checksum_path
from dermcompress.data.pixeltable import write_pixel_table
from dermcompress.data.resize import numbered

CLASSES = ["MEL", "NV"]
H, W = 6, 8  # not square, so a swapped height/width cannot pass


def write_degraded(path, splits=(("train", 11), ("val", 5), ("test", 7)), seed=0, labels=None):
    """A degraded pixel table like the degrade stage writes, rows in shuffled image_id order."""
    rng = np.random.default_rng(seed)
    split = [s for s, n in splits for _ in range(n)]
    n = len(split)
    ids = [f"ISIC_{i:07d}" for i in rng.permutation(n)]
    meta = pd.DataFrame(
        {
            "image_id": ids,
            "split": split,
            "label": labels if labels is not None else rng.choice(CLASSES, n).tolist(),
            "degradation": rng.choice(["none", "jpeg", "blur"], n).tolist(),
            "degradation_params": [json.dumps({"quality": int(q)}) for q in rng.integers(10, 90, n)],
        }
    )
    pixels = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    write_pixel_table(
        path, meta, pixels, metadata={"resolution": "8", "variant": "degraded", "order": "after_resize"}
    )
    return meta, pixels


def make_cache(tmp_path, rows_per_shard=4, row_group_size=3, **kw):
    meta, pixels = write_degraded(tmp_path / "degraded.parquet", **kw)
    out = tmp_path / "cache"
    info = run_cache(
        degraded=tmp_path / "degraded.parquet",
        out_dir=out,
        classes=CLASSES,
        rows_per_shard=rows_per_shard,
        row_group_size=row_group_size,
    )
    return out, info, meta, pixels


def test_round_trip_is_lossless_and_sorted(tmp_path):
    out, _, meta, pixels = make_cache(tmp_path)
    for split in ("train", "val", "test"):
        data = read_split(out, split)
        expected = meta[meta.split == split].sort_values("image_id")
        assert data.image_ids == expected.image_id.tolist()
        assert data.pixels.dtype == np.uint8 and data.pixels.shape == (len(expected), H, W, 3)
        np.testing.assert_array_equal(data.pixels, pixels[expected.index.to_numpy()])
        assert data.labels.dtype == np.int64
        np.testing.assert_array_equal(data.labels, [CLASSES.index(lab) for lab in expected.label])
        assert data.degradations == expected.degradation.tolist()
        assert data.classes == CLASSES


def test_shards_and_row_groups(tmp_path):
    out, _, meta, _ = make_cache(tmp_path, rows_per_shard=4, row_group_size=3)
    train = sorted((out / "train").glob("part-*.parquet"))
    assert [p.name for p in train] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    ids = []
    for path in train:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow.names == [
            "image_id",
            "label",
            "label_idx",
            "split",
            "degradation",
            "degradation_params",
            "codec",
            "codec_quality",
            "encoded_bytes",
            "pixels",
        ]
        groups = [pf.metadata.row_group(i) for i in range(pf.num_row_groups)]
        assert [g.num_rows for g in groups] == ([3, 1] if pf.metadata.num_rows == 4 else [3])
        assert all(g.column(j).compression == "ZSTD" for g in groups for j in range(g.num_columns))
        table = pf.read()
        assert set(table.column("split").to_pylist()) == {"train"}
        ids += table.column("image_id").to_pylist()
    assert [pq.ParquetFile(p).metadata.num_rows for p in train] == [4, 4, 3]
    assert ids == sorted(meta[meta.split == "train"].image_id)
    # Everything the input said about each image survives.
    by_id = meta.set_index("image_id")
    table = pq.read_table(out / "test").to_pandas().set_index("image_id")
    assert table.degradation_params.to_dict() == by_id.loc[table.index].degradation_params.to_dict()
    assert (table.label_idx == [CLASSES.index(lab) for lab in table.label]).all()


def test_info_json_describes_the_files(tmp_path):
    out, info, _, _ = make_cache(tmp_path)
    on_disk = json.loads((out / "_info.json").read_text())
    assert on_disk == info == load_info(out)
    assert (out / "_info.json").read_text().startswith('{\n  "')  # indent 2
    assert info["resolution"] == 8 and info["variant"] == "degraded"
    assert info["classes"] == CLASSES and (info["height"], info["width"]) == (H, W)
    assert info["dtype"] == "uint8" and info["layout"] == "HWC RGB"
    assert info["rows"] == {"train": 11, "val": 5, "test": 7}
    assert info["input"]["sha256"] == hashlib.sha256((tmp_path / "degraded.parquet").read_bytes()).hexdigest()
    listed = {s["path"] for s in info["shards"]}
    assert listed == {p.relative_to(out).as_posix() for p in out.rglob("*.parquet")}
    for shard in info["shards"]:
        path = out / shard["path"]
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert shard["rows"] == pq.ParquetFile(path).metadata.num_rows
        assert shard["split"] == shard["path"].split("/")[0]
    assert not list(out.rglob(".*tmp"))
    verify_cache(out)


def test_flipped_byte_raises_checksum_error_naming_the_shard(tmp_path):
    out, info, _, _ = make_cache(tmp_path)
    shard = next(s for s in info["shards"] if s["split"] == "val")
    path = out / shard["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as err:
        read_split(out, "val")
    message = str(err.value)
    assert str(path) in message and shard["sha256"] in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    with pytest.raises(ChecksumError):
        verify_cache(out)
    # Only the split being read is checked: the others are still usable.
    assert len(read_split(out, "train")) == 11


def test_rewritten_shard_raises_checksum_error(tmp_path):
    out, _, _, _ = make_cache(tmp_path)
    path = out / "train/part-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 3), path)  # a valid parquet file, but not the one that was cached
    with pytest.raises(ChecksumError, match=r"train/part-00000\.parquet"):
        read_split(out, "train")
    with pytest.raises(ChecksumError, match=r"train/part-00000\.parquet"):
        verify_cache(out, "train")
    verify_cache(out, "test")


def test_missing_shard_and_missing_or_garbled_info(tmp_path):
    out, _, _, _ = make_cache(tmp_path)
    (out / "test/part-00001.parquet").unlink()
    for verify in (True, False):
        with pytest.raises(CacheError, match=r"test/part-00001\.parquet.*missing"):
            read_split(out, "test", verify=verify)
    with pytest.raises(CacheError, match="no split 'holdout'"):
        read_split(out, "holdout")
    (out / "_info.json").write_text('{"classes": ["MEL", "NV"], "hei')
    with pytest.raises(ChecksumError, match=r"_info\.json is corrupt.*snakemake --forcerun"):
        read_split(out, "train")
    checksum_path(out / "_info.json").unlink()  # written by hand: not verified, but still parsed
    with pytest.raises(CacheError, match="not valid JSON"):
        read_split(out, "train")
    (out / "_info.json").write_text('{"classes": ["MEL", "NV"]}')
    with pytest.raises(CacheError, match="lacks required keys"):
        load_info(out)
    (out / "_info.json").unlink()
    with pytest.raises(CacheError, match=r"_info\.json is missing"):
        verify_cache(out)


def test_label_not_in_classes_names_the_image(tmp_path):
    labels = ["MEL"] * 9 + ["BCC"] + ["NV"] * 13
    meta, _ = write_degraded(tmp_path / "degraded.parquet", labels=labels)
    bad_id = meta.image_id[9]
    with pytest.raises(
        ValueError, match=rf"1 image\(s\) have a label not in classes.*{bad_id} \(label 'BCC'\)"
    ):
        run_cache(
            degraded=tmp_path / "degraded.parquet",
            out_dir=tmp_path / "cache",
            classes=CLASSES,
            rows_per_shard=4,
            row_group_size=2,
        )
    assert not (tmp_path / "cache" / "_info.json").exists()


def test_rerun_replaces_the_old_cache(tmp_path):
    out, _, _, _ = make_cache(tmp_path, rows_per_shard=2)
    assert len(list((out / "train").glob("*.parquet"))) == 6
    write_degraded(tmp_path / "degraded.parquet", splits=(("train", 3), ("test", 2)), seed=1)
    info = run_cache(
        degraded=tmp_path / "degraded.parquet",
        out_dir=out,
        classes=CLASSES,
        rows_per_shard=2,
        row_group_size=2,
    )
    assert info["rows"] == {"train": 3, "test": 2}
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.parquet")} == {
        s["path"] for s in info["shards"]
    }
    verify_cache(out)


def test_crash_while_writing_shards_leaves_no_info(tmp_path, monkeypatch):
    out, _, _, _ = make_cache(tmp_path)
    real_write = pq.write_table
    calls = []

    def write_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(pq, "write_table", write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        run_cache(
            degraded=tmp_path / "degraded.parquet",
            out_dir=out,
            classes=CLASSES,
            rows_per_shard=4,
            row_group_size=3,
        )
    # The old _info.json must not vouch for a half-rewritten cache.
    with pytest.raises(CacheError, match="missing"):
        read_split(out, "train")


def test_merged_parts_of_a_scattered_cache_equal_the_one_writer_cache(tmp_path):
    """Two writers that each write every other shard (under its own number), merged: the same shards, bytes
    and _info.json as one writer writing them all; a shard in two parts is refused."""
    rng = np.random.default_rng(3)
    n = 23
    split = rng.choice(["train", "val", "test"], n).tolist()
    rows = pd.DataFrame(
        {
            "image_id": [f"ISIC_{i:07d}" for i in range(n)],
            "label": rng.choice(CLASSES, n).tolist(),
            "split": split,
            "degradation": "none",
            "degradation_params": "{}",
        }
    )
    pixels = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    plan = list(numbered(shard_plan(rows["image_id"].tolist(), split, 3)))

    def write(out, keep):
        writer = CacheWriter(
            out, classes=CLASSES, rows_per_shard=3, row_group_size=2, metadata={"variant": "v"}
        )
        for g, (s, number, idx) in enumerate(plan):
            if keep(g):
                writer.write(s, rows.iloc[idx], pixels[idx], number=number)
        return writer.close(input={"images": "raw"})

    one = write(tmp_path / "one", lambda g: True)
    for k in (0, 1):
        write(tmp_path / f"part{k}", lambda g, k=k: g % 2 == k)
    merged = merge_caches(
        [tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged", input={"images": "raw"}
    )
    assert merged == one == load_info(tmp_path / "merged") and len(one["shards"]) > 4
    verify_cache(tmp_path / "merged")
    write(tmp_path / "a", lambda g: g < 3)
    write(tmp_path / "b", lambda g: g < 2)
    with pytest.raises(CacheError, match="in more than one of the parts"):
        merge_caches([tmp_path / "a", tmp_path / "b"], tmp_path / "bad", input={})
