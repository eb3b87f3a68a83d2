"""Every training mode end to end through Snakemake, from "pretrained" weights the test saves locally.

The weights go through the real loading code: a timm ViT from a safetensors file, and a transformers DINOv2 from
a saved folder (from_pretrained), with the hub switched off as on a compute node. `training.keep_weights` keeps
the trained weights for the checks below (by default they are deleted after the evaluations).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import yaml
from conftest import copy_workflow, snakemake, tiny_dinov2_config, write_config
from safetensors.torch import load_file, save_file

from dermcompress.data.loader import make_loader, normalize
from dermcompress.learn.features import read_features
from dermcompress.learn.metrics import METRIC_KEYS, VAL_PREFIX, compute_run_metrics
from dermcompress.learn.models import build_model
from dermcompress.learn.registry import parse_spec
from dermcompress.learn.runs import HISTORY_COLUMNS, MODES, parse_eval_dir

pytestmark = pytest.mark.workflow

N_BOOTSTRAP = 50


def save_pretend_pretrained(workdir: Path) -> dict[str, dict]:
    """Tiny ViT weights as a safetensors file and a tiny DINOv2 as a transformers folder; their registry entries."""
    from transformers import BitImageProcessor, Dinov2Model

    models = workdir / "models"
    models.mkdir()
    torch.manual_seed(1)
    vit = timm.create_model("test_vit", pretrained=False, num_classes=1000)
    save_file(vit.state_dict(), str(models / "test_vit.safetensors"))
    config = tiny_dinov2_config()
    Dinov2Model(config).save_pretrained(models / "dinov2_tiny")
    BitImageProcessor(image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(models / "dinov2_tiny")
    return {
        "vit_local": {"source": "local:models/test_vit.safetensors", "arch": "timm:test_vit"},
        "dino_local": {"source": "local:models/dinov2_tiny"},
    }


def grid(models: list[str], modes: list[str]) -> dict:
    return {
        "models": models,
        "resolutions": [32],
        "train_variants": ["clean"],
        "eval_variants": ["clean"],
        "modes": modes,
        "lr": [1.0e-3],
        "seeds": [0],
        "reference": {"res": 32},
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("train-run"))
    registry = save_pretend_pretrained(workdir)
    overlay = {
        "data": {"synthetic": {"n": 160, "seed": 3}},
        "resize": {"resolutions": [32]},
        "cache": {"rows_per_shard": 32, "row_group_size": 16},
        "models": registry,
        "training": {
            "batch_size": 16,
            "epochs": 2,
            "log_every": 1,
            "n_bootstrap": N_BOOTSTRAP,
            "freeze_blocks": 1,
            "knn": {"k": [3, 5]},
            "probe": {"iterations": 40, "batch_size": 16},
            "keep_weights": True,
        },
        "experiments": {
            "modes": {"description": "every mode on the local ViT", **grid(["vit_local"], list(MODES))},
            "dino": {
                "description": "DINOv2 from a local folder",
                **grid(["dino_local"], ["finetune", "linear"]),
            },
        },
        "run_experiments": ["modes", "dino"],
    }
    write_config(workdir / "test.yaml", overlay)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")  # as on a compute node: nothing may be fetched
        env.setenv("HF_HOME", str(workdir / "hf_home"))
        snakemake(workdir, "--configfile", "test.yaml")
    return workdir


def runs(workdir: Path) -> dict[tuple[str, str], Path]:
    """(model, mode) -> the evaluation folder of its run (one eval variant here), read from its path."""
    found = {}
    for metrics in (workdir / "results/runs").rglob("eval/*/metrics.json"):
        evaluation = parse_eval_dir(metrics.parent)
        found[evaluation.run.model, evaluation.run.mode] = metrics.parent
    return found


def test_every_mode_writes_contracted_outputs_recomputable_from_predictions(finished):
    found = runs(finished)
    expected = {("vit_local", mode) for mode in MODES} | {
        ("dino_local", "finetune"),
        ("dino_local", "linear"),
    }
    assert set(found) == expected
    for (model, mode), run in found.items():
        classes = ["MEL", "NV"]
        predictions = pd.read_parquet(run / "predictions.parquet")
        assert list(predictions.columns) == [
            *("split", "image_id", "group_id", "label", "pred"),
            *(f"prob_{c}" for c in classes),
        ]
        metrics = json.loads((run / "metrics.json").read_text())
        recomputed = compute_run_metrics(predictions, classes, n_bootstrap=N_BOOTSTRAP, seed=0)
        assert {k: metrics[k] for k in recomputed} == json.loads(json.dumps(recomputed)), (model, mode)
        assert {f"{VAL_PREFIX}{k}" for k in METRIC_KEYS} <= set(metrics)
        assert metrics["n_eval"] + metrics["val_n_eval"] == len(predictions) > 0
        assert metrics["mode"] == mode and metrics["gmacs"] > 0 and metrics["params_m"] > 0
        # The val and test splits of the cache, every image once, with the lesion group of the split table.
        splits = pd.read_parquet(finished / "results/data/splits.parquet").set_index("image_id")
        for split in ("val", "test"):
            scored = predictions[predictions["split"] == split]
            assert set(scored["image_id"]) == set(splits.index[splits["split"] == split])
            assert (
                scored["group_id"].to_numpy() == splits.loc[scored["image_id"], "group_id"].to_numpy()
            ).all()
        assert predictions["image_id"].is_unique
        training = run.parent.parent
        if mode != "knn":  # kNN trains nothing: no history
            history = pd.read_csv(training / "history.csv")
            assert list(history.columns) == list(HISTORY_COLUMNS)
            assert history["eval_accuracy"].notna().any() and history["train_loss"].notna().sum() >= 2
        log = (
            finished / "results/logs/runs" / training.relative_to(finished / "results/runs") / "evaluate.log"
        )
        assert log.stat().st_size > 0


def test_effective_input_is_recorded(finished):
    found = runs(finished)
    vit = json.loads((found["vit_local", "finetune"] / "metrics.json").read_text())
    dino = json.loads((found["dino_local", "finetune"] / "metrics.json").read_text())
    assert vit["effective_input_px"] == 32  # test_vit's 16 px patches tile 32 px exactly
    assert dino["effective_input_px"] == 28  # 14 px patches: the central 28 px of 32


def weights_of(evaluation: Path, workdir: Path) -> dict[str, torch.Tensor]:
    """The trained weights of an evaluation's run (kept: keep_weights); its resume checkpoint is gone."""
    run = evaluation.parent.parent
    assert not (workdir / "results/checkpoints" / run.relative_to(workdir / "results/runs")).exists()
    return load_file(str(run / "weights.safetensors"))


def features_of(workdir: Path, model: str, split: str = "train") -> torch.Tensor:
    (path,) = (workdir / "results/features" / model).rglob(f"{split}.parquet")
    return read_features(path).features


def test_pretrained_weights_were_loaded_and_frozen_only_where_the_mode_says(finished):
    found = runs(finished)
    saved = load_file(str(finished / "models/test_vit.safetensors"))
    key = "blocks.0.attn.qkv.weight"
    finetune = weights_of(found["vit_local", "finetune"], finished)
    frozen = weights_of(found["vit_local", "freeze_blocks"], finished)
    assert torch.equal(frozen[f"backbone.{key}"], saved[key])  # block 0 of 1 frozen
    assert not torch.equal(frozen["backbone.blocks.1.attn.qkv.weight"], saved["blocks.1.attn.qkv.weight"])
    assert not torch.equal(finetune[f"backbone.{key}"], saved[key])


def test_probes_read_the_saved_backbones_features(finished):
    """Linear probes and kNN never train the backbone: their features are the saved "pretrained" backbone's,
    the timm ViT's from its safetensors file and the DINOv2's from its transformers folder."""
    cache = finished / "results/cache/32px/clean"
    loader = make_loader(cache, "train", batch_size=64, shuffle=False, seed=0)
    for name, entry in save_entries(finished).items():
        model = build_model(parse_spec(name, entry), num_classes=2, resolution=32).eval()
        with torch.no_grad():
            expected = torch.cat(
                [model.forward_features(normalize(b["pixels"], model.mean, model.std)) for b in loader]
            )
        torch.testing.assert_close(features_of(finished, name), expected.half().float(), rtol=2e-3, atol=2e-3)


def save_entries(workdir: Path) -> dict[str, dict]:
    return {
        "vit_local": {"source": f"local:{workdir}/models/test_vit.safetensors", "arch": "timm:test_vit"},
        "dino_local": {"source": f"local:{workdir}/models/dinov2_tiny"},
    }


def test_keep_weights_keeps_the_trained_weights(finished):
    """training.keep_weights (this module's config): every trained run's weights outlive its evaluations (by
    default they are temporary: tests/test_runs.py)."""
    trained = [e for (_, mode), e in runs(finished).items() if mode not in ("linear", "knn")]
    assert len(trained) == 4 and all((e.parent.parent / "weights.safetensors").is_file() for e in trained)


def test_kept_weights_make_a_new_eval_variant_one_evaluation(finished):
    """With keep_weights a new eval variant costs evaluations, not a training: each run's one evaluation job
    scores its eval variants again, the new one among them."""
    from test_workflow import evaluations_of, kind, planned_jobs

    config = yaml.safe_load((finished / "test.yaml").read_text())
    config["experiments"]["modes"]["eval_variants"] = ["clean", "jpeg_only"]
    write_config(finished / "more.yaml", config)
    proc = snakemake(finished, "--dry-run", "--configfile", "more.yaml")
    planned = planned_jobs(proc.stdout + proc.stderr)
    rules = [kind(rule) for rule, _ in planned]
    assert "train" not in rules and "linear" not in rules
    assert rules.count("evaluate") == 3  # finetune, freeze_blocks, lora
    assert len([rule for rule in rules if rule in ("evaluate", "evaluate_probe")]) == len(MODES)
    evaluations = evaluations_of(planned) + evaluations_of(planned, "evaluate_probe")
    assert sorted((e["mode"], e["eval_variant"]) for e in evaluations) == sorted(
        (mode, variant) for mode in MODES for variant in ("clean", "jpeg_only")
    )


def test_replaced_local_weights_rerun_only_the_runs_that_load_them(finished):
    from test_workflow import kind, planned_jobs

    weights = finished / "models/test_vit.safetensors"
    original = weights.read_bytes()
    torch.manual_seed(2)
    save_file(timm.create_model("test_vit", num_classes=1000).state_dict(), str(weights))
    try:
        proc = snakemake(finished, "--dry-run", "--configfile", "test.yaml")
    finally:
        weights.write_bytes(original)
    planned = planned_jobs(proc.stdout + proc.stderr)
    trains = {wc for rule, wc in planned if rule == "train"}
    assert trains and all("model=vit_local" in wc for wc in trains)
    assert len(trains) == len([m for m in MODES if m not in ("linear", "knn")])
    features = {wc for rule, wc in planned if kind(rule) == "features"}
    assert features and all(wc[0].startswith("features=vit_local/") for wc in features)
