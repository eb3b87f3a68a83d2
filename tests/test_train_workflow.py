"""Every training mode end to end through Snakemake, from "pretrained" weights the test saves locally.

The weights go through the real loading code: a timm ViT from a safetensors file, and a transformers DINOv2 from
a saved folder (from_pretrained), with the hub switched off as on a compute node.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from conftest import copy_workflow, snakemake, tiny_dinov2_config, write_config
from safetensors.torch import load_file, save_file

from dermcompress.metrics import METRIC_KEYS, VAL_PREFIX, compute_run_metrics
from dermcompress.train import HISTORY_COLUMNS, MODES

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
            "knn": {"k": 5},
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
    """(model, mode) -> run folder, found from what the runs recorded about themselves."""
    found = {}
    for config_file in (workdir / "results/runs").rglob("config.json"):
        config = json.loads(config_file.read_text())
        found[config["model"], config["settings"]["mode"]] = config_file.parent
    return found


def test_every_mode_writes_contracted_outputs_recomputable_from_predictions(finished):
    found = runs(finished)
    expected = {("vit_local", mode) for mode in MODES} | {
        ("dino_local", "finetune"),
        ("dino_local", "linear"),
    }
    assert set(found) == expected
    for (model, mode), run in found.items():
        config = json.loads((run / "config.json").read_text())
        classes = config["classes"]
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
        history = pd.read_csv(run / "history.csv")
        assert list(history.columns) == list(HISTORY_COLUMNS)
        assert history["eval_accuracy"].notna().any()
        if mode != "knn":
            assert history["train_loss"].notna().sum() >= 2
        log = next(
            (finished / "results/logs/runs").rglob(f"*{run.relative_to(finished / 'results/runs').name}.log")
        )
        assert log.stat().st_size > 0


def test_effective_input_is_recorded(finished):
    found = runs(finished)
    vit = json.loads((found["vit_local", "finetune"] / "metrics.json").read_text())
    dino = json.loads((found["dino_local", "finetune"] / "metrics.json").read_text())
    assert vit["effective_input_px"] == 32  # test_vit's 16 px patches tile 32 px exactly
    assert dino["effective_input_px"] == 28  # 14 px patches: the central 28 px of 32


def checkpoint_of(run: Path, workdir: Path) -> dict[str, torch.Tensor]:
    """The trained weights of a run; its resume checkpoint is gone, the run being finished."""
    assert not (workdir / "results/checkpoints" / run.relative_to(workdir / "results/runs")).exists()
    return load_file(str(run / "weights.safetensors"))


def test_pretrained_weights_were_loaded_and_frozen_only_where_the_mode_says(finished):
    found = runs(finished)
    saved = load_file(str(finished / "models/test_vit.safetensors"))
    key = "blocks.0.attn.qkv.weight"
    linear = checkpoint_of(found["vit_local", "linear"], finished)
    finetune = checkpoint_of(found["vit_local", "finetune"], finished)
    frozen = checkpoint_of(found["vit_local", "freeze_blocks"], finished)
    # Linear probing trains the head alone: the backbone is exactly the saved "pretrained" one.
    assert torch.equal(linear[f"backbone.{key}"], saved[key])
    assert torch.equal(frozen[f"backbone.{key}"], saved[key])  # block 0 of 1 frozen
    assert not torch.equal(frozen["backbone.blocks.1.attn.qkv.weight"], saved["blocks.1.attn.qkv.weight"])
    assert not torch.equal(finetune[f"backbone.{key}"], saved[key])
    # The DINOv2 linear probe kept the transformers weights it loaded from the folder.
    from transformers import Dinov2Model

    dino = Dinov2Model.from_pretrained(finished / "models/dinov2_tiny").state_dict()
    dino_linear = checkpoint_of(found["dino_local", "linear"], finished)
    for key, tensor in dino.items():
        assert torch.equal(dino_linear[f"backbone.model.{key}"], tensor), key
    dino_finetune = checkpoint_of(found["dino_local", "finetune"], finished)
    q = "encoder.layer.0.attention.q_proj.weight"
    assert not torch.equal(dino_finetune[f"backbone.model.{q}"], dino[q])


def test_replaced_local_weights_rerun_only_the_runs_that_load_them(finished):
    from test_workflow import planned_jobs

    weights = finished / "models/test_vit.safetensors"
    original = weights.read_bytes()
    torch.manual_seed(2)
    save_file(timm.create_model("test_vit", num_classes=1000).state_dict(), str(weights))
    try:
        proc = snakemake(finished, "--dry-run", "--configfile", "test.yaml")
    finally:
        weights.write_bytes(original)
    trains = {wc for rule, wc in planned_jobs(proc.stdout + proc.stderr) if rule == "train"}
    assert trains and all("model=vit_local" in wc for wc in trains)
    assert len(trains) == len(MODES)
