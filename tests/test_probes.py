"""Frozen features and the probes on them: features computed once and read back, DINOv2-style linear heads
(many learning rates at once, chosen on val), kNN with several k (chosen on val), and their evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import learnable_cache
from safetensors.torch import load_file

from dermcompress.data.loader import make_loader, normalize
from dermcompress.learn import probes
from dermcompress.learn.features import read_features, run_features
from dermcompress.learn.metrics import METRIC_KEYS, VAL_PREFIX, compute_run_metrics
from dermcompress.learn.models import build_seeded
from dermcompress.learn.runs import HISTORY_COLUMNS

RES = 32
MODEL, ENTRY = "test_vit", {"source": "timm:test_vit", "pretrained": False}
SETTINGS = {
    "batch_size": 16,
    "n_bootstrap": 20,
    "seed": 0,
    "probe": {"iterations": 60, "batch_size": 16},
    "knn": {"k": [1, 5, 20]},
}


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> dict[str, Path]:
    """test_vit features (random init, seed 0) of the train, val and test splits of a learnable cache."""
    root = tmp_path_factory.mktemp("probe_cache")
    cache, _ = learnable_cache(root, res=RES, seed=2)
    out = {split: root / f"{split}.parquet" for split in ("train", "val", "test")}
    extract_features(cache, out, seed=0)
    return out


def extract_features(cache: Path, outputs: dict[str, Path], seed: int) -> dict[str, dict]:
    """One features job: the splits of `outputs` ({split: parquet}) through the test_vit built from `seed`."""
    return run_features(
        model_name=MODEL,
        model_entry=ENTRY,
        cache_dir=str(cache),
        outputs={split: str(path) for split, path in outputs.items()},
        settings=SETTINGS,
        resolution=RES,
        seed=seed,
    )


def test_one_features_job_writes_each_split_as_a_job_of_its_own_would(features, tmp_path):
    """The backbone built once for all splits gives each split the features a job for that split alone gives."""
    cache = features["train"].parent / "cache"
    for split in ("val", "train"):
        alone = tmp_path / f"{split}.parquet"
        meta = extract_features(cache, {split: alone}, seed=0)[split]
        ours, theirs = read_features(features[split]), read_features(alone)
        assert ours.image_ids == theirs.image_ids and meta["split"] == split == ours.meta["split"]
        assert torch.equal(ours.features, theirs.features) and torch.equal(ours.labels, theirs.labels)


def splits_of(features: dict[str, Path]) -> str:
    return str(features["train"].parent / "splits.parquet")


def test_features_are_the_frozen_backbones_in_row_order_as_float16(features):
    cache = features["train"].parent / "cache"
    feats = read_features(features["val"])
    loader = make_loader(cache, "val", batch_size=16, shuffle=False, seed=0)
    model = build_seeded(MODEL, ENTRY, num_classes=2, resolution=RES, seed=0).eval()
    with torch.no_grad():
        batch = next(iter(loader))
        expected = model.forward_features(normalize(batch["pixels"], model.mean, model.std))
    assert feats.image_ids == loader.dataset.image_ids and feats.features.shape == expected.shape
    assert feats.labels.tolist() == loader.dataset.labels.tolist() and feats.classes == ["MEL", "NV"]
    torch.testing.assert_close(feats.features, expected.half().float())
    meta = feats.meta
    assert meta["split"] == "val" and meta["images"] == 16 and meta["img_per_s"] > 0
    assert meta["gmacs"] > 0 and meta["params_m"] > 0 and meta["peak_mem_mb"] is None  # CPU
    subset = read_features(features["val"], image_ids=feats.image_ids[3:6])
    assert subset.image_ids == feats.image_ids[3:6]
    with pytest.raises(ValueError, match="not in"):
        read_features(features["val"], image_ids=["ISIC_missing"])


def test_heads_trained_at_once_are_independent(features):
    """One optimizer over many heads is many independent runs: a head's weights do not depend on which other
    heads train beside it (the same first head, with different companions, ends bit for bit the same), and
    alone it trains to the same weights."""
    train = read_features(features["train"])
    probe = {"iterations": 20, "batch_size": 16, "momentum": 0.9, "weight_decay": 0.0}
    runs = [[1e-2, 1e-3], [1e-2, 1e-1, 5e-2], [1e-2]]
    heads = [probes.train_heads(train, {**probe, "learning_rates": lrs}, seed=3)[0] for lrs in runs]
    for other in heads[1:]:
        assert torch.equal(other[0].weight, heads[0][0].weight) and torch.equal(
            other[0].bias, heads[0][0].bias
        )
    assert not torch.equal(heads[1][1].weight, heads[1][2].weight)


@pytest.fixture(scope="module")
def linear_run(features, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("linear") / "run"
    probes.run_linear(
        train_features=str(features["train"]),
        val_features=str(features["val"]),
        splits=splits_of(features),
        settings={**SETTINGS, "mode": "linear"},
        run_dir=str(run),
    )
    return run


def test_linear_probe_keeps_the_head_best_on_validation(linear_run, features):
    table = pd.read_csv(linear_run / "probe.csv")
    assert len(table) == 13 and table["chosen"].sum() == 1  # DINOv2's 13 learning rates
    ranked = table.sort_values(["val_auc", "val_balanced_accuracy"], ascending=False, kind="stable")
    chosen = table[table["chosen"]].iloc[0]
    assert chosen["lr"] == ranked.iloc[0]["lr"]
    summary = json.loads((linear_run / "train.json").read_text())
    assert summary["probe_lr"] == chosen["lr"] and summary["train_images"] == 48
    head = load_file(str(linear_run / "head.safetensors"))
    dim = read_features(features["train"]).features.shape[1]
    assert head["weight"].shape == (2, dim) and summary["trainable_params_m"] == pytest.approx(
        (2 * dim + 2) / 1e6
    )
    history = pd.read_csv(linear_run / "history.csv")
    assert list(history.columns) == list(HISTORY_COLUMNS)
    assert history["train_loss"].notna().sum() == SETTINGS["probe"]["iterations"]
    assert history["eval_accuracy"].iloc[-1] == pytest.approx(chosen["val_accuracy"])


def evaluate_probe(
    features, out: Path, mode: str, run: Path | None = None, variants: dict | None = None, **extra
) -> dict:
    """A probe evaluation job on the val and test features of each variant ({name: (features, out folder)};
    default: `features` into `out`): the metrics by variant, or of the default's alone."""
    payloads = probes.run_probe_evaluations(
        mode=mode,
        evaluations={
            name: ({"val": str(f["val"]), "test": str(f["test"])}, str(folder))
            for name, (f, folder) in (variants or {"clean": (features, out)}).items()
        },
        splits=splits_of(features),
        settings={**SETTINGS, "mode": mode, **extra},
        head=str(run / "head.safetensors") if run else None,
        train_summary=str(run / "train.json") if run else None,
        bank_features=str(features["train"]),
        choose_features=str(features["val"]),
    )
    return payloads if variants else payloads["clean"]


@pytest.mark.parametrize("mode", ["knn", "linear"])
def test_one_probe_job_scores_each_variant_as_its_own_job_would(features, linear_run, tmp_path, mode):
    """A probe's head or bank, loaded once, scores each eval variant exactly as a job of its own would."""
    cache = features["train"].parent / "cache"
    other = {split: tmp_path / f"other_{split}.parquet" for split in ("val", "test")}
    extract_features(cache, other, seed=1)  # another backbone's draw: other features of the same images
    variants = {
        "clean": (features, tmp_path / "together" / "clean"),
        "other": (other, tmp_path / "together" / "other"),
    }
    run = linear_run if mode == "linear" else None
    evaluate_probe(features, tmp_path, mode, run=run, variants=variants)
    written = {name: (folder / "predictions.parquet").read_bytes() for name, (_, folder) in variants.items()}
    assert written["clean"] != written["other"]
    for name, (f, _) in variants.items():
        evaluate_probe(
            features,
            tmp_path / "alone" / name,
            mode,
            run=run,
            variants={name: (f, tmp_path / "alone" / name)},
        )
        assert (tmp_path / "alone" / name / "predictions.parquet").read_bytes() == written[name]


def check_evaluation(out: Path, mode: str, features: dict[str, Path]) -> dict:
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert predictions.groupby("split").size().to_dict() == {"test": 16, "val": 16}
    metrics = json.loads((out / "metrics.json").read_text())
    recomputed = compute_run_metrics(predictions, ["MEL", "NV"], n_bootstrap=20, seed=0)
    assert {k: metrics[k] for k in recomputed} == json.loads(json.dumps(recomputed))
    assert {f"{VAL_PREFIX}{k}" for k in METRIC_KEYS} <= set(metrics) and metrics["mode"] == mode
    # What deployment pays: the backbone's rate on the test split.
    assert metrics["eval_img_per_s"] == pytest.approx(read_features(features["test"]).meta["img_per_s"])
    return metrics


def test_linear_probe_evaluation(linear_run, features, tmp_path):
    evaluate_probe(features, tmp_path / "eval", "linear", run=linear_run)
    metrics = check_evaluation(tmp_path / "eval", "linear", features)
    summary = json.loads((linear_run / "train.json").read_text())
    assert metrics["probe_lr"] == summary["probe_lr"] and metrics["accuracy"] >= 0.75


def test_knn_chooses_k_on_validation_and_counts_its_bank(features, tmp_path):
    """kNN's "training" is extracting the 48 train images' features: its rate divides those, not the
    validation images scored afterwards, by the time that took."""
    evaluate_probe(features, tmp_path / "eval", "knn")
    metrics = check_evaluation(tmp_path / "eval", "knn", features)
    scores = metrics["knn_val_scores"]
    assert set(scores) == {"1", "5", "20"}
    assert metrics["knn_k"] == max((int(k) for k in scores), key=lambda k: tuple(scores[str(k)]))
    bank = read_features(features["train"]).meta
    assert metrics["train_images"] == 48
    assert metrics["train_img_per_s"] == pytest.approx(48 / bank["seconds"])


def test_label_fraction_shrinks_the_bank_to_whole_groups(features, tmp_path):
    metrics = evaluate_probe(features, tmp_path / "eval", "knn", label_fraction=0.25)
    groups = pd.read_parquet(splits_of(features)).query("split == 'train'")
    assert 8 <= metrics["train_images"] <= 16 and metrics["train_images"] % 2 == 0  # groups of two images
    assert metrics["train_images"] < len(groups)
    assert np.isfinite(metrics["accuracy"])
