"""The data sources (datasets.py): each synthetic layout ingested for real, diagnosis tables, patient and
lesion grouping as connected components, the extra-metadata join and its conflicts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from dermcompress.data import datasets
from dermcompress.data.ingest import run_ingest
from dermcompress.data.manifest import gather_ingest
from dermcompress.data.sources import DataFileError
from dermcompress.data.split import run_split
from dermcompress.data.synth import make_synthetic
from dermcompress.study.tables import run_data_summary

N, SEED = 60, 2
BIG = 89_478_485


def ingest(source: str, root: Path, out: Path, **kwargs) -> pd.DataFrame:
    paths = datasets.source_paths(source, root)
    return run_ingest(
        source=source,
        **paths,
        manifest_out=out / "manifest.parquet",
        quarantine_out=out / "quarantine.csv",
        max_pixels=BIG,
        **kwargs,
    )


@pytest.fixture(
    scope="module",
    params=[
        ("isic2020", False),
        ("isic2020", True),
        ("ham10000", False),
        ("ham10000", True),
        ("isic_archive", False),
    ],
    ids=lambda p: f"{p[0]}-{'zip' if p[1] else 'folder'}",
)
def layout(request, tmp_path_factory):
    source, as_zip = request.param
    root = make_synthetic(
        tmp_path_factory.mktemp(source) / "raw", n=N, seed=SEED, as_zip=as_zip, source=source
    )
    out = tmp_path_factory.mktemp(f"{source}-out")
    return source, root, ingest(source, root, out), out


def test_every_layout_lists_every_image_once_with_a_study_class_or_a_reason(layout):
    source, _, manifest, out = layout
    assert len(manifest) == N and manifest["image_id"].is_unique
    ok = manifest["status"] == "ok"
    assert manifest.loc[ok, "label"].isin(["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]).all()
    assert manifest.loc[ok, "sha256"].str.len().eq(64).all()
    quarantined = pd.read_csv(out / "quarantine.csv")
    assert set(quarantined["image_id"]) == set(manifest.loc[~ok, "image_id"])
    # A class the source has no name for (ISIC 2020: BCC, AK, ...; HAM10000: SCC) is unmapped, not guessed.
    expected = {"isic2020": {"MEL", "NV", "BKL"}, "ham10000": {"MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC"}}
    unmapped = manifest["reason"] == "unmapped_diagnosis"
    assert set(manifest.loc[~ok, "reason"]) <= {"unmapped_diagnosis"}
    if source in expected:
        assert set(manifest.loc[ok, "label"]) <= expected[source] and unmapped.any()
        assert manifest.loc[unmapped, "detail"].str.contains("none of the study's classes").all()


def test_patients_lesions_and_listed_duplicates_each_stay_in_one_group(layout):
    source, root, manifest, _ = layout
    for column in ("patient_id", "lesion_id", "duplicate_group"):
        if column in manifest.columns:
            known = manifest.dropna(subset=[column])
            assert (known.groupby(column)["group_id"].nunique() == 1).all(), column
    if source == "isic2020":  # every listed pair: one group, the same duplicate_group
        pairs = pd.read_csv(root / datasets.DUPLICATES_2020)
        by_id = manifest.set_index("image_id")
        for a, b in zip(pairs["image_name_1"], pairs["image_name_2"], strict=True):
            assert by_id.loc[a, "group_id"] == by_id.loc[b, "group_id"]
            assert by_id.loc[a, "duplicate_group"] == by_id.loc[b, "duplicate_group"] == min(a, b)
    if source == "ham10000":  # two image containers, members named by their part
        parts = manifest["member"].str.split("/").str[0]
        assert set(parts) == {
            p + (".zip" if Path(root / p).with_suffix(".zip").exists() else "") for p in datasets.IMAGES_HAM
        }
    if source == "isic_archive":  # patient ids for some images only: still one group per patient
        assert manifest["patient_id"].isna().any() and manifest["patient_id"].notna().any()


def test_the_split_report_counts_patients_lesions_and_groups_and_none_is_shared(layout, tmp_path):
    source, _, manifest, _ = layout
    task = manifest[manifest["status"] == "ok"].assign(label_idx=0)
    task.to_parquet(tmp_path / "task.parquet")
    report = run_split(
        task=tmp_path / "task.parquet",
        splits_out=tmp_path / "splits.parquet",
        report_out=tmp_path / "report.json",
        group_columns=["patient_id", "lesion_id"],
        test_fraction=0.2,
        val_fraction=0.1,
        seed=0,
    )
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["ids"] == report["ids"]
    for column, counts in report["ids"].items():
        assert counts["shared_across_splits"] == 0, column
        assert sum(counts["per_split"].values()) == counts["total"]
    assert ("patient_id" in report["ids"]) == (source != "ham10000")  # HAM10000 names lesions only
    assert report["ids"]["group_id"]["total"] == report["n_groups"]


def test_archive_diagnoses_map_by_their_longest_known_prefix():
    cls = datasets.archive_class
    melanoma = "Malignant:Malignant melanocytic proliferations (Melanoma)"
    assert cls(melanoma) == cls(f"{melanoma}:Melanoma in situ") == "MEL"
    assert cls("Benign:Benign melanocytic proliferations:Nevus:Nevus, Spitz") == "NV"
    assert cls("Malignant:Malignant epidermal proliferations:Squamous cell carcinoma, NOS") == "SCC"
    assert cls("Benign:Benign melanocytic proliferations:Lentigo simplex") is None  # no study class
    assert cls("Benign:Not a node of the hierarchy") is None  # not isic-metadata's: never guessed
    row = pd.Series({"diagnosis": "Nevus"})  # an older export: a terminal value, expanded by isic-metadata
    assert datasets.archive_diagnosis(row) == "Benign:Benign melanocytic proliferations:Nevus"


def test_scc_in_situ_is_ak_in_every_source_as_in_isic_2019():
    """One lesion type, one class: HAM10000's akiec (actinic keratoses and intraepithelial carcinoma / Bowen's
    disease), which ISIC 2019 labels AK, and the Archive's SCC in situ (Bowen's disease among it) are both AK;
    only invasive or unspecified SCC is SCC."""
    in_situ = "Malignant:Malignant epidermal proliferations:Squamous cell carcinoma in situ"
    assert datasets.DIAGNOSES_HAM["akiec"] == "AK"
    assert datasets.archive_class(in_situ) == "AK"
    assert datasets.archive_class(f"{in_situ}:Squamous cell carcinoma in situ, Bowens disease") == "AK"
    invasive = "Malignant:Malignant epidermal proliferations:Squamous cell carcinoma, Invasive"
    assert datasets.archive_class(f"{invasive}:Squamous cell carcinoma, Invasive, Verrucous") == "SCC"
    assert (
        datasets.archive_class("Malignant:Malignant epidermal proliferations:Squamous cell carcinoma, NOS")
        == "SCC"
    )


def test_archive_images_that_are_not_dermoscopic_are_quarantined_with_their_type(tmp_path):
    """An unfiltered isic-cli download mixes clinical close-ups and overviews, TBP tiles and RCM images into
    the dermoscopic ones: each is quarantined as excluded_image_type naming its type (an image without a type
    too), unless data.image_types accepts it."""
    root = make_synthetic(tmp_path / "raw", n=N, seed=SEED, source="isic_archive")
    meta = pd.read_csv(root / datasets.METADATA_ARCHIVE, dtype=str)
    kinds = ["clinical: close-up", "clinical: overview", "TBP tile: close-up", "RCM: tile", None]
    changed = dict(zip(meta["isic_id"][:5], kinds, strict=True))
    meta["image_type"] = meta["isic_id"].map(changed).where(meta["isic_id"].isin(changed), "dermoscopic")
    meta.to_csv(root / datasets.METADATA_ARCHIVE, index=False)
    by_id = ingest("isic_archive", root, tmp_path / "out").set_index("image_id")
    for image, kind in changed.items():
        assert (
            by_id.loc[image, "status"] == "quarantined"
            and by_id.loc[image, "reason"] == "excluded_image_type"
        )
        assert (repr(kind) if kind else "no image_type") in by_id.loc[image, "detail"]
    assert (by_id.loc[~by_id.index.isin(changed), "reason"] != "excluded_image_type").all()
    assert set(pd.read_csv(tmp_path / "out" / "quarantine.csv").query("reason == 'excluded_image_type'")[
        "image_id"]) == set(changed)  # fmt: skip
    wider = ingest(
        "isic_archive", root, tmp_path / "wider", image_types=["dermoscopic", "clinical: close-up"]
    ).set_index("image_id")
    close_up = meta["isic_id"][0]
    assert wider.loc[close_up, "reason"] != "excluded_image_type"
    assert wider.loc[close_up, "image_type"] == "clinical: close-up"


def test_the_manifest_carries_the_metadata_each_source_gives(tmp_path):
    """Skin type, image type and how the diagnosis was confirmed (the Archive's; HAM10000's dx_type), beside
    sex, age and site: what a subgroup analysis needs, in the source's words."""
    archive = make_synthetic(tmp_path / "archive", n=N, seed=SEED, source="isic_archive")
    meta = pd.read_csv(archive / datasets.METADATA_ARCHIVE, dtype=str).set_index("isic_id")
    by_id = ingest("isic_archive", archive, tmp_path / "a").set_index("image_id")
    for column in ("fitzpatrick_skin_type", "image_type", "dermoscopic_type", "diagnosis_confirm_type"):
        expected = meta[column].reindex(by_id.index)
        assert expected.notna().any(), column
        assert (by_id[column].fillna("-") == expected.fillna("-")).all(), column
    ham = make_synthetic(tmp_path / "ham", n=N, seed=SEED, source="ham10000")
    table = pd.read_csv(ham / datasets.METADATA_HAM, dtype=str).set_index("image_id")
    by_id = ingest("ham10000", ham, tmp_path / "h").set_index("image_id")
    assert (by_id["diagnosis_confirm_type"] == table["dx_type"].reindex(by_id.index)).all()
    assert (by_id["anatom_site_general"] == table["localization"].reindex(by_id.index)).all()
    assert by_id["fitzpatrick_skin_type"].isna().all()  # HAM10000 gives none


@pytest.mark.parametrize(
    ("source", "as_zip"), [("isic2019", True), ("isic2020", False), ("isic_archive", False)]
)
def test_a_synth_set_pointed_at_by_hand_is_marked_synthetic(tmp_path, source, as_zip):
    """`dermcompress synth DIR` then data.isic_root: DIR: ingest reads the set's marker file, so the manifest
    (its synthetic column and metadata) and the data summary, which the report shows, say synthetic; and the
    marker names the source it stands in for."""
    root = make_synthetic(tmp_path / "raw", n=N, seed=SEED, source=source, as_zip=as_zip)
    if source != "isic2019":
        text = (root / datasets.SYNTHETIC_README).read_text()
        assert text.startswith(datasets.synthetic_marker(source)) and "ISIC 2019" not in text
    out = tmp_path / "out"
    manifest = ingest(source, root, out, synthetic=False)
    assert manifest["synthetic"].all()
    about = pq.read_schema(out / "manifest.parquet").metadata
    assert about[b"synthetic"] == b"True" and about[b"synthetic_marker"]
    task = manifest[manifest["status"] == "ok"].assign(label_idx=0)
    task.to_parquet(tmp_path / "task.parquet")
    run_split(
        task=tmp_path / "task.parquet", splits_out=tmp_path / "splits.parquet",
        report_out=tmp_path / "report.json", group_columns=["patient_id", "lesion_id"],
        test_fraction=0.2, val_fraction=0.1, seed=0,
    )  # fmt: skip
    md, html = tmp_path / "summary.md", tmp_path / "summary.html"
    run_data_summary(
        manifest=str(out / "manifest.parquet"), split_report=tmp_path / "report.json", md=md, html=html
    )
    assert md.read_text().startswith("SYNTHETIC data") and "SYNTHETIC data" in html.read_text()


def test_the_official_files_are_not_marked_synthetic(tmp_path):
    """The marker is the synth's alone: a set whose documentation file is the publisher's is real data."""
    root = make_synthetic(tmp_path / "raw", n=N, seed=SEED)
    (root / "ISIC_2019_Training_Input" / "ATTRIBUTION.txt").write_text(
        "ISIC 2019 Challenge: attribution ...\n"
    )
    assert not ingest("isic2019", root, tmp_path / "out", synthetic=False)["synthetic"].any()


def test_an_isic2020_folder_read_as_isic2019_suggests_the_source(tmp_path):
    """The walkthrough's case: the default source, a folder holding only ISIC 2020's zip."""
    (tmp_path / "ISIC_2020_Training_JPEG.zip").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"ISIC_2019_Training_Input.*is it data\.source: isic2020\?"):
        datasets.source_paths("isic2019", tmp_path)


def test_isic2020_target_that_contradicts_the_diagnosis_is_invalid(tmp_path):
    root = make_synthetic(tmp_path / "raw", n=N, seed=SEED, source="isic2020")
    gt = pd.read_csv(root / datasets.GT_2020_V2)
    nevus = gt.index[gt["diagnosis"] == "nevus"][0]
    gt.loc[nevus, "target"] = 1
    gt.to_csv(root / datasets.GT_2020_V2, index=False)
    manifest = ingest("isic2020", root, tmp_path).set_index("image_id")
    row = manifest.loc[gt.loc[nevus, "image_name"]]
    assert (row["reason"], row["detail"]) == ("invalid_label", "diagnosis 'nevus' but target '1'")


def test_extra_metadata_joins_patients_and_quarantines_what_contradicts(tmp_path):
    """ISIC 2019 names no patients: an extra CSV (isic-cli's metadata.csv keyed by isic_id) gives two lesions
    one patient, so their images become one group; an image given another lesion than its own, and every image
    of a lesion given two patients, are quarantined as metadata_conflict."""
    root = make_synthetic(tmp_path / "raw", n=N, seed=SEED)
    meta = pd.read_csv(root / "ISIC_2019_Training_Metadata.csv")
    lesions = meta.dropna(subset=["lesion_id"]).groupby("lesion_id")["image"].apply(list)
    multi = [lesion for lesion, images in lesions.items() if len(images) > 1]
    a, b, torn = multi[0], multi[1], multi[2]
    rows = [{"isic_id": i, "patient_id": "IP_SHARED"} for i in lesions[a] + lesions[b]]
    rows += [
        {"isic_id": lesions[torn][0], "patient_id": "IP_ONE"},
        {"isic_id": lesions[torn][1], "patient_id": "IP_TWO"},
    ]
    moved = meta.dropna(subset=["lesion_id"]).iloc[-1]
    rows.append({"isic_id": moved["image"], "lesion_id": "IL_SOMEWHERE_ELSE"})
    rows.append(
        {"isic_id": "ISIC_9999999", "patient_id": "IP_NOT_IN_THE_SOURCE"}
    )  # ignored: not an image here
    pd.DataFrame(rows).to_csv(tmp_path / "extra.csv", index=False)

    manifest = ingest("isic2019", root, tmp_path / "out", extra_metadata=tmp_path / "extra.csv")
    by_id = manifest.set_index("image_id")
    assert len(manifest) == N and "ISIC_9999999" not in by_id.index
    assert set(by_id.loc[lesions[a] + lesions[b], "group_id"]) == {"IP_SHARED"}
    conflict = by_id[by_id["reason"] == "metadata_conflict"]
    assert set(lesions[torn]) <= set(conflict.index)
    assert conflict.loc[lesions[torn][0], "detail"] == f"lesion {torn!r} is given patients IP_ONE, IP_TWO"
    assert (
        "lesion_id" in conflict.loc[moved["image"], "detail"]
        and "extra.csv" in conflict.loc[moved["image"], "detail"]
    )


def test_a_missing_source_file_and_a_bad_extra_csv_are_named(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"data.source 'isic2020'.*train, ISIC_2020_Training_JPEG.zip"
    ):
        datasets.source_paths("isic2020", tmp_path)
    with pytest.raises(ValueError, match=r"data\.source 'other'"):
        datasets.source_paths("other", tmp_path)
    (tmp_path / "extra.csv").write_text("name,patient_id\nISIC_1,IP_1\n")
    with pytest.raises(DataFileError, match=r"extra.csv: no image id column"):
        datasets.join_extra(pd.DataFrame({"image": ["ISIC_1"]}), tmp_path / "extra.csv")


@pytest.mark.parametrize(
    ("source", "present", "named"),
    [
        (
            "isic2019",
            ["ISIC_2019_Training_Input/"],
            "lacks ISIC_2019_Training_GroundTruth.csv, ISIC_2019_Training_Metadata.csv",
        ),
        # ISIC 2020 reads the v2 ground truth first: that is the name to download.
        (
            "isic2020",
            ["ISIC_2020_Training_JPEG.zip"],
            "(looked for ISIC_2020_Training_GroundTruth_v2.csv, ISIC_2020_Training_GroundTruth.csv)",
        ),
        (
            "ham10000",
            ["HAM10000_images_part_1/", "HAM10000_images_part_2.zip"],
            "lacks HAM10000_metadata.csv",
        ),
        ("isic_archive", ["ISIC_0000001.jpg"], "lacks metadata.csv"),
        # The default source, pointed at another's folder: the error says which source it seems to hold.
        (
            "isic2019",
            ["ISIC_2020_Training_JPEG.zip"],
            "it holds ISIC_2020_Training_JPEG.zip: is it data.source: isic2020?",
        ),
        (
            "isic2020",
            ["HAM10000_metadata.csv"],
            "it holds HAM10000_metadata.csv: is it data.source: ham10000?",
        ),
    ],
)
def test_a_missing_official_file_is_an_error_naming_it(tmp_path, source, present, named):
    """Not an input Snakemake would drop with the ingest job that reads it (the old manifest kept)."""
    for name in present:
        (tmp_path / name).mkdir() if name.endswith("/") else (tmp_path / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError) as error:
        datasets.source_paths(source, tmp_path)
    assert named in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("parts", [2, 3])
def test_ingest_in_parts_then_gathered_writes_the_one_job_files(tmp_path, parts):
    """Every id checked by exactly one part (a hash of the id), and the gathered manifest and quarantine.csv
    byte-identical to one job's, groups spanning parts included (ISIC 2020: patients, duplicates)."""
    root = make_synthetic(tmp_path / "raw", n=N, seed=SEED, source="isic2020")
    whole = ingest("isic2020", root, tmp_path / "one")
    paths = datasets.source_paths("isic2020", root)
    part_files = []
    for part in range(parts):
        out = tmp_path / f"part{part}.parquet"
        rows = run_ingest(
            source="isic2020",
            **paths,
            manifest_out=out,
            quarantine_out=None,
            max_pixels=BIG,
            part=part,
            parts=parts,
        )
        assert rows["group_id"].isna().all()  # groups need every part: the gather computes them
        part_files.append(out)
    ids = [set(pd.read_parquet(f)["image_id"]) for f in part_files]
    assert sum(map(len, ids)) == len(set().union(*ids)) == len(whole)
    gathered = gather_ingest(
        part_files, manifest_out=tmp_path / "m.parquet", quarantine_out=tmp_path / "q.csv"
    )
    pd.testing.assert_frame_equal(gathered, whole)
    assert (tmp_path / "m.parquet").read_bytes() == (tmp_path / "one/manifest.parquet").read_bytes()
    assert (tmp_path / "q.csv").read_bytes() == (tmp_path / "one/quarantine.csv").read_bytes()


def _planned_subgroups(edges: list[int]) -> pd.DataFrame:
    """What the synthetic plan gives each image (its id as every layout writes it): sex, age band, site."""
    from dermcompress.data.synth_plan import plan_images
    from dermcompress.study.subgroups import UNKNOWN, bin_ages

    meta = pd.DataFrame(plan_images(N, SEED).meta_rows)
    meta["image_id"] = meta["image"].str.removesuffix("_downsampled")
    return pd.DataFrame(
        {
            "sex": meta["sex"].fillna(UNKNOWN).to_numpy(),
            "age_band": bin_ages(meta["age_approx"], edges).to_numpy(),
            "site": meta["anatom_site_general"].fillna(UNKNOWN).to_numpy(),
        },
        index=meta["image_id"],
    )


def _assert_subgroups_are_the_plans(manifest: pd.DataFrame) -> None:
    from dermcompress.study.subgroups import assign_subgroups

    edges = [40, 60]
    got = assign_subgroups(manifest, edges)
    want = _planned_subgroups(edges)
    ids = manifest["image_id"].str.removesuffix("_downsampled")
    assert set(ids) == set(want.index)
    got.index = got.index.str.removesuffix("_downsampled")
    got = got.loc[want.index]
    assert got[list(want.columns)].to_dict("index") == want.to_dict("index")
    # The Archive's own field (its layout draws it, not the plan): as the manifest gives it.
    if "skin_type" in got:
        from dermcompress.study.subgroups import UNKNOWN

        skin = manifest.set_index(ids)["fitzpatrick_skin_type"].fillna(UNKNOWN)
        assert (got["skin_type"] == skin.loc[want.index]).all() and (got["skin_type"] != UNKNOWN).any()
    assert (got["sex"] == "female").any() and (got["site"] != "unknown").any()


def test_each_layouts_metadata_reaches_the_subgroup_analysis(layout):
    """Sex, age and site, each spelt as the source spells them (HAM10000's 'unknown', the Archive's blanks),
    arrive in the manifest and give every image the subgroups its synthetic plan drew."""
    _assert_subgroups_are_the_plans(layout[2])


def test_isic2019_metadata_reaches_the_subgroup_analysis(tmp_path):
    root = make_synthetic(tmp_path / "raw", n=N, seed=SEED)
    _assert_subgroups_are_the_plans(ingest("isic2019", root, tmp_path))
