"""The grouped, stratified split: properties on random group structures, and worked examples."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dermcompress.data import split as split_module
from dermcompress.data.split import COLUMNS, grouped_split, run_split, split_report

GROUPS = ["patient_id", "lesion_id"]
FAST = settings(max_examples=30, deadline=None)


@st.composite
def tasks(draw, min_groups: int = 8, max_groups: int = 40, max_size: int = 5) -> pd.DataFrame:
    """A task table: lesions of 1..max_size images (some without lesion_id), maybe patients over lesions."""
    seed = draw(st.integers(0, 2**32 - 1))
    n_groups = draw(st.integers(min_groups, max_groups))
    p_mel = draw(st.floats(0.2, 0.8))
    p_missing = draw(st.sampled_from([0.0, 0.1, 0.5]))
    with_patients = draw(st.booleans())
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_size + 1, size=n_groups)
    n = int(sizes.sum())
    lesion = np.repeat(np.arange(n_groups), sizes)
    label = np.where(rng.random(n_groups) < p_mel, "MEL", "NV")[lesion]
    lesion_id = np.array([f"IL_{g:05d}" for g in lesion], dtype=object)
    lesion_id[rng.random(n) < p_missing] = rng.choice([None, "", " "])
    frame = pd.DataFrame(
        {
            # ids unrelated to the group structure, so sorting by id interleaves groups
            "image_id": [f"ISIC_{i:07d}" for i in rng.choice(10**6, size=n, replace=False)],
            "status": "ok",
            "label": label,
            "lesion_id": lesion_id,
        }
    )
    if with_patients:
        # patients hold a few lesions each, and a patient may have both MEL and NV images
        n_patients = max(min_groups, n_groups // 2)
        patient_of_lesion = rng.integers(0, n_patients, size=n_groups)
        frame["patient_id"] = [f"IP_{p:05d}" for p in patient_of_lesion[lesion]]
    frame["label_idx"] = (frame["label"] == "NV").astype("int64")
    return frame


def _split(task: pd.DataFrame, seed: int = 0, test: float = 0.2, val: float = 0.1) -> pd.DataFrame:
    return grouped_split(task, group_columns=GROUPS, test_fraction=test, val_fraction=val, seed=seed)


def _expected_groups(task: pd.DataFrame) -> pd.Series:
    column = "patient_id" if "patient_id" in task.columns else "lesion_id"
    values = task[column].fillna("").str.strip()
    return values.where(values != "", task["image_id"]).set_axis(task["image_id"])


@FAST
@given(task=tasks(), seed=st.integers(0, 1000))
def test_every_image_once_and_no_group_in_two_splits(task, seed):
    splits = _split(task, seed=seed)
    assert list(splits.columns) == COLUMNS
    assert len(splits) == len(task)
    assert set(splits["image_id"]) == set(task["image_id"])
    assert splits["image_id"].is_unique
    assert splits["image_id"].is_monotonic_increasing
    assert set(splits["split"]) <= {"train", "val", "test"}
    assert {"train", "test"} <= set(splits["split"])
    assert (splits.groupby("group_id")["split"].nunique() == 1).all()
    # the groups are the ones the task defines (patient over lesion; no value = own group)
    expected_groups = _expected_groups(task).reindex(splits["image_id"])
    assert (splits["group_id"].to_numpy() == expected_groups.to_numpy()).all()
    labels = task.set_index("image_id")["label"].reindex(splits["image_id"])
    assert (splits["label"].to_numpy() == labels.to_numpy()).all()
    assert split_report(splits)["groups_shared_across_splits"] == 0


@FAST
@given(task=tasks(), seed=st.integers(0, 1000), order=st.integers(0, 2**32 - 1))
def test_deterministic_and_independent_of_row_order(task, seed, order):
    first = _split(task, seed=seed)
    pd.testing.assert_frame_equal(first, _split(task, seed=seed))
    shuffled = task.sample(frac=1, random_state=np.random.default_rng(order)).reset_index(drop=True)
    pd.testing.assert_frame_equal(first, _split(shuffled, seed=seed))


@FAST
@given(task=tasks(min_groups=150, max_groups=300, max_size=4), seed=st.integers(0, 1000))
def test_fractions_and_class_mix_close_to_requested_on_reasonable_data(task, seed):
    report = split_report(_split(task, seed=seed))
    fractions = report["fraction_per_split"]
    assert abs(fractions["test"] - 0.2) <= 0.03
    assert abs(fractions["val"] - 0.1) <= 0.03
    overall = report["class_fraction_overall"]["MEL"]
    for name in ("train", "val", "test"):
        assert abs(report["class_fraction_per_split"][name]["MEL"] - overall) <= 0.06


def test_different_seeds_give_different_splits():
    task = _singletons(300, p_mel=0.5)
    assert not _split(task, seed=0)["split"].equals(_split(task, seed=1)["split"])


def _singletons(n: int, p_mel: float, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_mel = round(n * p_mel)
    return pd.DataFrame(
        {
            "image_id": [f"ISIC_{i:07d}" for i in range(n)],
            "label": rng.permutation(["MEL"] * n_mel + ["NV"] * (n - n_mel)),
            "lesion_id": [f"IL_{i:07d}" for i in range(n)],
        }
    )


def test_patients_and_lesions_link_images_into_patient_groups():
    # 40 patients, each with two lesions of two images: lesion groups are finer than patient groups
    n = 160
    task = pd.DataFrame(
        {
            "image_id": [f"ISIC_{i:07d}" for i in range(n)],
            "label": ["MEL" if (i // 4) % 3 == 0 else "NV" for i in range(n)],
            "lesion_id": [f"IL_{i // 2:04d}" for i in range(n)],
            "patient_id": [f"IP_{i // 4:04d}" for i in range(n)],
        }
    )
    splits = _split(task)
    assert splits.attrs["group_column"] == "patient_id+lesion_id"
    assert (splits["group_id"] == task["patient_id"]).all()  # a group is named by its patient
    assert (splits.assign(p=task["patient_id"]).groupby("p")["split"].nunique() == 1).all()
    assert split_report(splits)["groups_per_split"] == splits.groupby("split")["group_id"].nunique().to_dict()
    # without patient_id the lesions group the images
    by_lesion = _split(task.drop(columns="patient_id"))
    assert by_lesion.attrs["group_column"] == "lesion_id"
    assert (by_lesion["group_id"] == task["lesion_id"]).all()


def test_a_lesion_without_its_patient_id_still_joins_the_patients_group():
    """Image 2 has no patient id but shares lesion L1 with image 1 of patient P; image 3 is P's other lesion:
    all three are one group, named P. Image 4 has neither id: its own group."""
    task = pd.DataFrame(
        {
            "image_id": ["a1", "a2", "a3", "a4"],
            "patient_id": ["P", None, "P", None],
            "lesion_id": ["L1", "L1", "L2", ""],
        }
    )
    groups, used = split_module.group_ids(task, ["patient_id", "lesion_id"])
    assert used == "patient_id+lesion_id" and list(groups) == ["P", "P", "P", "a4"]
    with_pair = task.assign(duplicate_group=[None, None, "a3", "a3"])  # a3 and a4: a listed duplicate pair
    assert list(split_module.group_ids(with_pair, ["patient_id", "lesion_id"])[0]) == ["P"] * 4


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 9), st.integers(0, 19), st.booleans(), st.booleans(), st.sampled_from("MN")),
        min_size=40,
        max_size=120,
    )
)
def test_no_patient_and_no_lesion_straddles_two_splits_whatever_ids_are_missing(images):
    """Lesions belong to patients (lesion l of patient l % 10); each image may lack its patient id, its lesion
    id or both. Whatever is missing, no known patient and no known lesion is found in two splits."""
    task = pd.DataFrame(
        {
            "image_id": [f"ISIC_{i:07d}" for i in range(len(images))],
            "patient_id": [f"P{lesion % 10}" if has_p else None for _, lesion, has_p, _, _ in images],
            "lesion_id": [f"L{lesion}" if has_l else None for _, lesion, _, has_l, _ in images],
            "label": ["MEL" if c == "M" else "NV" for *_, c in images],
        }
    )
    if task["label"].value_counts().min() < 4:
        return  # too few of a class to carve stratified splits at all
    try:
        splits = _split(task)
    except ValueError as err:  # too few groups to carve a split: refused, never leaked
        assert "too few groups" in str(err) or "at least two groups" in str(err)
        return
    merged = splits.merge(task[["image_id", "patient_id", "lesion_id"]], on="image_id")
    for column in ("patient_id", "lesion_id"):
        known = merged.dropna(subset=[column])
        assert (known.groupby(column)["split"].nunique() == 1).all(), column


def test_missing_lesion_ids_become_singleton_groups():
    task = _singletons(60, p_mel=0.5)
    task["lesion_id"] = [f"IL_{i // 3:04d}" for i in range(60)]
    task.loc[[0, 1, 2], "lesion_id"] = [None, "", "   "]  # one former lesion, now three lone images
    splits = _split(task)
    assert (splits.loc[:2, "group_id"] == splits.loc[:2, "image_id"]).all()
    assert split_report(splits)["images_without_group_value"] == 3
    assert splits["group_id"].nunique() == 3 + 19


def test_a_present_but_empty_patient_column_links_nothing(caplog):
    task = _singletons(50, p_mel=0.5).assign(patient_id=None)
    splits = _split(task)
    assert splits.attrs["group_column"] == "patient_id+lesion_id"
    assert (splits["group_id"] == task["lesion_id"]).all()  # the lesions (one image each) group the images
    nothing = _split(task.assign(lesion_id=""))
    assert (nothing["group_id"] == nothing["image_id"]).all()
    assert "empty in every row" in caplog.text


def test_stratification_keeps_the_mel_nv_ratio_in_every_split():
    task = _singletons(1000, p_mel=0.25)
    task["lesion_id"] = [f"IL_{i // 2:04d}" for i in range(1000)]  # pairs of images
    task["label"] = np.repeat(np.random.default_rng(1).permutation(["MEL"] * 125 + ["NV"] * 375), 2)
    report = split_report(_split(task))
    for name in ("train", "val", "test"):
        assert report["class_fraction_per_split"][name]["MEL"] == pytest.approx(0.25, abs=0.02)
    assert report["fraction_per_split"]["test"] == pytest.approx(0.2, abs=0.01)
    assert report["fraction_per_split"]["val"] == pytest.approx(0.1, abs=0.01)
    assert sum(sum(c.values()) for c in report["counts"].values()) == 1000


def test_val_fraction_zero_gives_no_val_split():
    splits = _split(_singletons(100, p_mel=0.4), val=0.0)
    assert set(splits["split"]) == {"train", "test"}
    report = split_report(splits)
    assert report["images_per_split"]["val"] == 0
    assert report["class_fraction_per_split"]["val"] == {"MEL": None, "NV": None}
    assert report["images_per_split"]["test"] == 20


@pytest.mark.parametrize(("test", "val"), [(0.3, 0.15), (0.4, 0.2), (0.15, 0.05)])
def test_other_fractions_are_met(test, val):
    report = split_report(_split(_singletons(400, p_mel=0.5), test=test, val=val))
    assert report["fraction_per_split"]["test"] == pytest.approx(test, abs=0.01)
    assert report["fraction_per_split"]["val"] == pytest.approx(val, abs=0.01)


def test_errors_are_clear():
    task = _singletons(20, p_mel=0.5)
    with pytest.raises(ValueError, match="none of the group columns"):
        grouped_split(task, group_columns=["patient_id"], test_fraction=0.2, val_fraction=0.1, seed=0)
    with pytest.raises(ValueError, match="at least two groups"):
        _split(task.assign(lesion_id="IL_1"))
    with pytest.raises(ValueError, match="test_fraction"):
        _split(task, test=0.0)
    with pytest.raises(ValueError, match="val_fraction"):
        _split(task, test=0.6, val=0.4)
    with pytest.raises(ValueError, match="more than once"):
        _split(pd.concat([task, task.iloc[:1]]))


def test_report_counts_a_shared_group():
    splits = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d"],
            "group_id": ["g1", "g1", "g2", "g3"],
            "label": ["MEL", "MEL", "NV", "NV"],
            "split": ["train", "test", "train", "val"],
        }
    )
    report = split_report(splits, group_column="lesion_id")
    assert report["groups_shared_across_splits"] == 1
    assert report["group_column"] == "lesion_id"
    assert report["counts"] == {
        "train": {"MEL": 1, "NV": 1},
        "val": {"MEL": 0, "NV": 1},
        "test": {"MEL": 1, "NV": 0},
    }
    assert report["groups_per_split"] == {"train": 2, "val": 1, "test": 1}


def test_run_split_round_trip(tmp_path):
    task = _singletons(200, p_mel=0.5)
    task["lesion_id"] = [f"IL_{i // 2:04d}" if i % 5 else None for i in range(200)]
    task_path = tmp_path / "task.parquet"
    task.sample(frac=1, random_state=0).to_parquet(task_path, index=False)
    splits_out, report_out = tmp_path / "data" / "splits.parquet", tmp_path / "data" / "split_report.json"
    returned = run_split(
        task=task_path,
        splits_out=splits_out,
        report_out=report_out,
        group_columns=GROUPS,
        test_fraction=0.2,
        val_fraction=0.1,
        seed=5,
    )
    splits = pd.read_parquet(splits_out)
    assert list(splits.columns) == COLUMNS
    assert splits["image_id"].is_monotonic_increasing
    expected = grouped_split(task, group_columns=GROUPS, test_fraction=0.2, val_fraction=0.1, seed=5)
    pd.testing.assert_frame_equal(splits, expected, check_dtype=False)
    report = json.loads(report_out.read_text())
    assert report == returned
    assert report["group_column"] == "lesion_id"
    assert report["groups_shared_across_splits"] == 0
    assert report["requested"] == {"test_fraction": 0.2, "val_fraction": 0.1, "seed": 5}
    assert sum(report["images_per_split"].values()) == 200
    assert report_out.read_text().startswith('{\n  "group_column"')  # indent 2


def test_run_split_refuses_to_write_a_leaking_split(tmp_path, monkeypatch):
    task_path = tmp_path / "task.parquet"
    _singletons(20, p_mel=0.5).to_parquet(task_path, index=False)

    def leaking(task, **_):
        out = task[["image_id", "label"]].assign(group_id="same", split=["train", "test"] * 10)
        return out[COLUMNS]

    monkeypatch.setattr(split_module, "grouped_split", leaking)
    splits_out = tmp_path / "splits.parquet"
    with pytest.raises(RuntimeError, match="more than one split"):
        run_split(
            task=task_path,
            splits_out=splits_out,
            report_out=tmp_path / "report.json",
            group_columns=GROUPS,
            test_fraction=0.2,
            val_fraction=0.1,
            seed=0,
        )
    assert not splits_out.exists()
