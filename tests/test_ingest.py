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

from dermcompress.data.ingest import run_ingest
from dermcompress.data.sources import DOC_FILES, GROUND_TRUTH, IMAGES_DIR, IMAGES_ZIP, METADATA
from dermcompress.data.synth import make_synthetic

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


def _ingest(root: Path, images: Path, out: Path, max_pixels: int = BIG, synthetic: bool = True, **limits):
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
            labels=root / GROUND_TRUTH,
            metadata=root / METADATA,
            images=images,
            manifest_out=out / "manifest.parquet",
            quarantine_out=out / "quarantine.csv",
            max_pixels=max_pixels,
            synthetic=synthetic,
            **limits,
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


def test_a_patient_links_its_lesions_images_into_one_group_named_by_the_patient(bad):
    """One image names patient IP_0000001; the other images of its lesion name no patient, yet share it: all
    are one group (connected components of patients and lesions), named by the patient. The rest: lesions."""
    manifest = bad["manifest"]
    assert manifest["patient_id"].notna().sum() == 1
    lesion = manifest.loc[bad["patient_image"], "lesion_id"]
    together = manifest["lesion_id"].eq(lesion) | manifest.index.isin([bad["patient_image"]])
    assert set(manifest.loc[together, "group_id"]) == {"IP_0000001"}
    others = manifest[~together]
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


# --------------------------------------------------------------------------------------------- hostile inputs

HEADER = "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
META_HEADER = "image,age_approx,anatom_site_general,lesion_id,sex\n"


def _row(image_id: str, **cells: str) -> str:
    """A ground-truth row: NV by default, or the given cells (the others 0.0)."""
    values = {c: "0.0" for c in HEADER.strip().split(",")[1:]} | (cells or {"NV": "1.0"})
    return ",".join([image_id, *values.values()]) + "\n"


def _small_root(root: Path, ids: list[str], rows: str | None = None) -> Path:
    """A data root with a ground truth listing `ids` (NV) unless `rows` is given, and an empty metadata CSV."""
    root.mkdir(parents=True, exist_ok=True)
    (root / GROUND_TRUTH).write_text(HEADER + (rows if rows is not None else "".join(_row(i) for i in ids)))
    (root / METADATA).write_text(META_HEADER)
    return root


def _patch_zip(archive: Path, member: str, patch) -> None:
    """Rewrite the bytes of one zip entry in place: patch(data: bytearray, info) edits the archive buffer."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(member)
    data = bytearray(archive.read_bytes())
    patch(data, info)
    archive.write_bytes(bytes(data))


def _data_offset(data: bytearray, info: zipfile.ZipInfo) -> int:
    """Where an entry's (compressed) bytes start: after its local header, name and extra field."""
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    return info.header_offset + 30 + name_len + extra_len


def _reasons(manifest: pd.DataFrame) -> dict[str, str | None]:
    return {
        i: r if isinstance(r, str) else None
        for i, r in zip(manifest["image_id"], manifest["reason"], strict=True)
    }


def _central_record(data: bytearray, member: str) -> int:
    """Offset of an entry's record in the zip's central directory."""
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = int.from_bytes(data[pos + 28 : pos + 30], "little")
        if data[pos + 46 : pos + 46 + name_len] == member.encode():
            return pos
        pos = data.find(b"PK\x01\x02", pos + 46)
    raise KeyError(member)


def _hostile_zip(root: Path) -> dict[str, str | None]:
    """An official-layout zip with one good image and one entry of each damage; id -> expected reason."""
    root.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    archive = root / IMAGES_ZIP
    expected = {
        "ISIC_0000001": None,
        "ISIC_0000002": "corrupt_zip_entry",  # bad CRC-32: a stored entry with one byte flipped
        "ISIC_0000003": "corrupt_zip_entry",  # a corrupt deflate stream
        "ISIC_0000004": "encrypted_zip_entry",
        "ISIC_0000005": "file_too_large",  # 1 GiB of zeros in a 4.7 MB zip
    }
    name = {i: f"{IMAGES_DIR}/{i}.jpg" for i in expected}
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for image_id in ("ISIC_0000001", "ISIC_0000002", "ISIC_0000004"):
            zf.writestr(name[image_id], _jpeg(rgb), compress_type=zipfile.ZIP_STORED)
        zf.writestr(name["ISIC_0000003"], _png(rgb))
        with zf.open(name["ISIC_0000005"], "w", force_zip64=True) as entry:
            for _ in range(64):
                entry.write(bytes(16 * 2**20))

    def flip(data, info):
        data[_data_offset(data, info) + info.compress_size // 2] ^= 0xFF

    def garble(data, info):  # a stored-block header whose lengths disagree: zlib stops with an error
        start = _data_offset(data, info)
        data[start : start + 8] = bytes(range(8))

    def encrypt(data, info):  # the "encrypted" flag bit, in the local header and the central directory
        data[info.header_offset + 6] |= 0x1
        data[_central_record(data, info.filename) + 8] |= 0x1

    _patch_zip(archive, name["ISIC_0000002"], flip)
    _patch_zip(archive, name["ISIC_0000003"], garble)
    _patch_zip(archive, name["ISIC_0000004"], encrypt)
    _small_root(root, list(expected))
    return expected


@pytest.fixture(scope="module")
def hostile_zip(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    root = tmp_path_factory.mktemp("hostile") / "isic"
    return root, _hostile_zip(root)


def test_damaged_zip_entries_are_quarantined_and_the_rest_ingested(hostile_zip, tmp_path):
    root, expected = hostile_zip
    manifest, quarantine, records = _ingest(root, root / IMAGES_ZIP, tmp_path)
    _check_counts(manifest, quarantine, records)
    assert _reasons(manifest) == expected
    rows = manifest.set_index("image_id")
    assert rows.loc["ISIC_0000001", "status"] == "ok" and rows.loc["ISIC_0000001", "width"] == 32
    assert "Bad CRC-32" in rows.loc["ISIC_0000002", "detail"]
    assert "invalid stored block lengths" in rows.loc["ISIC_0000003", "detail"]
    assert str(2**30) in rows.loc["ISIC_0000005", "detail"]  # its declared size: refused before reading
    assert rows.loc[["ISIC_0000002", "ISIC_0000004", "ISIC_0000005"], "sha256"].isna().all()


@pytest.mark.workflow
def test_hostile_zip_through_snakemake_keeps_memory_bounded(hostile_zip, workflow_dir):
    from conftest import snakemake, write_config

    root, expected = hostile_zip
    write_config(workflow_dir / "hostile.yaml", {"data": {"isic_root": str(root)}, "run_experiments": []})
    snakemake(workflow_dir, "results/data/manifest.parquet", "--configfile", "hostile.yaml")
    assert _reasons(pd.read_parquet(workflow_dir / "results/data/manifest.parquet")) == expected
    # Snakemake's benchmark of the job: the 1 GiB entry was never held in memory.
    benchmark = pd.read_csv(workflow_dir / "results/benchmarks/ingest.tsv", sep="\t")
    assert benchmark["max_rss"].iloc[0] < 700, benchmark  # MB

    # A zip cut short is one line that names it, on Snakemake's screen and in the log.
    archive = root / IMAGES_ZIP
    truncated = tmp = workflow_dir / "truncated"
    shutil.copytree(root, tmp)
    (truncated / IMAGES_ZIP).write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    write_config(
        workflow_dir / "truncated.yaml", {"data": {"isic_root": str(truncated)}, "run_experiments": []}
    )
    proc = snakemake(
        workflow_dir,
        "results/data/manifest.parquet",
        "--configfile",
        "truncated.yaml",
        "--forceall",
        check=False,
    )
    assert proc.returncode != 0
    message = f"{truncated / IMAGES_ZIP}: not a readable zip archive"
    assert message in (workflow_dir / "results/logs/ingest.log").read_text()
    assert message in proc.stdout + proc.stderr


def test_oversized_file_is_quarantined_without_being_read(tmp_path):
    root = _small_root(tmp_path / "isic", ["ISIC_0000001", "ISIC_0000002"])
    folder = root / IMAGES_DIR
    folder.mkdir()
    small = _png(Image.new("RGB", (8, 8), "brown"))
    (folder / "ISIC_0000001.png").write_bytes(small)
    (folder / "ISIC_0000002.png").write_bytes(_png(Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 9)) * 50)
    manifest, quarantine, records = _ingest(root, folder, tmp_path / "out", max_file_bytes=2 * len(small))
    _check_counts(manifest, quarantine, records)
    rows = manifest.set_index("image_id")
    assert rows.loc["ISIC_0000001", "status"] == "ok"
    assert rows.loc["ISIC_0000002", "reason"] == "file_too_large"
    assert f"> data.max_file_bytes = {2 * len(small)}" in rows.loc["ISIC_0000002", "detail"]


def test_links_out_of_the_image_folder_are_refused(tmp_path):
    ids = [f"ISIC_000000{i}" for i in range(1, 6)]
    root = _small_root(tmp_path / "isic", ids)
    folder = root / IMAGES_DIR
    (folder / "originals").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    (outside / "folder").mkdir(parents=True)
    image = _jpeg(Image.new("RGB", (20, 10), "brown"))
    (folder / "ISIC_0000001.jpg").write_bytes(image)
    (outside / "lesion.jpg").write_bytes(image)
    (folder / "ISIC_0000002.jpg").symlink_to(outside / "lesion.jpg")  # a real JPEG, but not the data set's
    (folder / "ISIC_0000003.jpg").symlink_to("/etc/hostname")
    (folder / "originals/ISIC_0000004.orig").write_bytes(image)
    (folder / "ISIC_0000004.jpg").symlink_to("originals/ISIC_0000004.orig")  # inside the folder: fine
    (outside / "folder/ISIC_0000005.jpg").write_bytes(image)
    (folder / "linked").symlink_to(outside / "folder", target_is_directory=True)
    manifest, quarantine, records = _ingest(root, folder, tmp_path / "out")
    _check_counts(manifest, quarantine, records)
    rows = manifest.set_index("image_id")
    assert rows["status"].to_dict() == {
        "ISIC_0000001": "ok",
        "ISIC_0000002": "quarantined",
        "ISIC_0000003": "quarantined",
        "ISIC_0000004": "ok",
        "ISIC_0000005": "quarantined",
    }
    assert rows.loc["ISIC_0000002", "reason"] == rows.loc["ISIC_0000003", "reason"] == "link_outside_root"
    assert str(outside / "lesion.jpg") in rows.loc["ISIC_0000002", "detail"]
    assert rows.loc[["ISIC_0000002", "ISIC_0000003"], "sha256"].isna().all()  # never read, never hashed
    assert rows.loc["ISIC_0000005", "reason"] == "missing_file"  # the linked folder is not entered...
    assert any("is a link to a folder" in r and "linked" in r for r in records)  # ...and the log says so


def test_soft_or_out_of_range_labels_are_quarantined_naming_the_cells(tmp_path):
    rows = (
        _row("ISIC_0000001", MEL="1.0")
        + _row("ISIC_0000002", MEL="0.6", NV="0.4")
        + _row("ISIC_0000003", MEL="2.0")
        + _row("ISIC_0000004", MEL="1.0", BCC="")
        + _row("ISIC_0000005", NV="yes")
        + _row("ISIC_0000006", MEL="1", NV="0")
    )
    root = _small_root(tmp_path / "isic", [], rows)
    folder = root / IMAGES_DIR
    folder.mkdir()
    for i in range(1, 7):
        (folder / f"ISIC_000000{i}.jpg").write_bytes(_jpeg(Image.new("RGB", (20, 10), "brown")))
    manifest, quarantine, records = _ingest(root, folder, tmp_path / "out")
    _check_counts(manifest, quarantine, records)
    got = manifest.set_index("image_id")
    assert _reasons(manifest) == {
        "ISIC_0000001": None,
        "ISIC_0000002": "invalid_label",
        "ISIC_0000003": "invalid_label",
        "ISIC_0000004": "invalid_label",
        "ISIC_0000005": "invalid_label",
        "ISIC_0000006": None,
    }
    assert got.loc["ISIC_0000002", "detail"].startswith("MEL='0.6', NV='0.4' in the ground truth")
    assert "MEL='2.0'" in got.loc["ISIC_0000003", "detail"]
    assert "BCC=(blank)" in got.loc["ISIC_0000004", "detail"]
    assert "NV='yes'" in got.loc["ISIC_0000005", "detail"]
    assert [v if isinstance(v, str) else None for v in got["label"]] == ["MEL", None, None, None, None, "MEL"]


def _truncated_zip(root: Path) -> Path:
    archive = root / IMAGES_ZIP
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"{IMAGES_DIR}/ISIC_0000001.jpg", _jpeg(Image.new("RGB", (64, 64), "brown")))
    archive.write_bytes(archive.read_bytes()[:300])
    return archive


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("empty ground truth", "the file is empty"),
        (
            "ragged ground truth",
            "not a well-formed CSV: Error tokenizing data. C error: Expected 10 fields in line 3",
        ),
        ("latin-1 metadata", "not UTF-8 text (byte 0xe9"),
        ("truncated zip", "not a readable zip archive"),
    ],
)
def test_unreadable_input_file_is_named_in_one_line(tmp_path, damage, says):
    root = _small_root(tmp_path / "isic", ["ISIC_0000001"])
    folder = root / IMAGES_DIR
    folder.mkdir()
    (folder / "ISIC_0000001.jpg").write_bytes(_jpeg(Image.new("RGB", (20, 10), "brown")))
    images, named = folder, root / GROUND_TRUTH
    if damage == "empty ground truth":
        named.write_bytes(b"")
    elif damage == "ragged ground truth":
        named.write_text(HEADER + _row("ISIC_0000001") + _row("ISIC_0000002").strip() + ",1.0,0.0\n")
    elif damage == "latin-1 metadata":
        named = root / METADATA
        named.write_bytes(
            (META_HEADER + "ISIC_0000001,50,anterior torso,IL_1,f\xe9minin\n").encode("latin-1")
        )
    else:
        images = named = _truncated_zip(root)
    with pytest.raises(ValueError) as err:
        _ingest(root, images, tmp_path / "out")
    message = str(err.value)
    assert message.startswith(f"{named}: ") and says in message and "\n" not in message


def test_quarantine_csv_neutralises_spreadsheet_formulas(tmp_path):
    hostile = ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)"]
    root = _small_root(tmp_path / "isic", ["ISIC_0000001", *hostile])
    folder = root / IMAGES_DIR
    folder.mkdir()
    (folder / "ISIC_0000001.jpg").write_bytes(_jpeg(Image.new("RGB", (20, 10), "brown")))
    manifest, quarantine, _ = _ingest(root, folder, tmp_path / "out")
    assert set(manifest.loc[manifest["status"] == "quarantined", "image_id"]) == set(hostile)  # verbatim here
    text = (tmp_path / "out/quarantine.csv").read_text()
    for value in hostile:
        cell = value.replace('"', '""')
        assert f'\n"\'{cell}",' in text or f"\n'{cell}," in text, text
    assert sorted(quarantine["image_id"]) == sorted(f"'{v}" for v in hostile)


def test_reduced_decode_verification_catches_what_a_full_decode_catches(tmp_path):
    """Ingest decodes JPEGs at 1/8 scale; truncation and damage anywhere must still fail as in a full decode."""
    from test_resize import photo_jpeg

    from dermcompress.data.images import decode_image
    from dermcompress.data.ingest import VERIFY_DRAFT, inspect_image

    rng = np.random.default_rng(7)
    originals = {"baseline": photo_jpeg(rng, 1024, 1024)}
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo_jpeg(rng, 1504, 1128))).save(buf, "JPEG", quality=90, progressive=True)
    originals["progressive"] = buf.getvalue()
    damaged = {}
    for kind, data in originals.items():
        small = decode_image(data, max_pixels=BIG, draft_size=VERIFY_DRAFT)
        full = decode_image(data, max_pixels=BIG)
        assert small.width * 8 == full.width  # the check really decodes at 1/8 scale
        for cut in (0.3, 0.9, 0.999):
            damaged[f"{kind} cut at {cut}"] = data[: int(len(data) * cut)]
        noisy = bytearray(data)
        noisy[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
        damaged[f"{kind} zeroed in the middle"] = bytes(noisy)
    for name, data in damaged.items():
        try:
            decode_image(data, max_pixels=BIG)
            full_reason = None
        except Exception as err:  # whatever a full decode raises
            full_reason = getattr(err, "reason", type(err).__name__)
        info = inspect_image(data, max_pixels=BIG)
        assert info["reason"] == full_reason, name
        if "cut" in name:
            assert info["reason"] == "truncated", name
    for data in originals.values():
        info = inspect_image(data, max_pixels=BIG)
        assert info["reason"] is None and (info["width"], info["height"]) == Image.open(io.BytesIO(data)).size
