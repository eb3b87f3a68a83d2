"""The synthetic set in the layouts of the other data sources (datasets.py): ISIC 2020, HAM10000, the ISIC
Archive as isic-cli writes it. Same images as the ISIC 2019 stand-in (synth_plan.plan_images, synth_draw.render_images);
what differs is the files around them, and the ids they carry: lesions are grouped into patients of one to
three lesions, and each layout gives the ids its real counterpart gives.

- isic2020: ISIC_2020_Training_GroundTruth_v2.csv (image_name, patient_id, lesion_id, sex, age_approx,
  anatom_site_general_challenge, diagnosis, benign_malignant, target), images in train/ (or
  ISIC_2020_Training_JPEG.zip holding train/), and ISIC_2020_Training_Duplicates.csv listing a few pairs of
  images of different patients (as the real list does, which the split must keep together);
- ham10000: HAM10000_metadata.csv (lesion_id, image_id, dx, dx_type, age, sex, localization, dataset), images
  split between HAM10000_images_part_1/ and _part_2/ (or their zips); no patient ids, as in the real file;
- isic_archive: flat ISIC_*.jpg, metadata.csv (isic_id, attribution, copyright_license, patient_id and
  lesion_id for some images only, diagnosis_1..3, age_approx, sex, anatom_site_general, pixels_x, pixels_y,
  image_type, dermoscopic_type, fitzpatrick_skin_type for half the images, diagnosis_confirm_type),
  attribution.txt and licenses/ (not images).

A class a source does not have is written with a diagnosis that its table (datasets.py) does not map, so the
synthetic sets exercise the unmapped_diagnosis quarantine too.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from dermcompress.data import datasets
from dermcompress.data.synth_draw import ImageWriter, render_images
from dermcompress.data.synth_plan import Plan
from dermcompress.data.synth_planted import Planted

log = logging.getLogger(__name__)

README = (
    datasets.SYNTHETIC_README
)  # marks a folder this module wrote (a rerun may replace it; ingest reads it)
# The study's classes as each source names them; a class absent from a source gets a name its table lacks.
DIAGNOSIS_2020 = {"MEL": "melanoma", "NV": "nevus", "BKL": "seborrheic keratosis"}
DX_HAM = {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AK": "akiec", "BKL": "bkl", "DF": "df", "VASC": "vasc"}
ARCHIVE_PATHS = {
    "MEL": "Malignant:Malignant melanocytic proliferations (Melanoma):Melanoma Invasive",
    "NV": "Benign:Benign melanocytic proliferations:Nevus",
    "BCC": "Malignant:Malignant adnexal epithelial proliferations - Follicular:Basal cell carcinoma",
    "AK": "Indeterminate:Indeterminate epidermal proliferations:Solar or actinic keratosis",
    "BKL": "Benign:Benign epidermal proliferations:Seborrheic keratosis",
    "DF": "Benign:Benign soft tissue proliferations - Fibro-histiocytic:Dermatofibroma",
    "VASC": "Benign:Benign soft tissue proliferations - Vascular:Hemangioma",
    "SCC": "Malignant:Malignant epidermal proliferations:Squamous cell carcinoma, NOS",
}
ARCHIVE_KNOWN_PATIENT = 0.7  # share of Archive images whose patient id the metadata gives
ARCHIVE_KNOWN_LESION = 0.8
SKIN_TYPES = ("I", "II", "III", "IV", "V", "VI")  # isic-metadata's FitzpatrickSkinType


def _patients(plan: Plan, seed: int) -> dict[int, str]:
    """Lesion index -> patient id: the lesions shuffled, one to three per patient (a generator of its own, so
    the ISIC 2019 stand-in's draws are untouched)."""
    rng = np.random.default_rng([seed, 3])
    order = rng.permutation(len(plan.lesions))
    patients, i, number = {}, 0, 0
    while i < len(order):
        size = int(rng.integers(1, 4))
        for k in order[i : i + size]:
            patients[plan.lesions[k].index] = f"IP_{number:07d}"
        i, number = i + size, number + 1
    return patients


def _frame(plan: Plan, seed: int) -> pd.DataFrame:
    """One row per image: id (without the _downsampled suffix, which only ISIC 2019 has), class, patient,
    lesion (one for every image: a lesion without an id in the stand-in gets one here), metadata, size."""
    patients = _patients(plan, seed)
    meta = {row["image"]: row for row in plan.meta_rows}
    rows = []
    for image_id, lesion, _ in plan.slots:
        m = meta[image_id]
        rows.append(
            {
                "image": image_id.removesuffix("_downsampled"),
                "slot_id": image_id,
                "label": lesion.label,
                "patient_id": patients[lesion.index],
                "lesion_id": lesion.lesion_id or f"IL_9{lesion.index:06d}",
                "age_approx": m["age_approx"],
                "sex": m["sex"],
                "site": m["anatom_site_general"],
                "width": lesion.image_size[0],
                "height": lesion.image_size[1],
            }
        )
    return pd.DataFrame(rows).sort_values("image").reset_index(drop=True)


def _clear(out: Path) -> None:
    """Empty `out` when this module wrote it; refuse a folder with anything else in it."""
    if not any(out.iterdir()):
        return
    if not (out / README).is_file() or not datasets.is_synthetic_marker((out / README).read_text()):
        raise FileExistsError(
            f"{out} is not empty and was not written by dermcompress synth; refusing to overwrite it. "
            "Choose an empty folder for the synthetic data set."
        )
    log.info("replacing the earlier synthetic set in %s", out)
    for path in out.iterdir():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def write_layout(
    source: str, out: Path, plan: Plan, *, seed: int, as_zip: bool = False, planted: Planted | None = None
) -> None:
    """Write `plan`'s images (with `planted`'s effects) and label files into `out` in `source`'s layout (module
    docstring); SYNTHETIC.txt says what was planted."""
    if source not in WRITERS:
        raise ValueError(f"no synthetic layout for source {source!r}; one of isic2019, {', '.join(WRITERS)}")
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    planted_text = f"\n{planted.describe()}" if planted is not None else ""
    (out / README).write_text(
        f"{datasets.synthetic_marker(source)}: a synthetic {source} set written by dermcompress synth; ingest "
        f"reads this file and marks every image synthetic.\n{planted_text}"
    )
    frame = _frame(plan, seed)
    writers = WRITERS[source](out, frame, as_zip)
    name_of = dict(zip(frame["slot_id"], frame["image"], strict=True))
    try:
        render_images(
            plan, seed, lambda image_id: writers[name_of[image_id]], name_of.__getitem__, planted=planted
        )
    finally:
        for writer in set(writers.values()):
            writer.close()
    log.info("wrote %d synthetic images in the %s layout to %s", len(frame), source, out)


def _write_isic2020(out: Path, frame: pd.DataFrame, as_zip: bool) -> dict[str, ImageWriter]:
    diagnosis = frame["label"].map(lambda c: DIAGNOSIS_2020.get(c, "unknown"))
    table = pd.DataFrame(
        {
            "image_name": frame["image"],
            "patient_id": frame["patient_id"],
            "lesion_id": frame["lesion_id"],
            "sex": frame["sex"],
            "age_approx": frame["age_approx"],
            "anatom_site_general_challenge": frame["site"],
            "diagnosis": diagnosis,
            "benign_malignant": np.where(frame["label"] == "MEL", "malignant", "benign"),
            "target": (frame["label"] == "MEL").astype(int),
        }
    )
    table.to_csv(out / datasets.GT_2020_V2, index=False, lineterminator="\n")
    # A few listed duplicates across patients: the split must put each pair in one split.
    rng = np.random.default_rng(len(frame))
    picks = rng.choice(len(frame), size=(min(4, len(frame) // 2), 2), replace=False)
    pairs = pd.DataFrame(
        {
            "image_name_1": frame["image"].to_numpy()[picks[:, 0]],
            "image_name_2": frame["image"].to_numpy()[picks[:, 1]],
        }
    )
    pairs.to_csv(out / datasets.DUPLICATES_2020, index=False, lineterminator="\n")
    folder, archive = datasets.IMAGES_2020
    writer = ImageWriter(out / folder, out / archive if as_zip else None, folder)
    return dict.fromkeys(frame["image"], writer)


def _write_ham10000(out: Path, frame: pd.DataFrame, as_zip: bool) -> dict[str, ImageWriter]:
    table = pd.DataFrame(
        {
            "lesion_id": frame["lesion_id"].str.replace("IL_", "HAM_", regex=False),
            "image_id": frame["image"],
            "dx": frame["label"].map(lambda c: DX_HAM.get(c, c.lower())),
            "dx_type": np.where(frame["label"] == "NV", "follow_up", "histo"),
            "age": frame["age_approx"],
            "sex": frame["sex"].fillna("unknown"),
            "localization": frame["site"].fillna("unknown"),
            "dataset": "vidir_modern",
        }
    ).sort_values(["lesion_id", "image_id"])
    table.to_csv(out / datasets.METADATA_HAM, index=False, lineterminator="\n")
    parts = [
        ImageWriter(out / part, out / f"{part}.zip" if as_zip else None, None) for part in datasets.IMAGES_HAM
    ]
    half = (len(frame) + 1) // 2
    return {image: parts[i >= half] for i, image in enumerate(frame["image"])}


def _write_isic_archive(out: Path, frame: pd.DataFrame, as_zip: bool) -> dict[str, ImageWriter]:
    if as_zip:
        raise ValueError("isic-cli writes the ISIC Archive as a folder; there is no zip form of it")
    rng = np.random.default_rng(len(frame) + 1)
    n = len(frame)
    paths = frame["label"].map(ARCHIVE_PATHS).str.split(":")
    table = pd.DataFrame(
        {
            "isic_id": frame["image"],
            "attribution": "dermcompress synth (synthetic)",
            "copyright_license": "CC-0",
            "patient_id": frame["patient_id"].where(rng.random(n) < ARCHIVE_KNOWN_PATIENT),
            "lesion_id": frame["lesion_id"].where(rng.random(n) < ARCHIVE_KNOWN_LESION),
            **{
                f"diagnosis_{k + 1}": paths.map(lambda p, k=k: p[k] if k < len(p) else None) for k in range(3)
            },
            "age_approx": frame["age_approx"],
            "sex": frame["sex"],
            "anatom_site_general": frame["site"],
            "pixels_x": frame["width"],
            "pixels_y": frame["height"],
            # What real downloads carry too: every image dermoscopic here (a test makes some clinical), a skin
            # type for some images only (drawn after the ids, which keep their draws).
            "image_type": "dermoscopic",
            "dermoscopic_type": "contact polarized",
            "fitzpatrick_skin_type": pd.Series(rng.choice(SKIN_TYPES, size=n)).where(rng.random(n) < 0.5),
            "diagnosis_confirm_type": np.where(
                frame["label"].isin(["MEL", "BCC", "SCC"]), "histopathology", "single image expert consensus"
            ),
        }
    )
    table.to_csv(out / datasets.METADATA_ARCHIVE, index=False, lineterminator="\n")
    marker = datasets.synthetic_marker("isic_archive")
    (out / "attribution.txt").write_text(f"{marker}: synthetic images, no attribution needed.\n")
    (out / "licenses").mkdir(exist_ok=True)
    (out / "licenses" / "CC-0.txt").write_text("CC0 1.0 Universal (synthetic images)\n")
    writer = ImageWriter(out)
    return dict.fromkeys(frame["image"], writer)


WRITERS = {"isic2020": _write_isic2020, "ham10000": _write_ham10000, "isic_archive": _write_isic_archive}
