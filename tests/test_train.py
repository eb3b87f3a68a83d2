"""Training runs end to end on a tiny cache: each mode that trains through the backbone, its evaluation,
learning, frozen weights, clipping, augmentation, and checkpoints that resume exactly, only for their own code."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import flip_bit, learnable_cache
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from dermcompress.data.integrity import ChecksumError
from dermcompress.data.loader import make_loader
from dermcompress.learn import models
from dermcompress.learn.checkpoints import CHECKPOINT
from dermcompress.learn.evaluate import run_evaluations
from dermcompress.learn.inference import predict
from dermcompress.learn.metrics import EXTRA_KEYS, METRIC_KEYS, VAL_PREFIX, compute_run_metrics
from dermcompress.learn.runs import HISTORY_COLUMNS
from dermcompress.learn.settings import resolve_settings
from dermcompress.learn.train import run_training

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["MEL", "NV"]
RES = 32
MODEL, ENTRY = "resnet10t", {"source": "timm:resnet10t", "pretrained": False}
# LoRA needs attention layers (and resnet10t's zero-initialised last BatchNorm of each block would stop every
# gradient into its frozen-BN branches): timm's 0.3M-parameter test ViT.
VIT, VIT_ENTRY = "test_vit", {"source": "timm:test_vit", "pretrained": False}
# 48 train images, global batch 16 in micro batches of 8: 3 optimizer steps of 2 micro batches per epoch.
SETTINGS = {
    "mode": "finetune",
    "lr": 2e-3,
    "epochs": 3,
    "batch_size": 16,
    "micro_batch_size": 8,
    "schedule": "cosine",
    "min_lr_ratio": 0.1,
    "seed": 0,
    "log_every": 1,
    "n_bootstrap": 20,
}
STEPS = 9
PREDICTION_COLUMNS = ["split", "image_id", "group_id", "label", "pred", "prob_MEL", "prob_NV"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> Path:
    """A 32 px cache (48 train / 16 val / 16 test, balanced, NV brighter) beside its splits table (conftest)."""
    return learnable_cache(tmp_path_factory.mktemp("train_cache"), res=RES, seed=0)[0]


def run_args(caches: Path, out: Path, *, model=MODEL, entry=ENTRY, **overrides) -> dict:
    """run_training's arguments for a run of `model` in `out` (run/, ckpt/, run/weights.safetensors)."""
    return {
        "model_name": model,
        "model_entry": entry,
        "train_cache": str(caches),
        "run_dir": str(out / "run"),
        "checkpoint_dir": str(out / "ckpt"),
        "settings": {**SETTINGS, **overrides},
        "resolution": RES,
        "splits": str(caches.parent / "splits.parquet"),
        "weights_path": str(out / "run" / "weights.safetensors"),
    }


def train(caches: Path, out: Path, **kwargs) -> dict:
    return run_training(**run_args(caches, out, **kwargs))


def evaluate(caches: Path, out: Path, *, model=MODEL, entry=ENTRY, variants=None, **overrides) -> dict:
    """run_evaluations of the run in `out` on the val and test splits of each variant's cache ({name: cache},
    default {"clean": caches}), into out/run/eval/<name>; the metrics by variant (of clean alone: its own)."""
    payloads = run_evaluations(
        model_name=model,
        model_entry=entry,
        weights=str(out / "run" / "weights.safetensors"),
        train_summary=str(out / "run" / "train.json"),
        evaluations={
            name: (str(cache), str(out / "run" / "eval" / name))
            for name, cache in (variants or {"clean": caches}).items()
        },
        settings={**SETTINGS, **overrides},
        resolution=RES,
        splits=str(caches.parent / "splits.parquet"),
    )
    return payloads if variants else payloads["clean"]


def initial_state(model=MODEL, entry=ENTRY, seed=0) -> dict[str, torch.Tensor]:
    """The weights a run starts from (run_training seeds torch before building the model)."""
    torch.manual_seed(seed)
    spec = models.parse_spec(model, entry)
    return models.build_model(spec, num_classes=len(CLASSES), resolution=RES).state_dict()


def final_state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "run" / "weights.safetensors"))


def check_outputs(run: Path, mode: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The run's files and its evaluation's exist with the contracted columns and keys, and metrics.json is
    recomputable from predictions.parquet."""
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["mode"] == mode and config["settings"]["batch_size"] == SETTINGS["batch_size"]
    history = pd.read_csv(run / "history.csv")
    assert list(history.columns) == list(HISTORY_COLUMNS)
    evaluation = run / "eval" / "clean"
    predictions = pd.read_parquet(evaluation / "predictions.parquet")
    assert list(predictions.columns) == PREDICTION_COLUMNS
    # The final model scored on val and on test, every image of each once, with its lesion group.
    assert predictions.groupby("split").size().to_dict() == {"test": 16, "val": 16}
    assert predictions["image_id"].is_unique and predictions["group_id"].str.startswith("IL_").all()
    metrics = json.loads((evaluation / "metrics.json").read_text())
    val_keys = {f"{VAL_PREFIX}{k}" for k in METRIC_KEYS}
    assert set(METRIC_KEYS) | val_keys | set(EXTRA_KEYS) | {"mode", "trainable_params_m"} <= set(metrics)
    assert metrics["mode"] == mode and metrics["n_eval"] == metrics["val_n_eval"] == 16
    assert metrics["n_groups"] == 8  # lesion groups of two images
    assert metrics["peak_train_mem_mb"] is None and metrics["peak_eval_mem_mb"] is None  # CPU
    assert metrics["gmacs"] > 0 and metrics["params_m"] > 0 and metrics["effective_input_px"] > 0
    assert metrics["eval_img_per_s"] > 0
    recomputed = compute_run_metrics(
        predictions, CLASSES, n_bootstrap=SETTINGS["n_bootstrap"], seed=SETTINGS["seed"]
    )
    assert {k: metrics[k] for k in recomputed} == json.loads(json.dumps(recomputed))
    assert metrics["train_img_per_s"] == pytest.approx(metrics["train_images"] / metrics["train_seconds"])
    # Where the job's wall time went, the process's start-up included.
    assert {"start-up", "setup", "train", "writing", "total"} <= set(metrics["wall_seconds"]["train"])
    assert {"setup", "evaluate", "total"} <= set(metrics["wall_seconds"]["evaluate"])
    return history, predictions, metrics


def train_and_evaluate(caches: Path, out: Path, *, model=MODEL, entry=ENTRY, **overrides) -> Path:
    train(caches, out, model=model, entry=entry, **overrides)
    evaluate(caches, out, model=model, entry=entry, **overrides)
    return out


@pytest.fixture(scope="module")
def finetuned(caches, tmp_path_factory) -> Path:
    return train_and_evaluate(caches, tmp_path_factory.mktemp("finetune"))


def test_one_job_scores_each_variant_as_its_own_job_would(caches, finetuned, tmp_path):
    """An evaluation job scores a run on all its eval variants with one load of the model: each variant's
    predictions are byte for byte those of a job of its own (what one job per variant wrote), and its metrics
    the same but for the job's timings."""
    # A second variant of other pixels (and image order) over the same images and groups.
    (tmp_path / "other").mkdir()
    other = learnable_cache(tmp_path / "other", res=RES, seed=1)[0]
    variants = {"clean": caches, "other": other}
    alone = {}
    for name, cache in variants.items():
        out = tmp_path / f"alone_{name}"
        shutil.copytree(finetuned / "run", out / "run", ignore=shutil.ignore_patterns("eval"))
        alone[name] = (out / "run" / "eval" / name, evaluate(caches, out, variants={name: cache})[name])
    together = evaluate(caches, finetuned, variants=variants)
    bytes_of = {
        name: (finetuned / "run" / "eval" / name / "predictions.parquet").read_bytes() for name in variants
    }
    assert bytes_of["clean"] != bytes_of["other"]  # two evaluations, not one written twice
    for name, (folder, metrics) in alone.items():
        assert bytes_of[name] == (folder / "predictions.parquet").read_bytes()
        timings = ("wall_seconds", "eval_img_per_s")
        assert {k: v for k, v in together[name].items() if k not in timings} == {
            k: v for k, v in metrics.items() if k not in timings
        }
        # Each variant's record: the job's shared start-up and set-up, then its own scoring.
        assert {"start-up", "setup", "evaluate", "total"} <= set(together[name]["wall_seconds"]["evaluate"])


def test_finetune_learns_and_writes_everything(finetuned):
    history, _, metrics = check_outputs(finetuned / "run", "finetune")
    steps = history[history.train_loss.notna()]
    evals = history[history.eval_accuracy.notna()]
    assert steps.step.tolist() == list(range(1, STEPS + 1)) and steps.eval_loss.isna().all()
    assert (
        evals.step.tolist() == [3, 6, 9] and evals.epoch.tolist() == [1.0, 2.0, 3.0] and evals.lr.isna().all()
    )
    # Cosine from lr down towards min_lr_ratio x lr.
    assert steps.lr.iloc[0] == pytest.approx(SETTINGS["lr"]) and steps.lr.is_monotonic_decreasing
    assert steps.lr.iloc[-1] > SETTINGS["min_lr_ratio"] * SETTINGS["lr"]
    assert metrics["accuracy"] >= 0.75 and evals.eval_accuracy.iloc[-1] >= 0.75  # chance is 0.5
    assert metrics["trainable_params_m"] == pytest.approx(metrics["params_m"])
    assert metrics["train_img_per_s"] > 0 and metrics["steps"] == STEPS
    n_params = sum(
        v.numel() for k, v in initial_state().items() if "running" not in k and "num_batches" not in k
    )
    assert metrics["params_m"] == pytest.approx(n_params / 1e6)


def test_evaluation_scores_the_trained_weights(finetuned, caches):
    """The evaluation rebuilds the model from the weights file alone: its predictions are the trained model's."""
    model = models.build_architecture(models.parse_spec(MODEL, ENTRY), num_classes=2, resolution=RES)
    model.load_state_dict(final_state(finetuned))
    loader = make_loader(caches, "test", batch_size=8, shuffle=False, seed=0)
    result = predict(model, loader, device=torch.device("cpu"), autocast=nullcontext)
    predictions = pd.read_parquet(finetuned / "run" / "eval" / "clean" / "predictions.parquet").query(
        "split == 'test'"
    )
    np.testing.assert_allclose(predictions["prob_NV"].to_numpy(), result["probs"][:, 1], rtol=1e-6)


def test_rotten_kept_weights_stop_the_evaluation(caches, finetuned, tmp_path):
    """One flipped bit in a run's weights (mtime kept, as bit rot keeps it): the evaluation refuses them,
    naming the file and how to recover, instead of scoring a slightly different model."""
    out = tmp_path / "rotten"
    shutil.copytree(finetuned / "run", out / "run", ignore=shutil.ignore_patterns("eval"))
    weights = out / "run" / "weights.safetensors"
    flip_bit(weights, weights.stat().st_size - 100)  # a weight, not the header: safetensors still parses it
    with pytest.raises(ChecksumError, match=r"weights\.safetensors is corrupt.*snakemake --forcerun"):
        evaluate(caches, out)
    assert not (out / "run" / "eval").exists()


def test_freeze_blocks_keeps_stem_and_first_blocks(caches, tmp_path):
    train_and_evaluate(caches, tmp_path, mode="freeze_blocks", freeze_blocks=2)
    check_outputs(tmp_path / "run", "freeze_blocks")
    torch.manual_seed(0)
    model = models.build_model(models.parse_spec(MODEL, ENTRY), num_classes=len(CLASSES), resolution=RES)
    names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    frozen_blocks = {names[id(t)] for b in model.blocks[:2] for t in [*b.parameters(), *b.buffers()]}
    free_blocks = {names[id(t)] for b in model.blocks[2:] for t in b.parameters()}
    # The stem: the parameters registered before the first block's (resnet10t: its deep conv1 stem).
    in_blocks = {id(p) for b in model.blocks for p in b.parameters()}
    stem = [
        n for n, _ in itertools.takewhile(lambda np_: id(np_[1]) not in in_blocks, model.named_parameters())
    ]
    assert any("conv1" in n for n in stem), stem
    before, after = model.state_dict(), final_state(tmp_path)
    for name in [*frozen_blocks, *stem]:
        assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(before[n], after[n]) for n in free_blocks)
    assert not torch.equal(before["head.weight"], after["head.weight"])


LORA = {"mode": "lora", "lr": 1e-2}  # lora_dropout draws from torch's RNG: resuming must restore it


@pytest.fixture(scope="module")
def lora_run(caches, tmp_path_factory) -> Path:
    return train_and_evaluate(caches, tmp_path_factory.mktemp("lora"), model=VIT, entry=VIT_ENTRY, **LORA)


def test_lora_trains_adapters_and_head_only(lora_run):
    _, _, metrics = check_outputs(lora_run / "run", "lora")
    before, after = initial_state(VIT, VIT_ENTRY), final_state(lora_run)
    adapters = [k for k in after if "lora_" in k]
    assert adapters and all(".attn.qkv." in k for k in adapters), adapters
    for name, value in after.items():
        if "lora_" in name or name.startswith("head."):
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(before[original], value), name
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in adapters if "lora_B" in k)
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert 0 < metrics["trainable_params_m"] < 0.5 * metrics["params_m"]


def test_finished_run_deletes_its_checkpoint(finetuned):
    """results/checkpoints/ holds runs in progress only: a finished run leaves no checkpoint (nor its folder)."""
    assert (finetuned / "run" / "train.json").is_file()
    assert not (finetuned / "ckpt").exists()


def test_gradients_are_clipped_to_max_grad_norm_and_the_norm_is_logged(caches, tmp_path):
    """Each step's gradient reaches the optimizer with total norm min(norm, max_grad_norm); history.csv logs
    the norm before clipping. With max_grad_norm null nothing is clipped."""
    seen = []

    def norm_at_step(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        )

    hook = register_optimizer_step_pre_hook(norm_at_step)
    try:
        train(caches, tmp_path / "clipped", max_grad_norm=0.05)
        clipped, seen[:] = list(seen), []
        train(caches, tmp_path / "free", max_grad_norm=None)
        free = list(seen)
    finally:
        hook.remove()
    logged = pd.read_csv(tmp_path / "clipped/run/history.csv").dropna(subset=["train_loss"])["grad_norm"]
    assert len(logged) == len(clipped) == STEPS and (logged > 0.05).sum() >= 3
    np.testing.assert_allclose(clipped, np.minimum(logged, 0.05), rtol=1e-4)
    logged_free = pd.read_csv(tmp_path / "free/run/history.csv").dropna(subset=["train_loss"])["grad_norm"]
    np.testing.assert_allclose(free, logged_free, rtol=1e-5)
    assert logged_free.iloc[0] == pytest.approx(logged.iloc[0])  # the same first step, before any update


def test_augmentation_is_seeded_and_changes_training(caches, finetuned, tmp_path):
    flips = ["hflip", "vflip", "rot90"]
    train(caches, tmp_path / "a", augment=flips)
    train(caches, tmp_path / "b", augment=flips)
    a, b, plain = (final_state(d) for d in (tmp_path / "a", tmp_path / "b", finetuned))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], plain[k]) for k in a)
    with pytest.raises(ValueError, match="augment"):
        resolve_settings({"augment": ["hflip", "zoom"]})


# A run in its own process (its log in the job's way, job_logging), optionally sent a real signal (SIGTERM
# unless named) right after optimizer step K (torch's global step hook; 0: never); prints the number of
# optimizer steps it took.
INTERRUPTED = """
import json, os, signal, sys, torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from dermcompress.learn.train import run_training
from dermcompress.provenance.logs import job_logging
args, threads, stop_at, sig, log = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.set_num_threads(threads)
steps = 0
def hook(optimizer, a, kw):
    global steps
    steps += 1
    if steps == stop_at:
        os.kill(os.getpid(), getattr(signal, sig))
register_optimizer_step_post_hook(hook)
with job_logging(log or None):
    run_training(**args)
print(f"optimizer steps: {steps}")
"""


def run_in_process(
    args: dict, stop_at: int = 0, src: Path = REPO / "src", signal: str = "SIGTERM", log: str = ""
) -> subprocess.CompletedProcess:
    """run_training in a fresh interpreter that imports the package from `src`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", INTERRUPTED, json.dumps(args), str(torch.get_num_threads()), str(stop_at)]
    return subprocess.run([*cmd, signal, log], capture_output=True, text=True, env=env, timeout=300)


def preempt(args: dict, stop_at: int, src: Path = REPO / "src") -> None:
    """Start a run and SIGTERM it after step `stop_at`: it saves its checkpoint and fails."""
    proc = run_in_process(args, stop_at, src)
    assert proc.returncode != 0 and f"Preempted: SIGTERM at step {stop_at}" in proc.stderr, proc.stderr[
        -3000:
    ]
    assert not Path(args["weights_path"]).exists()


def test_resume_after_sigterm_matches_uninterrupted_run(caches, lora_run, tmp_path, caplog):
    stop_at = 4  # epoch 2, one optimizer step (two micro batches) into it
    args = run_args(caches, tmp_path, model=VIT, entry=VIT_ENTRY, **LORA)
    preempt(args, stop_at)
    state = torch.load(tmp_path / "ckpt" / CHECKPOINT, weights_only=True)["state"]
    assert (state["step"], state["epoch"], state["batches_done"]) == (4, 1, 1)

    steps = []
    hook = register_optimizer_step_post_hook(lambda *a: steps.append(1))
    try:
        with caplog.at_level("INFO", logger="dermcompress"):
            run_training(**args)
    finally:
        hook.remove()
    assert len(steps) == STEPS - stop_at, "the resumed run trains only the remaining steps"
    assert "resuming from" in caplog.text
    resumed, whole = final_state(tmp_path), final_state(lora_run)
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "run" / "history.csv"),
        pd.read_csv(lora_run / "run" / "history.csv"),
        check_exact=True,
    )
    assert not (tmp_path / "ckpt").exists()  # done: the checkpoint is gone


def test_ctrl_c_checkpoints_and_says_why_in_the_log(caches, tmp_path):
    """SIGINT (Ctrl-C) to the training process is handled as SIGTERM: a checkpoint after the step it was in,
    then a failure whose reason is the job log's last word; a rerun resumes from there."""
    args, log = run_args(caches, tmp_path), tmp_path / "train.log"
    proc = run_in_process(args, stop_at=3, signal="SIGINT", log=str(log))
    assert proc.returncode != 0 and not Path(args["weights_path"]).exists()
    state = torch.load(tmp_path / "ckpt" / CHECKPOINT, weights_only=True)["state"]
    assert state["step"] == 3
    assert "Preempted: SIGINT at step 3: checkpoint saved to" in log.read_text(), log.read_text()[-3000:]
    assert "job failed" in log.read_text()


def test_checkpoint_of_other_code_is_not_resumed(caches, finetuned, tmp_path):
    """A run preempted under one version of the training code restarts from step 0 under another: its
    checkpoint serves only the code that wrote it. (The package is copied, so the edit stays in the test.)"""
    src = tmp_path / "src"
    shutil.copytree(REPO / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    args = run_args(caches, tmp_path)
    preempt(args, stop_at=4, src=src)
    module = src / "dermcompress" / "learn" / "train.py"
    module.write_text(module.read_text() + "\nAN_EDIT = True  # a change to the training code\n")
    proc = run_in_process(args, src=src)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"optimizer steps: {STEPS}" in proc.stdout, "it trains from step 0"
    assert "ignoring checkpoint" in proc.stderr and "code" in proc.stderr and "resuming" not in proc.stderr
    trained, whole = final_state(tmp_path), final_state(finetuned)
    assert all(torch.equal(trained[k], whole[k]) for k in whole)


def test_checkpoint_of_other_settings_is_ignored(caches, tmp_path, caplog):
    """A run preempted with one lr restarts from step 0 when asked for another."""
    args = run_args(caches, tmp_path)
    preempt(args, stop_at=4)
    steps = []
    hook = register_optimizer_step_post_hook(lambda *a: steps.append(1))
    try:
        train(caches, tmp_path, lr=1e-3)
    finally:
        hook.remove()
    assert len(steps) == STEPS and "ignoring checkpoint" in caplog.text and "settings" in caplog.text


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown training setting"):
        resolve_settings({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="must divide batch_size"):
        resolve_settings({"batch_size": 256, "micro_batch_size": 100})
    with pytest.raises(ValueError, match="unknown lora setting"):
        resolve_settings({"lora": {"rank": 4}})
    assert resolve_settings({"lora": {"r": 4}})["lora"] == {**resolve_settings({})["lora"], "r": 4}
    assert resolve_settings({"knn": {"k": 5}})["knn"]["k"] == [5]
    with pytest.raises(ValueError, match=r"probe\.iterations"):
        resolve_settings({"probe": {"iterations": 0}})
