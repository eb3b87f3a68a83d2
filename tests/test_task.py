"""The task stage: which manifest rows the study uses and how its classes are balanced."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from dermcompress.data.task import run_task, select_task

MANIFEST_COLUMNS = [
    "image_id",
    "status",
    "reason",
    "member",
    "sha256",
    "bytes",
    "width",
    "height",
    "mode",
    "format",
    "label",
    "lesion_id",
    "group_id",
    "age_approx",
    "anatom_site_general",
    "sex",
    "synthetic",
]


def make_manifest(
    labels: list[str | None], statuses: list[str] | None = None, start: int = 0
) -> pd.DataFrame:
    """A manifest in ingest's schema: one row per label, ids ISIC_<n>, all ok unless told."""
    n = len(labels)
    statuses = statuses or ["ok"] * n
    ids = [f"ISIC_{start + i:07d}" for i in range(n)]
    return pd.DataFrame(
        {
            "image_id": ids,
            "status": statuses,
            "reason": [None if s == "ok" else "decode_error: truncated" for s in statuses],
            "member": [f"ISIC_2019_Training_Input/{i}.jpg" for i in ids],
            "sha256": [f"{i:064x}" for i in range(n)],
            "bytes": np.full(n, 1234, dtype="int64"),
            "width": np.full(n, 64, dtype="int64"),
            "height": np.full(n, 48, dtype="int64"),
            "mode": ["RGB"] * n,
            "format": ["JPEG"] * n,
            "label": labels,
            "lesion_id": [f"IL_{i // 2:07d}" for i in range(n)],
            "group_id": [f"IL_{i // 2:07d}" for i in range(n)],
            "age_approx": np.full(n, 45.0),
            "anatom_site_general": ["torso"] * n,
            "sex": ["female"] * n,
            "synthetic": [True] * n,
        },
        columns=MANIFEST_COLUMNS,
    )


@pytest.fixture
def manifest() -> pd.DataFrame:
    # 30 MEL, 80 NV, 20 BCC, 5 unlabelled, and 10 quarantined MEL that must never be drawn.
    labels = ["MEL"] * 30 + ["NV"] * 80 + ["BCC"] * 20 + [None] * 5 + ["MEL"] * 10
    statuses = ["ok"] * 135 + ["quarantined"] * 10
    frame = make_manifest(labels, statuses)
    return frame.sample(frac=1, random_state=7).reset_index(drop=True)  # not in id order


def test_undersample_balances_exactly_and_keeps_only_ok_task_classes(manifest):
    task = select_task(manifest, classes=["MEL", "NV"], balance="undersample", seed=0)
    assert task["label"].value_counts().to_dict() == {"MEL": 30, "NV": 30}
    assert (task["status"] == "ok").all()
    assert set(task["label"]) == {"MEL", "NV"}
    # every ok MEL is kept (it is the rarest class), no quarantined one is
    ok_mel = manifest.loc[(manifest["status"] == "ok") & (manifest["label"] == "MEL"), "image_id"]
    assert set(task.loc[task["label"] == "MEL", "image_id"]) == set(ok_mel)
    assert task["image_id"].is_monotonic_increasing
    assert task["image_id"].is_unique
    assert list(task.columns) == [*MANIFEST_COLUMNS, "label_idx"]
    assert (task["label_idx"] == task["label"].map({"MEL": 0, "NV": 1})).all()
    assert task["label_idx"].dtype == "int64"


def test_label_idx_follows_class_order(manifest):
    task = select_task(manifest, classes=["NV", "MEL", "BCC"], balance="none", seed=0)
    assert (task["label_idx"] == task["label"].map({"NV": 0, "MEL": 1, "BCC": 2})).all()


def test_undersample_is_seeded_and_independent_of_row_order(manifest):
    a = select_task(manifest, classes=["MEL", "NV"], balance="undersample", seed=3)
    b = select_task(manifest.iloc[::-1], classes=["MEL", "NV"], balance="undersample", seed=3)
    pd.testing.assert_frame_equal(a, b)
    other = select_task(manifest, classes=["MEL", "NV"], balance="undersample", seed=4)
    # 30 of 80 NV drawn: two seeds agreeing by chance is astronomically unlikely
    assert set(a.loc[a["label"] == "NV", "image_id"]) != set(other.loc[other["label"] == "NV", "image_id"])


def test_balance_none_keeps_every_ok_image_of_the_classes(manifest):
    task = select_task(manifest, classes=["MEL", "NV", "BCC"], balance="none", seed=0)
    assert task["label"].value_counts().to_dict() == {"NV": 80, "MEL": 30, "BCC": 20}
    assert len(task) == 130


@pytest.mark.parametrize("classes", [["MEL", "SCC"], ["MEL", "XYZ"]])
def test_class_without_ok_images_is_an_error(manifest, classes):
    with pytest.raises(ValueError, match=classes[1]):
        select_task(manifest, classes=classes, balance="undersample", seed=0)


def test_class_with_only_quarantined_images_is_an_error():
    frame = make_manifest(["MEL", "NV", "NV", "MEL"], ["quarantined", "ok", "ok", "quarantined"])
    with pytest.raises(ValueError, match="MEL"):
        select_task(frame, classes=["MEL", "NV"], balance="none", seed=0)


@pytest.mark.parametrize(
    ("classes", "balance", "match"),
    [
        (["MEL"], "none", "two classes"),
        (["MEL", "MEL"], "none", "unique"),
        (["MEL", "NV"], "oversample", "balance"),
    ],
)
def test_bad_arguments_are_refused(manifest, classes, balance, match):
    with pytest.raises(ValueError, match=match):
        select_task(manifest, classes=classes, balance=balance, seed=0)


def test_duplicate_image_ids_are_refused(manifest):
    with pytest.raises(ValueError, match="more than once"):
        select_task(pd.concat([manifest, manifest.iloc[:1]]), classes=["MEL", "NV"], balance="none", seed=0)


def test_run_task_round_trip(tmp_path, manifest, caplog):
    manifest_path = tmp_path / "manifest.parquet"
    manifest.assign(patient_id=[f"IP_{i % 40}" for i in range(len(manifest))]).to_parquet(manifest_path)
    out = tmp_path / "data" / "task.parquet"
    with caplog.at_level(logging.INFO, logger="dermcompress.data.task"):
        returned = run_task(
            manifest=manifest_path, task_out=out, classes=["MEL", "NV"], balance="undersample", seed=0
        )
    task = pd.read_parquet(out)
    assert list(task.columns) == [*MANIFEST_COLUMNS, "patient_id", "label_idx"]
    assert task["image_id"].is_monotonic_increasing
    assert task["label"].value_counts().to_dict() == {"MEL": 30, "NV": 30}
    pd.testing.assert_frame_equal(task, returned, check_dtype=False)
    expected = select_task(
        pd.read_parquet(manifest_path), classes=["MEL", "NV"], balance="undersample", seed=0
    )
    pd.testing.assert_frame_equal(task, expected)
    assert "{'MEL': 30, 'NV': 80}" in caplog.text  # before balancing
    assert "{'MEL': 30, 'NV': 30}" in caplog.text  # after
