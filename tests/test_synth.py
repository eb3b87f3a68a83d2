"""The synthetic ISIC 2019 stand-in: official layout, real-looking CSVs, fixed bytes, learnable MEL vs NV."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from dermcompress import ISIC_CLASSES
from dermcompress.data.sources import DOC_FILES, GROUND_TRUTH, IMAGES_DIR, IMAGES_ZIP, METADATA
from dermcompress.data.synth import make_synthetic
from dermcompress.data.synth_plan import BCN_SIZE, HAM_SIZE, MSK_SIZES, SITES, class_counts

N, SEED = 60, 7


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synth") / "isic", n=N, seed=SEED)


@pytest.fixture(scope="module")
def gt(root) -> pd.DataFrame:
    return pd.read_csv(root / GROUND_TRUTH)


@pytest.fixture(scope="module")
def meta(root) -> pd.DataFrame:
    return pd.read_csv(root / METADATA)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(root, tmp_path):
    again = make_synthetic(tmp_path / "again", n=N, seed=SEED)
    assert _files(again) == _files(root)
    other = make_synthetic(tmp_path / "other", n=N, seed=SEED + 1)
    assert _files(other)[GROUND_TRUTH] != _files(root)[GROUND_TRUTH]


def test_zip_is_deterministic_and_holds_the_same_files(root, tmp_path):
    first = make_synthetic(tmp_path / "z1", n=N, seed=SEED, as_zip=True)
    second = make_synthetic(tmp_path / "z2", n=N, seed=SEED, as_zip=True)
    assert (first / IMAGES_ZIP).read_bytes() == (second / IMAGES_ZIP).read_bytes()
    assert not (first / IMAGES_DIR).exists()
    with zipfile.ZipFile(first / IMAGES_ZIP) as archive:
        entries = {i.filename: archive.read(i) for i in archive.infolist() if not i.is_dir()}
    folder = {f"{IMAGES_DIR}/{name}": data for name, data in _files(root / IMAGES_DIR).items()}
    assert entries == folder
    assert (first / GROUND_TRUTH).read_bytes() == (root / GROUND_TRUTH).read_bytes()


def test_layout_matches_the_official_files(root, gt):
    assert sorted(p.name for p in root.iterdir()) == sorted([IMAGES_DIR, GROUND_TRUTH, METADATA])
    names = sorted(p.name for p in (root / IMAGES_DIR).iterdir())
    assert names == sorted([*DOC_FILES, *(f"{i}.jpg" for i in gt["image"])])
    assert (root / IMAGES_DIR / "ATTRIBUTION.txt").read_text().startswith("SYNTHETIC")


def test_ground_truth_is_one_hot_with_the_official_header(root, gt):
    lines = (root / GROUND_TRUTH).read_text().splitlines()
    assert lines[0] == "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK"
    assert len(lines) == N + 1
    assert {cell for line in lines[1:] for cell in line.split(",")[1:]} == {"0.0", "1.0"}
    assert (gt[list(ISIC_CLASSES)].sum(axis=1) == 1.0).all()
    assert (gt["UNK"] == 0.0).all()
    assert gt["image"].is_unique and gt["image"].is_monotonic_increasing
    assert all(re.fullmatch(r"ISIC_\d{7}(_downsampled)?", i) for i in gt["image"])
    downsampled = gt["image"].str.endswith("_downsampled").mean()
    assert 0.03 <= downsampled <= 0.2


def test_all_classes_present_in_roughly_real_proportions(gt):
    counts = gt[list(ISIC_CLASSES)].sum().astype(int)
    assert (counts >= 1).all()
    assert counts["NV"] > counts["MEL"] > counts["DF"]
    assert counts.to_dict() == class_counts(N)


@pytest.mark.parametrize("n", [1, 2, 39, 40, 41, 400, 25331])
def test_class_counts_sum_to_n(n):
    counts = class_counts(n)
    assert sum(counts.values()) == n
    assert min(counts.values()) >= (1 if n >= 40 else 0)
    if n == 25331:
        assert counts == {
            "MEL": 4522,
            "NV": 12875,
            "BCC": 3323,
            "AK": 867,
            "BKL": 2624,
            "DF": 239,
            "VASC": 253,
            "SCC": 628,
        }


def test_metadata_looks_real(root, gt, meta):
    header = (root / METADATA).read_text().splitlines()[0]
    assert header == "image,age_approx,anatom_site_general,lesion_id,sex"
    assert meta["image"].tolist() == gt["image"].tolist()
    assert set(meta["sex"].dropna()) <= {"male", "female"}
    assert set(meta["anatom_site_general"].dropna()) <= {s for s in SITES if s}
    ages = meta["age_approx"].dropna()
    assert ((ages % 5 == 0) & ages.between(0, 85)).all()
    lesion = meta["lesion_id"]
    assert all(re.fullmatch(r"IL_\d{7}", i) for i in lesion.dropna())
    assert 0 < lesion.isna().mean() <= 0.2
    assert lesion.value_counts().max() >= 2  # several images per lesion


def test_images_of_one_lesion_share_class_and_source(gt, meta):
    labels = gt.set_index("image")[list(ISIC_CLASSES)].idxmax(axis=1)
    frame = meta.assign(label=meta["image"].map(labels), ds=meta["image"].str.endswith("_downsampled"))
    per_lesion = frame.dropna(subset=["lesion_id"]).groupby("lesion_id")
    assert (per_lesion["label"].nunique() == 1).all()
    assert (per_lesion["ds"].nunique() == 1).all()
    assert (per_lesion["sex"].nunique(dropna=False) == 1).all()


def test_image_sizes_are_those_of_the_three_sources(root, gt):
    sizes = {}
    for image_id in gt["image"]:
        with Image.open(root / IMAGES_DIR / f"{image_id}.jpg") as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            sizes[image_id] = img.size
    assert HAM_SIZE in sizes.values() and BCN_SIZE in sizes.values()
    assert set(sizes.values()) <= {HAM_SIZE, BCN_SIZE, *MSK_SIZES}
    assert any(size in MSK_SIZES for size in sizes.values())
    assert all(sizes[i] in MSK_SIZES for i in gt["image"] if i.endswith("_downsampled"))


def test_mel_and_nv_differ_at_32_px(root, gt):
    """MEL is larger and darker than NV: the dark area at 32 px alone nearly separates them."""
    dark, is_mel = [], []
    for image_id, mel, nv in gt[["image", "MEL", "NV"]].itertuples(index=False):
        if mel or nv:
            with Image.open(root / IMAGES_DIR / f"{image_id}.jpg") as img:
                small = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.BOX), float)
            dark.append((small < 0.6 * np.median(small)).mean())
            is_mel.append(bool(mel))
    assert sum(is_mel) >= 5 and len(is_mel) - sum(is_mel) >= 5
    assert roc_auc_score(is_mel, dark) > 0.9


def test_replaces_its_own_output_but_refuses_a_foreign_folder(tmp_path):
    out = make_synthetic(tmp_path / "twice", n=5, seed=0)
    make_synthetic(out, n=3, seed=0)
    assert len(list((out / IMAGES_DIR).glob("*.jpg"))) == 3
    foreign = tmp_path / "real"
    (foreign / IMAGES_DIR).mkdir(parents=True)
    (foreign / IMAGES_DIR / "ISIC_0000000.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="refusing"):
        make_synthetic(foreign, n=3, seed=0)
    assert (foreign / IMAGES_DIR / "ISIC_0000000.jpg").read_bytes() == b"precious"
