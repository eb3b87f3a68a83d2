"""The data sources a study can start from, each read into one shape: labels, metadata, duplicate pairs.

`data.source` names the layout of the files under `data.isic_root`:

- `isic2019` (default): `ISIC_2019_Training_GroundTruth.csv` (one-hot), `ISIC_2019_Training_Metadata.csv`
  (`lesion_id`, no patients), images in `ISIC_2019_Training_Input/` or its zip;
- `isic2020`: `ISIC_2020_Training_GroundTruth_v2.csv` (with `lesion_id`) or `ISIC_2020_Training_GroundTruth.csv`
  (`image_name, patient_id, …, diagnosis, benign_malignant, target`), images in `train/` or
  `ISIC_2020_Training_JPEG.zip`, and `ISIC_2020_Training_Duplicates.csv` when present;
- `ham10000`: `HAM10000_metadata.csv` (`lesion_id, image_id, dx, …`), images in `HAM10000_images_part_1/` and
  `_part_2/` (folders or zips);
- `isic_archive`: a folder written by `isic image download` (isic-cli): `ISIC_*.jpg` and `metadata.csv`
  (`isic_id`, then the query's columns: `patient_id`, `lesion_id`, `diagnosis_1`…`_5`, …).

Every reader returns the ISIC 2019 shape ingest checks: a one-hot ground truth over the study's class names (a
diagnosis is mapped through the source's table below; one the table does not cover is listed in `problems`,
which ingest quarantines as `unmapped_diagnosis`), the metadata fields ingest keeps, and the duplicate pairs
that the split keeps together. `data.extra_metadata` (join_extra) adds columns such as `patient_id` keyed by
image id to any source.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dermcompress import ISIC_CLASSES
from dermcompress.data.sources import (
    DOC_FILES,
    GROUND_TRUTH,
    IMAGES_DIR,
    IMAGES_ZIP,
    DataFileError,
    official_paths,
)

log = logging.getLogger(__name__)

SOURCES = ("isic2019", "isic2020", "ham10000", "isic_archive")
LABEL_COLUMNS = (*ISIC_CLASSES, "UNK")
# What the manifest keeps of each image's metadata, in the sources' own words: ids, the subgroup fields (ISIC
# 2020's anatom_site_general_challenge and HAM10000's localization are anatom_site_general, HAM10000's age is
# age_approx), and what only some sources give: the Archive's fitzpatrick_skin_type, image_type and
# dermoscopic_type, how the diagnosis was confirmed (the Archive's diagnosis_confirm_type, HAM10000's dx_type:
# histo, follow_up, consensus, confocal). A field a source lacks is null.
METADATA_FIELDS = (
    "lesion_id",
    "patient_id",
    "age_approx",
    "anatom_site_general",
    "sex",
    "fitzpatrick_skin_type",
    "image_type",
    "dermoscopic_type",
    "diagnosis_confirm_type",
)
ID_FIELDS = ("lesion_id", "patient_id")
# isic-metadata's ImageTypeEnum; a study of dermoscopy accepts only `dermoscopic` (config data.image_types).
IMAGE_TYPES = (
    "dermoscopic",
    "clinical: overview",
    "clinical: close-up",
    "TBP tile: close-up",
    "TBP tile: overview",
    "RCM: macroscopic",
    "RCM: tile",
    "RCM: mosaic",
)
DEFAULT_IMAGE_TYPES = ("dermoscopic",)

# ISIC 2020's `diagnosis` -> the study's classes. ISIC 2019's BKL is "solar lentigo / seborrheic keratosis /
# lichen planus-like keratosis"; "lentigo NOS" may be a melanocytic lentigo simplex, so it stays unmapped, as do
# "unknown" (most of the set: benign, never diagnosed further), "atypical melanocytic proliferation" and
# "cafe-au-lait macule".
DIAGNOSES_2020 = {
    "melanoma": "MEL",
    "nevus": "NV",
    "seborrheic keratosis": "BKL",
    "lichenoid keratosis": "BKL",
    "solar lentigo": "BKL",
}
# HAM10000's `dx` (Tschandl et al. 2018) -> the study's classes: ISIC 2019 took HAM10000 in whole, these names.
DIAGNOSES_HAM = {
    "mel": "MEL",
    "nv": "NV",
    "bcc": "BCC",
    "akiec": "AK",
    "bkl": "BKL",
    "df": "DF",
    "vasc": "VASC",
}
# The ISIC Archive's hierarchical diagnosis (diagnosis_1:…:diagnosis_5, isic-metadata's DiagnosisEnum) -> the
# study's classes: the longest prefix here that a diagnosis starts with wins (a melanoma in situ is MEL).
# SCC in situ (Bowen's disease) is AK, as in ISIC 2019's own ground truth: its AK images from HAM10000 are that
# set's `akiec`, "actinic keratoses and intraepithelial carcinoma / Bowen's disease" (Tschandl et al. 2018),
# the ISIC 2018 class "Actinic keratosis / Bowen's disease (intraepithelial carcinoma)"; SCC is invasive (or
# unspecified) SCC. One lesion type, one class, whatever the source (README, "Other data sources").
DIAGNOSES_ARCHIVE = {
    "Malignant:Malignant melanocytic proliferations (Melanoma)": "MEL",
    "Benign:Benign melanocytic proliferations:Nevus": "NV",
    "Malignant:Malignant adnexal epithelial proliferations - Follicular:Basal cell carcinoma": "BCC",
    "Indeterminate:Indeterminate epidermal proliferations:Solar or actinic keratosis": "AK",
    "Benign:Benign epidermal proliferations:Seborrheic keratosis": "BKL",
    "Benign:Benign epidermal proliferations:Solar lentigo": "BKL",
    "Benign:Benign epidermal proliferations:Lichen planus like keratosis": "BKL",
    "Benign:Benign soft tissue proliferations - Fibro-histiocytic:Dermatofibroma": "DF",
    "Benign:Benign soft tissue proliferations - Vascular": "VASC",
    "Malignant:Malignant epidermal proliferations:Squamous cell carcinoma in situ": "AK",
    "Malignant:Malignant epidermal proliferations:Squamous cell carcinoma, Invasive": "SCC",
    "Malignant:Malignant epidermal proliferations:Squamous cell carcinoma, NOS": "SCC",
}

GT_2020 = "ISIC_2020_Training_GroundTruth.csv"
GT_2020_V2 = "ISIC_2020_Training_GroundTruth_v2.csv"
DUPLICATES_2020 = "ISIC_2020_Training_Duplicates.csv"
IMAGES_2020 = ("train", "ISIC_2020_Training_JPEG.zip")
METADATA_HAM = "HAM10000_metadata.csv"
IMAGES_HAM = ("HAM10000_images_part_1", "HAM10000_images_part_2")
METADATA_ARCHIVE = "metadata.csv"


# What each source is called in words (markers, banners, errors).
SOURCE_NAMES = {
    "isic2019": "ISIC 2019",
    "isic2020": "ISIC 2020",
    "ham10000": "HAM10000",
    "isic_archive": "ISIC Archive",
}
# The file `dermcompress synth` writes in every layout but ISIC 2019's, whose image folder's ATTRIBUTION.txt
# carries the marker instead (the official zip's own documentation file).
SYNTHETIC_README = "SYNTHETIC.txt"


def synthetic_marker(source: str) -> str:
    """The first words of every file `dermcompress synth` writes to say a set is synthetic, naming its source."""
    return f"SYNTHETIC {SOURCE_NAMES[source].upper()} STAND-IN"


def is_synthetic_marker(text: str) -> bool:
    """Whether a file's text starts with a synthetic marker (of any source, older sets' included)."""
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    return first.startswith("SYNTHETIC ") and "STAND-IN" in first


def find_synthetic_marker(root: str | Path) -> str | None:
    """Where `root` (a data.isic_root) says it was written by `dermcompress synth`: SYNTHETIC.txt, or the ISIC
    2019 image folder's (or zip's) ATTRIBUTION.txt, starting with a synthetic marker; None when nothing does
    (the official files, or a folder that does not exist)."""
    root = Path(root)
    for path in (root / SYNTHETIC_README, root / IMAGES_DIR / DOC_FILES[0]):
        try:
            if path.is_file() and is_synthetic_marker(path.read_text(errors="replace")[:200]):
                return str(path)
        except OSError:
            continue
    try:
        with zipfile.ZipFile(root / IMAGES_ZIP) as archive:
            text = archive.read(f"{IMAGES_DIR}/{DOC_FILES[0]}")[:200].decode(errors="replace")
        if is_synthetic_marker(text):
            return f"{root / IMAGES_ZIP}:{IMAGES_DIR}/{DOC_FILES[0]}"
    except (OSError, KeyError, zipfile.BadZipFile):
        pass
    return None


@dataclass
class SourceTables:
    """What ingest checks, whatever the source: `gt` (image + LABEL_COLUMNS as text, one row per label row),
    `meta` (image + the METADATA_FIELDS it has), `problems` (image -> (reason, detail) found in the label file
    itself: `unmapped_diagnosis`, or `invalid_label` where the source contradicts itself), and duplicate
    `pairs` of image ids."""

    gt: pd.DataFrame
    meta: pd.DataFrame
    problems: dict[str, tuple[str, str]] = field(default_factory=dict)
    pairs: list[tuple[str, str]] = field(default_factory=list)


def read_csv(path: str | Path, **kwargs) -> pd.DataFrame:
    """pd.read_csv, with every way the file can be unreadable said in one line that names it."""
    try:
        return pd.read_csv(path, skipinitialspace=True, **kwargs)
    except pd.errors.EmptyDataError:
        raise DataFileError(path, "the file is empty (no header row)") from None
    except UnicodeDecodeError as err:
        raise DataFileError(
            path,
            f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); save it as UTF-8",
        ) from None
    except pd.errors.ParserError as err:
        raise DataFileError(path, f"not a well-formed CSV: {str(err).strip()}") from None


def drop_blank_ids(frame: pd.DataFrame, path: str | Path, column: str = "image") -> pd.DataFrame:
    """Strip ids; rows without one cannot be matched to anything, so they are logged and left out."""
    frame[column] = frame[column].astype("string").str.strip()
    blank = frame[column].isna() | (frame[column] == "")
    if blank.any():
        log.warning(
            "%s: %d row(s) with an empty image id ignored (data rows %s)",
            path,
            blank.sum(),
            ", ".join(str(i + 1) for i in frame.index[blank][:20]),
        )
    return frame[~blank].reset_index(drop=True).astype({column: str})


def _require(frame: pd.DataFrame, columns: list[str], path: str | Path, what: str) -> None:
    if missing := [c for c in columns if c not in frame.columns]:
        raise DataFileError(path, f"{what} lacks column(s) {missing} (columns: {list(frame.columns)})")


def _first_existing(root: Path, names: tuple[str, ...], what: str, source: str) -> Path:
    for name in names:
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(
        f"data.isic_root={str(root)!r} holds no {what} of data.source {source!r} (looked for {', '.join(names)})"
    )


# Files that say which source a folder holds: named when data.source reads another layout.
MARKERS = {
    "isic2019": (GROUND_TRUTH, IMAGES_DIR, IMAGES_ZIP),
    "isic2020": (GT_2020_V2, GT_2020, IMAGES_2020[1]),
    "ham10000": (METADATA_HAM, *IMAGES_HAM, *(f"{p}.zip" for p in IMAGES_HAM)),
    "isic_archive": (METADATA_ARCHIVE,),
}


def source_paths(source: str, root: str | Path, *, synthetic: bool = False) -> dict[str, str | list[str]]:
    """The files of `source` under `root`, as the ingest rule's inputs: `labels`, `metadata` (isic2019 only),
    `duplicates` (isic2020, when present) and `images` (one folder or zip, or a list: HAM10000's two parts).
    `synthetic`: the files `dermcompress synth --source` writes, named before they exist (folders, ISIC 2020's
    v2 ground truth and duplicates list); for the ISIC Archive only the folder, which holds metadata.csv.

    Otherwise every file must exist: a missing one is a FileNotFoundError that names it (and the source the
    folder seems to hold, if another), never an input Snakemake would quietly drop with the job that reads it.
    """
    try:
        paths = _source_paths(source, root, synthetic=synthetic)
        missing = [] if synthetic else [p for p in _flat(paths.values()) if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(
                f"data.isic_root={str(root)!r} lacks {', '.join(Path(p).name for p in missing)}, which "
                f"data.source {source!r} reads"
            )
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{str(err).rstrip('.')}{other_source_hint(source, root)}") from None
    return paths


def other_source_hint(source: str, root: str | Path) -> str:
    """`; it holds <file>: is it data.source: <other>?` when `root` holds a marker file of another source."""
    for other, names in MARKERS.items():
        found = [n for n in names if other != source and (Path(root) / n).exists()]
        if found:
            return f"; it holds {found[0]}: is it data.source: {other}?"
    return ""


def _flat(values) -> list[str]:
    return [p for v in values for p in ([v] if isinstance(v, str) else v)]


def _source_paths(source: str, root: str | Path, *, synthetic: bool = False) -> dict[str, str | list[str]]:
    root = Path(root)
    if source == "isic2019":
        paths = official_paths(root, prefer="folder" if synthetic else None)
        return {"labels": paths["ground_truth"], "metadata": paths["metadata"], "images": paths["images"]}
    if source == "isic2020":
        if synthetic:
            names = {"labels": GT_2020_V2, "duplicates": DUPLICATES_2020, "images": IMAGES_2020[0]}
            return {key: str(root / name) for key, name in names.items()}
        images = _first_existing(root, IMAGES_2020, "images", source)
        gt = _first_existing(root, (GT_2020_V2, GT_2020), "ground truth", source)
        out = {"labels": str(gt), "images": str(images)}
        if (root / DUPLICATES_2020).is_file():
            out["duplicates"] = str(root / DUPLICATES_2020)
        return out
    if source == "ham10000":
        if synthetic:
            return {"labels": str(root / METADATA_HAM), "images": [str(root / p) for p in IMAGES_HAM]}
        parts = [str(_first_existing(root, (p, f"{p}.zip"), p, source)) for p in IMAGES_HAM]
        return {"labels": str(root / METADATA_HAM), "images": parts}
    if source == "isic_archive":
        # The folder holds metadata.csv, so a synthetic one (a directory output) cannot also name it apart.
        return (
            {"images": str(root)}
            if synthetic
            else {"labels": str(root / METADATA_ARCHIVE), "images": str(root)}
        )
    raise ValueError(f"data.source {source!r} is not one of {', '.join(SOURCES)}")


def default_labels(source: str, images: str | Path | list) -> str | None:
    """The label file of a source whose folder holds it (the ISIC Archive's metadata.csv), else None."""
    if source == "isic_archive" and isinstance(images, str | Path):
        return str(Path(images) / METADATA_ARCHIVE)
    return None


def _one_hot(images: pd.Series, labels: pd.Series) -> pd.DataFrame:
    """A one-hot ground truth in the ISIC 2019 format (text cells, as the CSV reads) from class names."""
    gt = pd.DataFrame({"image": images.to_numpy()})
    for c in LABEL_COLUMNS:
        gt[c] = (labels.to_numpy() == c).astype(float).astype(str)
    return gt


def _metadata(frame: pd.DataFrame, renames: dict[str, str]) -> pd.DataFrame:
    """`image` and the METADATA_FIELDS a source's table has (after `renames`), as ingest keeps them."""
    meta = frame.rename(columns=renames)
    keep = ["image", *(f for f in METADATA_FIELDS if f in meta.columns)]
    meta = meta[keep].copy()
    for column in (f for f in keep if f != "image" and f != "age_approx"):
        meta[column] = meta[column].astype("string").str.strip().replace("", pd.NA).astype(object)
        meta[column] = meta[column].where(meta[column].notna(), None)
    if "age_approx" in meta.columns:
        meta["age_approx"] = pd.to_numeric(meta["age_approx"], errors="coerce")
    return meta


def _mapped(
    images: pd.Series, diagnoses: pd.Series, table: dict[str, str], what: str
) -> tuple[pd.Series, dict]:
    """Class per row through `table`, and image -> the unmapped_diagnosis problem of each diagnosis it lacks."""
    labels = diagnoses.map(lambda d: table.get(str(d).strip()) if pd.notna(d) else None)
    return labels, _unmapped(images, diagnoses, labels, what)


def _unmapped(images: pd.Series, diagnoses: pd.Series, labels: pd.Series, what: str) -> dict:
    return {
        image: ("unmapped_diagnosis", f"{what} {_shown(d)} is none of the study's classes (datasets.py)")
        for image, d, label in zip(images, diagnoses, labels, strict=True)
        if label is None or pd.isna(label)
    }


def _shown(value) -> str:
    return "(blank)" if value is None or (not isinstance(value, str) and pd.isna(value)) else repr(str(value))


def read_isic2019(paths: dict) -> SourceTables:
    gt = read_csv(paths["labels"], dtype=str)
    _require(gt, ["image", *ISIC_CLASSES], paths["labels"], "ground-truth CSV")
    meta = read_csv(
        paths["metadata"], dtype={c: str for c in ("image", *ID_FIELDS, "anatom_site_general", "sex")}
    )
    _require(meta, ["image"], paths["metadata"], "metadata CSV")
    meta = drop_blank_ids(meta, paths["metadata"])
    if "age_approx" in meta.columns:
        meta["age_approx"] = pd.to_numeric(meta["age_approx"], errors="coerce")
    return SourceTables(drop_blank_ids(gt, paths["labels"]), meta)


def read_isic2020(paths: dict) -> SourceTables:
    table = read_csv(paths["labels"], dtype=str)
    _require(
        table, ["image_name", "patient_id", "diagnosis", "target"], paths["labels"], "ISIC 2020 ground truth"
    )
    table = drop_blank_ids(table.rename(columns={"image_name": "image"}), paths["labels"])
    labels, problems = _mapped(table["image"], table["diagnosis"], DIAGNOSES_2020, "diagnosis")
    # `target` is the challenge's label (1: melanoma); a row where it contradicts the diagnosis is not guessed at.
    target = pd.to_numeric(table["target"], errors="coerce")
    contradicts = labels.notna() & ((labels == "MEL") != (target == 1))
    for image, diagnosis, value in table.loc[contradicts, ["image", "diagnosis", "target"]].itertuples(
        index=False
    ):
        problems[image] = ("invalid_label", f"diagnosis {diagnosis!r} but target {_shown(value)}")
    gt = _one_hot(table["image"], labels)
    meta = _metadata(table, {"anatom_site_general_challenge": "anatom_site_general"})
    pairs = []
    if "duplicates" in paths:
        dup = read_csv(paths["duplicates"], dtype=str)
        _require(dup, ["image_name_1", "image_name_2"], paths["duplicates"], "ISIC 2020 duplicates list")
        pairs = [
            (str(a).strip(), str(b).strip())
            for a, b in zip(dup["image_name_1"], dup["image_name_2"], strict=True)
        ]
    return SourceTables(gt, meta, problems, pairs)


def read_ham10000(paths: dict) -> SourceTables:
    table = read_csv(paths["labels"], dtype=str)
    _require(table, ["lesion_id", "image_id", "dx"], paths["labels"], "HAM10000 metadata")
    table = drop_blank_ids(table.rename(columns={"image_id": "image"}), paths["labels"])
    labels, problems = _mapped(table["image"], table["dx"], DIAGNOSES_HAM, "dx")
    renames = {
        "age": "age_approx",
        "localization": "anatom_site_general",
        "dx_type": "diagnosis_confirm_type",
    }
    return SourceTables(_one_hot(table["image"], labels), _metadata(table, renames), problems)


def archive_diagnosis(row: pd.Series) -> str | None:
    """The hierarchical diagnosis of one isic-cli metadata row: diagnosis_1:…:diagnosis_5 as far as given,
    else an older export's single `diagnosis` (a terminal value, expanded by isic-metadata)."""
    levels = [str(row[f"diagnosis_{k}"]).strip() for k in range(1, 6) if pd.notna(row.get(f"diagnosis_{k}"))]
    if levels:
        return ":".join(levels)
    if pd.notna(row.get("diagnosis")):
        from isic_metadata.diagnosis_hierarchical import DiagnosisEnum

        return DiagnosisEnum.accept_terminal_values(str(row["diagnosis"]).strip())
    return None


def archive_class(diagnosis: str | None) -> str | None:
    """The study's class of an Archive diagnosis: its longest prefix in DIAGNOSES_ARCHIVE (None: none, or not
    a diagnosis of isic-metadata's hierarchy)."""
    from isic_metadata.diagnosis_hierarchical import DiagnosisEnum

    if diagnosis is None or diagnosis not in {d.value for d in DiagnosisEnum}:
        return None
    prefixes = [p for p in DIAGNOSES_ARCHIVE if diagnosis == p or diagnosis.startswith(f"{p}:")]
    return DIAGNOSES_ARCHIVE[max(prefixes, key=len)] if prefixes else None


def read_isic_archive(paths: dict) -> SourceTables:
    table = read_csv(paths["labels"], dtype=str)
    _require(table, ["isic_id"], paths["labels"], "isic-cli metadata.csv")
    table = drop_blank_ids(table.rename(columns={"isic_id": "image"}), paths["labels"])
    diagnoses = table.apply(archive_diagnosis, axis=1) if len(table) else pd.Series([], dtype=object)
    labels = diagnoses.map(archive_class)
    problems = _unmapped(table["image"], diagnoses, labels, "diagnosis")
    return SourceTables(_one_hot(table["image"], labels), _metadata(table, {}), problems)


def image_type_problems(
    meta: pd.DataFrame, accepted: tuple[str, ...] | list[str], *, required: bool
) -> dict[str, tuple[str, str]]:
    """image -> an `excluded_image_type` problem for every image whose metadata names an image_type
    (isic-metadata's: `clinical: close-up`, `TBP tile: overview`, `RCM: tile`, ...) outside `accepted`
    (data.image_types); with `required` (the ISIC Archive, which mixes types) a blank one too. The challenge
    sets are dermoscopic by construction: their images are excluded only where extra metadata names another type."""
    if "image_type" not in meta.columns:
        return {}
    shown = ", ".join(accepted)
    problems = {}
    for image, kind in meta[["image", "image_type"]].itertuples(index=False):
        if kind is None or (not isinstance(kind, str) and pd.isna(kind)):
            if required:
                problems[image] = ("excluded_image_type", f"no image_type in the metadata; accepted: {shown}")
        elif kind not in accepted:
            problems[image] = (
                "excluded_image_type",
                f"image_type {kind!r} is not in data.image_types ({shown})",
            )
    return problems


def join_extra(meta: pd.DataFrame, path: str | Path) -> tuple[pd.DataFrame, dict[str, tuple[str, str]]]:
    """`meta` with the METADATA_FIELDS of an extra CSV keyed by image id (`image`, `isic_id`, `image_id` or
    `image_name`; e.g. an isic-cli metadata.csv) filled in where the source has none, for the source's images
    only; and image -> a `metadata_conflict` where both give a different value (never silently resolved)."""
    extra = read_csv(path, dtype=str)
    key = next((c for c in ("image", "isic_id", "image_id", "image_name") if c in extra.columns), None)
    if key is None:
        raise DataFileError(
            path, f"no image id column (image, isic_id, image_id or image_name) in {list(extra.columns)}"
        )
    extra = _metadata(drop_blank_ids(extra.rename(columns={key: "image"}), path), {})
    if extra["image"].duplicated().any():
        raise DataFileError(
            path, f"lists image(s) twice, e.g. {extra.loc[extra['image'].duplicated(), 'image'].iloc[0]}"
        )
    joined = meta.merge(extra, on="image", how="left", suffixes=("", "__extra"), indicator=True)
    log.info(
        "%s: %d of its %d rows match an image of the source",
        path,
        int((joined["_merge"] == "both").sum()),
        len(extra),
    )
    conflicts: dict[str, tuple[str, str]] = {}
    for column in (c for c in METADATA_FIELDS if f"{c}__extra" in joined.columns):  # in both: compare, fill
        ours, theirs = joined[column], joined[f"{column}__extra"]
        differ = ours.notna() & theirs.notna() & (ours.astype(str) != theirs.astype(str))
        for image, a, b in joined.loc[differ, ["image", column, f"{column}__extra"]].itertuples(index=False):
            conflicts.setdefault(
                image, ("metadata_conflict", f"{column} {a!r} in the source, {b!r} in {path}")
            )
        joined[column] = ours.where(ours.notna(), theirs)
    joined = joined.drop(columns=[c for c in joined.columns if c.endswith("__extra")] + ["_merge"])
    return joined, conflicts


def lesion_conflicts(meta: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """image -> a `metadata_conflict` for every image of a lesion that is given two or more patients."""
    if not {"lesion_id", "patient_id"} <= set(meta.columns):
        return {}
    known = meta.dropna(subset=["lesion_id", "patient_id"])
    patients = known.groupby("lesion_id")["patient_id"].unique()
    torn = patients[patients.map(len) > 1]
    return {
        image: (
            "metadata_conflict",
            f"lesion {lesion!r} is given patients {', '.join(sorted(map(str, torn[lesion])))}",
        )
        for image, lesion in meta.loc[meta["lesion_id"].isin(torn.index), ["image", "lesion_id"]].itertuples(
            index=False
        )
    }


READERS = {
    "isic2019": read_isic2019,
    "isic2020": read_isic2020,
    "ham10000": read_ham10000,
    "isic_archive": read_isic_archive,
}


def read_source(source: str, paths: dict) -> SourceTables:
    """The labels, metadata and duplicate pairs of `source` (its source_paths)."""
    if source not in READERS:
        raise ValueError(f"data.source {source!r} is not one of {', '.join(SOURCES)}")
    return READERS[source](paths)
