"""Resize stage: policies, antialiasing, reduced decode, and the stage's table on real files."""

from __future__ import annotations

import hashlib
import io
import zipfile

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermcompress.data.cache import iter_shards, load_info
from dermcompress.data.images import decode_image
from dermcompress.data.pixeltable import PIXELS, arrow_to_pixels, read_table_metadata
from dermcompress.data.resize import (
    SourceChangedError,
    draft_size_for,
    load_resized,
    resize_image,
    run_resize,
)

MAX_PIXELS = 89_478_485
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def photo_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """Smooth colour field + lesion-like blob + fine texture, as JPEG: detail at every scale, like a photo."""
    field = cv2.resize(rng.uniform(40, 220, (5, 5, 3)).astype(np.float32), (width, height), cv2.INTER_CUBIC)
    yy, xx = np.mgrid[:height, :width]
    blob = np.exp(-(((xx - width / 2) / (width / 5)) ** 2 + ((yy - height / 2) / (height / 5)) ** 2))[
        ..., None
    ]
    texture = cv2.GaussianBlur(rng.normal(0, 1, (height, width, 3)).astype(np.float32), (0, 0), 1.5) * 30
    arr = np.clip(field * (1 - 0.5 * blob) + texture + rng.normal(0, 3, (height, width, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_dataset(folder, n_small: int = 40, n_large: int = 3, seed: int = 0):
    """JPEGs in `folder` plus the splits and manifest frames the stage reads."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_small + n_large):
        image_id = f"ISIC_{i:07d}"
        w, h = (300, 200) if i < n_small else (1024, 1024)
        member = f"sub/{image_id}.jpg"
        (folder / "sub").mkdir(exist_ok=True)
        data = photo_jpeg(rng, w, h)
        (folder / member).write_bytes(data)
        rows.append((image_id, member, hashlib.sha256(data).hexdigest()))
    ids = [image_id for image_id, _, _ in rows]
    splits = pd.DataFrame(
        {
            "image_id": ids[::-1],  # not sorted: the stage must sort
            "group_id": [f"g{i // 2}" for i in range(len(ids))],
            "label": ["MEL" if i % 3 else "NV" for i in range(len(ids))],
            "split": ["train", "train", "val", "test"] * (len(ids) // 4) + ["train"] * (len(ids) % 4),
        }
    )
    manifest = pd.DataFrame(
        {
            "image_id": ids,
            "status": "ok",
            "member": [m for _, m, _ in rows],
            "sha256": [sha for _, _, sha in rows],
            "reason": None,
        }
    )
    return splits, manifest


CACHE = dict(classes=["MEL", "NV"], rows_per_shard=8, row_group_size=4)


def read_cache(cache_dir) -> tuple[pd.DataFrame, np.ndarray]:
    """Every row of a cache (all shards, verified) sorted by image_id, and its pixels in that order."""
    info = load_info(cache_dir)
    metas, pixels = [], []
    for _, table in iter_shards(cache_dir):
        metas.append(table.drop_columns([PIXELS]).to_pandas())
        pixels.append(arrow_to_pixels(table.column(PIXELS), info["height"], info["width"]))
    meta, pixels = pd.concat(metas, ignore_index=True), np.concatenate(pixels)
    order = np.argsort(meta["image_id"].to_numpy())
    return meta.iloc[order].reset_index(drop=True), pixels[order]


def bands_image() -> Image.Image:
    """400 x 200: red left quarter, green middle half, blue right quarter."""
    arr = np.zeros((200, 400, 3), np.uint8)
    arr[:, :100] = RED
    arr[:, 100:300] = GREEN
    arr[:, 300:] = BLUE
    return Image.fromarray(arr)


def test_squash_keeps_everything_stretched():
    out = resize_image(bands_image(), 64, "squash")
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (np.abs(out[:, 2:14].astype(int) - RED) <= 2).all()
    assert (np.abs(out[:, 18:46].astype(int) - GREEN) <= 2).all()
    assert (np.abs(out[:, 50:62].astype(int) - BLUE) <= 2).all()


def test_center_crop_keeps_the_central_square():
    out = resize_image(bands_image(), 64, "center_crop")
    assert out.shape == (64, 64, 3)
    assert (np.abs(out.astype(int) - GREEN) <= 2).all()  # the central 200 x 200 is all green


def test_pad_keeps_aspect_with_black_bars():
    out = resize_image(bands_image(), 64, "pad")
    assert out.shape == (64, 64, 3)
    # 400 x 200 fits as 64 x 32, centred: black above and below, bands in the middle rows.
    assert (out[:14] == 0).all() and (out[50:] == 0).all()
    middle = out[18:46].astype(int)
    assert (np.abs(middle[:, 2:14] - RED) <= 2).all()
    assert (np.abs(middle[:, 18:46] - GREEN) <= 2).all()
    assert (np.abs(middle[:, 50:62] - BLUE) <= 2).all()


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="stretch"):
        resize_image(bands_image(), 64, "stretch")


def test_downsizing_is_antialiased():
    checker = ((np.indices((512, 512)).sum(axis=0) % 2) * 255).astype(np.uint8)
    img = Image.fromarray(np.repeat(checker[..., None], 3, axis=2))
    for policy in ("squash", "center_crop", "pad"):
        out = resize_image(img, 64, policy).astype(float)
        # A 1-pixel checkerboard has no content a 64 px image can show: it must average to grey, not alias.
        assert abs(out.mean() - 127.5) < 2 and out.std() < 2, policy


def test_reduced_decode_is_close_to_full_decode():
    data = photo_jpeg(np.random.default_rng(1), 1024, 1024)
    for res in (224, 112, 56):
        draft = decode_image(data, max_pixels=MAX_PIXELS, draft_size=draft_size_for([res], True))
        assert draft.width < 1024  # the decoder really skipped work
        assert min(draft.size) >= res  # ... but never below the target
        fast = load_resized(data, [res], policy="squash", reduced_decode=True, max_pixels=MAX_PIXELS)[res]
        full = load_resized(data, [res], policy="squash", reduced_decode=False, max_pixels=MAX_PIXELS)[res]
        assert np.abs(fast.astype(float) - full).mean() < 1.5, res


def test_one_decode_for_many_resolutions_matches_one_by_one():
    data = photo_jpeg(np.random.default_rng(2), 1024, 1024)
    res = [224, 112, 56]
    for reduced in (False, True):
        many = load_resized(data, res, policy="pad", reduced_decode=reduced, max_pixels=MAX_PIXELS)
        assert list(many) == res
        for r in res:
            one = load_resized(data, [r], policy="pad", reduced_decode=reduced, max_pixels=MAX_PIXELS)[r]
            assert many[r].shape == (r, r, 3)
            if not reduced or r == max(res):  # same decoded image -> identical pixels
                np.testing.assert_array_equal(many[r], one)
            else:  # decoded at a different scale, still close
                assert np.abs(many[r].astype(float) - one).mean() < 1.5


def test_run_resize_writes_the_clean_cache(tmp_path):
    splits, manifest = write_dataset(tmp_path / "images")
    splits.to_parquet(tmp_path / "splits.parquet")
    manifest.to_parquet(tmp_path / "manifest.parquet")
    common = dict(
        splits=tmp_path / "splits.parquet",
        manifest=tmp_path / "manifest.parquet",
        resolution=32,
        policy="squash",
        reduced_decode=True,
        max_pixels=MAX_PIXELS,
        **CACHE,
    )
    info = run_resize(images=tmp_path / "images", out_dir=tmp_path / "pool", threads=2, **common)
    run_resize(images=tmp_path / "images", out_dir=tmp_path / "one", threads=1, **common)

    meta, pixels = read_cache(tmp_path / "pool")
    assert meta["image_id"].tolist() == sorted(splits["image_id"])
    expected = splits.set_index("image_id").loc[meta["image_id"]]
    assert meta["split"].tolist() == expected["split"].tolist()
    assert meta["label"].tolist() == expected["label"].tolist()
    assert meta["label_idx"].tolist() == [["MEL", "NV"].index(label) for label in meta["label"]]
    assert set(meta["degradation"]) == {"none"} and set(meta["degradation_params"]) == {"{}"}
    assert pixels.shape == (len(splits), 32, 32, 3)
    assert info["variant"] == "clean" and info["resolution"] == 32 and info["rows_per_shard"] == 8
    assert info["rows"] == splits["split"].value_counts().to_dict()
    assert len(info["shards"]) == sum(-(-n // 8) for n in info["rows"].values())  # 8 rows a shard at most
    shard_meta = read_table_metadata(tmp_path / "pool" / info["shards"][0]["path"])
    assert shard_meta["policy"] == "squash" and shard_meta["resolution"] == "32"
    # Each row holds its own image, whichever thread made it.
    members = manifest.set_index("image_id")["member"]
    for i in (0, 17, len(meta) - 1):
        data = (tmp_path / "images" / members[meta["image_id"].iat[i]]).read_bytes()
        direct = load_resized(data, [32], policy="squash", reduced_decode=True, max_pixels=MAX_PIXELS)[32]
        np.testing.assert_array_equal(pixels[i], direct)
    np.testing.assert_array_equal(pixels, read_cache(tmp_path / "one")[1])

    # The same images read from a zip (one handle per worker thread) give the same cache.
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as zf:
        for member in manifest["member"]:
            zf.write(tmp_path / "images" / member, member)
    run_resize(images=tmp_path / "images.zip", out_dir=tmp_path / "zip", threads=2, **common)
    np.testing.assert_array_equal(pixels, read_cache(tmp_path / "zip")[1])


def test_changed_raw_file_names_the_image(tmp_path):
    splits, manifest = write_dataset(tmp_path / "images", n_small=4, n_large=0)
    (tmp_path / "images" / "sub" / "ISIC_0000002.jpg").write_bytes(b"not a jpeg any more")
    with pytest.raises(SourceChangedError, match="ISIC_0000002"):
        run_resize(
            splits=splits, manifest=manifest, images=tmp_path / "images", out_dir=tmp_path / "r",
            resolution=16, policy="squash", reduced_decode=True, max_pixels=MAX_PIXELS, threads=2, **CACHE,
        )  # fmt: skip
    (tmp_path / "images" / "sub" / "ISIC_0000002.jpg").unlink()
    with pytest.raises(SourceChangedError, match="ISIC_0000002"):
        run_resize(
            splits=splits, manifest=manifest, images=tmp_path / "images", out_dir=tmp_path / "r",
            resolution=16, policy="squash", reduced_decode=True, max_pixels=MAX_PIXELS, threads=1, **CACHE,
        )  # fmt: skip


def test_raw_file_rewritten_in_place_fails_resize_naming_every_changed_image(tmp_path):
    """A raw image replaced after ingest by another valid JPEG decodes fine: only its sha256 can tell."""
    splits, manifest = write_dataset(tmp_path / "images", n_small=6, n_large=0)
    rng = np.random.default_rng(99)
    for image_id in ("ISIC_0000001", "ISIC_0000004"):
        (tmp_path / "images" / "sub" / f"{image_id}.jpg").write_bytes(photo_jpeg(rng, 300, 200))
    settings = dict(resolution=16, policy="squash", reduced_decode=True, max_pixels=MAX_PIXELS, **CACHE)
    for threads in (1, 2):
        with pytest.raises(SourceChangedError, match="2 raw image") as err:
            run_resize(
                splits=splits, manifest=manifest, images=tmp_path / "images", out_dir=tmp_path / "r",
                threads=threads, **settings,
            )  # fmt: skip
        assert err.value.image_ids == ["ISIC_0000001", "ISIC_0000004"]
        assert "ISIC_0000001" in str(err.value) and "is not the file ingest read" in str(err.value)
    assert not (tmp_path / "r" / "_info.json").exists()


def test_split_members_reads_the_files_ingest_and_split_write(tmp_path):
    """The manifest is written by pyarrow (string), the split by pandas (large_string): both must join."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dermcompress.data.resize import split_members

    splits, manifest = write_dataset(tmp_path / "images", n_small=4, n_large=0)
    splits.to_parquet(tmp_path / "splits.parquet")
    table = pa.Table.from_pandas(manifest, preserve_index=False)
    pq.write_table(
        table.cast(pa.schema([f.with_type(pa.string()) if f.name != "reason" else f for f in table.schema])),
        tmp_path / "manifest.parquet",
    )
    rows = split_members(tmp_path / "splits.parquet", tmp_path / "manifest.parquet")
    assert rows["image_id"].to_pylist() == sorted(splits["image_id"])
    assert (
        rows["member"].to_pylist()
        == manifest.set_index("image_id").loc[sorted(splits["image_id"]), "member"].tolist()
    )


def test_split_images_must_be_ok_in_the_manifest(tmp_path):
    splits, manifest = write_dataset(tmp_path / "images", n_small=4, n_large=0)
    manifest.loc[1, "status"] = "quarantined"
    with pytest.raises(ValueError, match="not 'ok'"):
        run_resize(
            splits=splits, manifest=manifest, images=tmp_path / "images", out_dir=tmp_path / "r",
            resolution=16, policy="squash", reduced_decode=True, max_pixels=MAX_PIXELS, **CACHE,
        )  # fmt: skip


def test_small_jobs_ask_for_one_thread_large_ones_one_per_thousand_images(tmp_path):
    from dermcompress.data.resize import images_in, job_threads

    assert [job_threads(n) for n in (1, 60, 1000, 1001, 2400, 25_331)] == [1, 1, 1, 2, 3, 26]
    splits, manifest = write_dataset(tmp_path / "images", n_small=6, n_large=0)
    assert images_in(tmp_path / "splits.parquet") is None  # not made yet: Snakemake asks again later
    splits.to_parquet(tmp_path / "splits.parquet")
    assert images_in(tmp_path / "splits.parquet") == 6
    run_resize(
        splits=splits, manifest=manifest, images=tmp_path / "images", out_dir=tmp_path / "clean",
        resolution=16, policy="squash", reduced_decode=True, max_pixels=MAX_PIXELS, **CACHE,
    )  # fmt: skip
    assert images_in(tmp_path / "clean") == 6
