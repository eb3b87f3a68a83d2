"""Ingest on real files: each bad-input class is quarantined with its reason; odd formats come out upright."""

from __future__ import annotations

import io
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermcompress.ingest import run_ingest
from dermcompress.sources import DOC_FILES, GROUND_TRUTH, IMAGES_DIR, IMAGES_ZIP, METADATA
from dermcompress.synth import make_synthetic

N, SEED = 60, 1
BIG = 89_478_485  # config.yaml's data.max_pixels


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _ingest(root: Path, images: Path, out: Path, max_pixels: int = BIG, synthetic: bool = True):
    """Run ingest; return the manifest and quarantine CSV as read back from disk, and the log text."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("dermcompress")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        returned = run_ingest(
            ground_truth=root / GROUND_TRUTH,
            metadata=root / METADATA,
            images=images,
            manifest_out=out / "manifest.parquet",
            quarantine_out=out / "quarantine.csv",
            max_pixels=max_pixels,
            synthetic=synthetic,
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    manifest = pd.read_parquet(out / "manifest.parquet")
    pd.testing.assert_frame_equal(manifest, returned)
    return manifest, pd.read_csv(out / "quarantine.csv"), records


def _check_counts(manifest: pd.DataFrame, quarantine: pd.DataFrame, records: list[str]) -> None:
    ok = manifest["status"] == "ok"
    assert len(manifest) == ok.sum() + (manifest["status"] == "quarantined").sum()
    assert manifest["image_id"].is_unique and manifest["image_id"].is_monotonic_increasing
    assert manifest.loc[ok, "reason"].isna().all() and manifest.loc[~ok, "reason"].notna().all()
    assert quarantine["image_id"].tolist() == manifest.loc[~ok, "image_id"].tolist()
    assert quarantine["reason"].tolist() == manifest.loc[~ok, "reason"].tolist()
    per_reason = manifest.loc[~ok, "reason"].value_counts().sort_index()
    expected = f"listed={len(manifest)} ok={ok.sum()} quarantined={(~ok).sum()}" + "".join(
        f" {r}={c}" for r, c in per_reason.items()
    )
    assert records[-1] == expected


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synth") / "isic", n=N, seed=SEED)


@pytest.fixture(scope="module")
def clean(synth, tmp_path_factory):
    return _ingest(synth, synth / IMAGES_DIR, tmp_path_factory.mktemp("clean"))


# Problems planted in a copy of the synthetic set: id -> expected reason.
BAD = {
    "corrupt": "corrupt",
    "truncated": "truncated",
    "empty": "empty_file",
    "text": "not_an_image",
    "missing": "missing_file",
    "duplicate": "duplicate_row",
    "zero_labels": "no_label",
    "two_labels": "multiple_labels",
    "duplicate_and_truncated": "duplicate_row",  # several problems: the first found wins
}
CONVERTED = {  # extra id -> (mode, format, upright size)
    "ISIC_9000001": ("CMYK", "JPEG", (30, 20)),
    "ISIC_9000002": ("L", "JPEG", (30, 20)),
    "ISIC_9000003": ("RGBA", "PNG", (30, 20)),
    "ISIC_9000004": ("I;16", "PNG", (30, 20)),
    "ISIC_9000005": ("RGB", "JPEG", (20, 40)),  # stored 40x20 with EXIF orientation 6 (rotate 90)
}
NO_ROW_FILE, META_ONLY = "ISIC_9100000", "ISIC_9200000"


@pytest.fixture(scope="module")
def bad(synth, tmp_path_factory):
    """A copy of the synthetic set with one of each problem planted; ingested once for all tests below."""
    root = tmp_path_factory.mktemp("bad") / "isic"
    shutil.copytree(synth, root)
    folder = root / IMAGES_DIR
    gt, meta = pd.read_csv(root / GROUND_TRUTH), pd.read_csv(root / METADATA)
    ids = iter(gt["image"].tolist())  # one distinct real image per problem
    victims = {problem: next(ids) for problem in BAD}
    path = {problem: folder / f"{image_id}.jpg" for problem, image_id in victims.items()}

    data = path["corrupt"].read_bytes()
    cut = len(data) // 3  # valid header, random entropy data: libjpeg stops with an error
    noise = np.random.default_rng(0).integers(0, 256, len(data) - cut, dtype=np.uint8).tobytes()
    path["corrupt"].write_bytes(data[:cut] + noise)
    for problem in ("truncated", "duplicate_and_truncated"):
        data = path[problem].read_bytes()
        path[problem].write_bytes(data[: len(data) // 2])
    path["empty"].write_bytes(b"")
    path["text"].write_text("this is a README saved with a .jpg name\n")
    path["missing"].unlink()

    gt = pd.concat([gt, gt[gt["image"].isin([victims["duplicate"], victims["duplicate_and_truncated"]])]])
    labels = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    gt.loc[gt["image"] == victims["zero_labels"], labels] = 0.0
    gt.loc[gt["image"] == victims["two_labels"], ["MEL", "NV"]] = 1.0

    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "ISIC_9000001.jpg": _jpeg(rgb.convert("CMYK")),
        "ISIC_9000002.jpg": _jpeg(rgb.convert("L")),
        "ISIC_9000003.png": _png(rgb.convert("RGBA")),
        "ISIC_9000004.png": _png(Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)),
        "ISIC_9000005.jpg": _jpeg(rgb.resize((40, 20)), exif=exif.tobytes()),
        f"{NO_ROW_FILE}.jpg": _jpeg(rgb),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    extra = pd.DataFrame({"image": list(CONVERTED), **{c: 0.0 for c in labels}}).assign(NV=1.0)
    gt = pd.concat([gt, extra]).sort_values("image")
    gt.loc[len(gt) + 100, "NV"] = 1.0  # a row with no image id at all: logged, it has nothing to match
    gt.to_csv(root / GROUND_TRUTH, index=False)

    # A patient id for one image (it must win over the lesion id) and a metadata row with nothing else.
    meta["patient_id"] = None
    patient_image = meta["image"][meta["lesion_id"].notna()].iloc[-1]
    meta.loc[meta["image"] == patient_image, "patient_id"] = "IP_0000001"
    meta = pd.concat([meta, pd.DataFrame({"image": [META_ONLY], "age_approx": [50.0]})])
    meta.to_csv(root / METADATA, index=False)

    manifest, quarantine, records = _ingest(root, folder, tmp_path_factory.mktemp("bad_out"))
    return {
        "manifest": manifest.set_index("image_id", drop=False),
        "quarantine": quarantine,
        "records": records,
        "victims": victims,
        "patient_image": patient_image,
        "meta": meta,
    }


def test_clean_synthetic_set_is_all_ok(clean, synth):
    manifest, quarantine, records = clean
    _check_counts(manifest, quarantine, records)
    gt = pd.read_csv(synth / GROUND_TRUTH)
    assert manifest["image_id"].tolist() == gt["image"].tolist()
    assert (manifest["status"] == "ok").all() and quarantine.empty
    assert manifest["synthetic"].all()
    assert manifest["member"].tolist() == [f"{i}.jpg" for i in gt["image"]]
    assert (manifest["mode"] == "RGB").all() and (manifest["format"] == "JPEG").all()
    assert manifest["label"].tolist() == gt.set_index("image").drop(columns="UNK").idxmax(axis=1).tolist()
    # _downsampled ids are joined like the others
    ds = manifest[manifest["image_id"].str.endswith("_downsampled")]
    assert len(ds) and ds["label"].notna().all() and ds["age_approx"].notna().any()
    # documentation files are logged, not listed
    assert any("ATTRIBUTION.txt" in r and "LICENSE.txt" in r for r in records)
    assert not manifest["member"].isin(DOC_FILES).any()


def test_hash_size_and_dimensions_are_those_of_the_file(clean, synth):
    import hashlib

    manifest = clean[0]
    for row in manifest.head(5).itertuples():
        data = (synth / IMAGES_DIR / row.member).read_bytes()
        assert row.sha256 == hashlib.sha256(data).hexdigest() and row.bytes == len(data)
        with Image.open(io.BytesIO(data)) as img:
            assert (row.width, row.height) == img.size


def test_group_id_is_lesion_id_else_image_id(clean):
    manifest = clean[0]
    assert "patient_id" not in manifest.columns  # ISIC 2019 has none; an empty column would mislead the split
    expected = manifest["lesion_id"].fillna(manifest["image_id"])
    assert manifest["group_id"].tolist() == expected.tolist()
    assert manifest["lesion_id"].isna().any() and manifest["lesion_id"].notna().any()


def test_zip_gives_the_same_manifest_but_member_paths(synth, clean, tmp_path):
    zipped = make_synthetic(tmp_path / "zipped", n=N, seed=SEED, as_zip=True)
    manifest, quarantine, records = _ingest(zipped, zipped / IMAGES_ZIP, tmp_path / "out")
    _check_counts(manifest, quarantine, records)
    folder_manifest = clean[0]
    assert manifest["member"].tolist() == [f"{IMAGES_DIR}/{m}" for m in folder_manifest["member"]]
    pd.testing.assert_frame_equal(manifest.drop(columns="member"), folder_manifest.drop(columns="member"))


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_input_is_quarantined_with_its_reason(bad, problem):
    row = bad["manifest"].loc[bad["victims"][problem]]
    assert row["status"] == "quarantined"
    assert row["reason"] == BAD[problem]
    assert isinstance(row["detail"], str) and row["detail"]
    quarantine = bad["quarantine"].set_index("image_id")
    assert quarantine.loc[row["image_id"], "reason"] == BAD[problem]


def test_bad_inputs_keep_what_is_known_about_them(bad):
    manifest, victims = bad["manifest"], bad["victims"]
    missing = manifest.loc[victims["missing"]]
    assert pd.isna(missing["member"]) and pd.isna(missing["sha256"]) and missing["label"] is not None
    empty = manifest.loc[victims["empty"]]
    assert empty["bytes"] == 0 and empty["member"] == f"{victims['empty']}.jpg"
    assert pd.isna(manifest.loc[victims["two_labels"], "label"])
    assert pd.isna(manifest.loc[victims["zero_labels"], "label"])
    # a decodable duplicate is still measured, only quarantined
    assert manifest.loc[victims["duplicate"], "width"] > 0


def test_file_without_row_and_row_without_file(bad):
    manifest = bad["manifest"]
    no_row = manifest.loc[NO_ROW_FILE]
    assert (no_row["status"], no_row["reason"], no_row["member"]) == (
        "quarantined",
        "no_label_row",
        f"{NO_ROW_FILE}.jpg",
    )
    meta_only = manifest.loc[META_ONLY]
    assert (meta_only["status"], meta_only["reason"]) == ("quarantined", "no_label_row")
    assert pd.isna(meta_only["member"]) and meta_only["age_approx"] == 50.0


@pytest.mark.parametrize("image_id", list(CONVERTED))
def test_odd_formats_are_accepted_upright(bad, image_id):
    mode, fmt, (width, height) = CONVERTED[image_id]
    row = bad["manifest"].loc[image_id]
    assert (row["status"], row["label"]) == ("ok", "NV")
    assert pd.isna(row["reason"])
    assert row["format"] == fmt
    assert row["mode"] == mode or (mode == "I;16" and row["mode"].startswith("I"))
    assert (row["width"], row["height"]) == (width, height)


def test_patient_id_wins_over_lesion_id(bad):
    manifest = bad["manifest"]
    assert manifest.loc[bad["patient_image"], "group_id"] == "IP_0000001"
    assert manifest["patient_id"].notna().sum() == 1
    others = manifest.drop(index=bad["patient_image"])
    assert others["group_id"].tolist() == others["lesion_id"].fillna(others["image_id"]).tolist()


def test_bad_set_counts_add_up(bad, synth):
    manifest = bad["manifest"].reset_index(drop=True)
    _check_counts(manifest, bad["quarantine"], bad["records"])
    seen = set(pd.read_csv(synth / GROUND_TRUTH)["image"]) | set(CONVERTED) | {NO_ROW_FILE, META_ONLY}
    assert set(manifest["image_id"]) == seen
    expected = {
        **{bad["victims"][p]: r for p, r in BAD.items()},
        NO_ROW_FILE: "no_label_row",
        META_ONLY: "no_label_row",
    }
    assert any("1 row(s) with an empty image id" in r for r in bad["records"])
    quarantined = manifest[manifest["status"] == "quarantined"]
    assert dict(zip(quarantined["image_id"], quarantined["reason"], strict=True)) == expected


def test_image_over_max_pixels_is_quarantined(tmp_path):
    folder = tmp_path / IMAGES_DIR
    folder.mkdir()
    (folder / "ISIC_0000001.png").write_bytes(_png(Image.new("RGB", (40, 40), "brown")))  # 1600 px
    (folder / "ISIC_0000002.png").write_bytes(_png(Image.new("RGB", (20, 20), "brown")))  # 400 px
    header = "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
    rows = "".join(f"ISIC_000000{i},0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n" for i in (1, 2))
    (tmp_path / GROUND_TRUTH).write_text(header + rows)
    (tmp_path / METADATA).write_text("image,age_approx,anatom_site_general,lesion_id,sex\n")
    manifest, quarantine, records = _ingest(
        tmp_path, folder, tmp_path / "out", max_pixels=1000, synthetic=False
    )
    _check_counts(manifest, quarantine, records)
    assert manifest["status"].tolist() == ["quarantined", "ok"]
    assert manifest["reason"].tolist()[0] == "too_many_pixels"
    assert not manifest["synthetic"].any()
    assert manifest["group_id"].tolist() == manifest["image_id"].tolist()


def test_unsafe_zip_entries_are_refused(synth, tmp_path):
    archive = tmp_path / IMAGES_ZIP
    rgb = Image.new("RGB", (16, 12), "brown")
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"{IMAGES_DIR}/ISIC_0000001.jpg", _jpeg(rgb))
        zf.writestr("/etc/ISIC_0000002.jpg", _jpeg(rgb))
        zf.writestr(f"{IMAGES_DIR}/../../ISIC_0000003.jpg", _jpeg(rgb))
        zf.writestr("../escape.txt", b"not an image, refused and logged")
    header = "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
    rows = "".join(f"ISIC_000000{i},1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n" for i in (1, 2, 3))
    (tmp_path / GROUND_TRUTH).write_text(header + rows)
    (tmp_path / METADATA).write_text("image,age_approx,anatom_site_general,lesion_id,sex\n")
    manifest, quarantine, records = _ingest(tmp_path, archive, tmp_path / "out")
    _check_counts(manifest, quarantine, records)
    rows = manifest.set_index("image_id")
    assert rows.loc["ISIC_0000001", "status"] == "ok"
    assert rows.loc["ISIC_0000002", "reason"] == "unsafe_zip_entry: absolute path"
    assert rows.loc["ISIC_0000003", "reason"] == "unsafe_zip_entry: '..' in path"
    assert rows.loc["ISIC_0000002", "member"] == "/etc/ISIC_0000002.jpg"
    assert pd.isna(rows.loc["ISIC_0000003", "sha256"])  # never read
    assert any("../escape.txt" in r for r in records)
