"""One training run: a model, a mode and a cache in; config, history, predictions and metrics out.

The loop is written out once (nanoGPT / timm style) and every mode goes through it:

    finetune       every weight trains.
    linear         the backbone is frozen (and in eval mode); only the linear head trains. The backbone's
                   features of the train split are computed once and the head trains on them, batch by batch in
                   the same seeded order as the other modes: exactly the frozen backbone run every step, at a
                   fraction of the cost (so `augment` does not apply: the features are those of the cached
                   images as they are).
    knn            nothing trains: features of the train split vote for the eval images (knn.knn_predict).
    freeze_blocks  the stem (every backbone parameter registered before the first of `model.blocks`: patch or
                   stem embedding, class and position tokens) and the first `freeze_blocks` blocks are frozen.
    lora           peft LoRA adapters on the backbone's `lora.targets` (default: the model's `lora_targets`);
                   the base weights are frozen, the adapters and the head train.

A module whose parameters are all frozen runs in eval mode, so frozen BatchNorm statistics stay frozen too.

Optimisation follows the study's Hugging Face Trainer setup: AdamW over the trainable parameters with weight decay
on weight matrices only (biases and norm scales get none, as the Trainer does), a linear or cosine schedule with
warmup, cross-entropy. `batch_size` is the global batch; a smaller `micro_batch_size` splits it for memory and
accumulates gradients, with the loss scaled so that the step equals the full-batch step. Autocast (bf16) on CUDA.

Gradients are clipped to a total norm of `max_grad_norm` (the Trainer's default, 1.0; null: no clipping), over the
summed gradient of the whole optimizer step (after the all-reduce over ranks, before the step); `history.csv`
logs the norm before clipping (`grad_norm`). Optional flips and quarter turns (`augment`, augment.py) apply to
the uint8 batch on the device in the modes that train through the backbone.

Checkpoints (`checkpoint_dir/checkpoint.pt`, written to a temporary name then renamed) hold the model, optimizer,
scheduler, step, epoch, the position inside the epoch, the RNG states and the history so far, at every epoch end
and every `checkpoint_every_steps` steps. SIGTERM or SIGUSR1 (what SLURM sends before a time limit or a
preemption) only sets a flag: the loop finishes the optimizer step it is in, saves a checkpoint and raises
`Preempted`, so the job fails and a rerun resumes exactly where it stopped (same epoch order, the batches already
done skipped, RNG restored). A checkpoint serves only the run that wrote it: same settings, model and data, and
the same code (the fingerprint of this module's closure and the versions of the packages it imports), so a code
change or a new timm that makes Snakemake rerun a run trains it again. It is deleted once the run has written
its outputs: `results/checkpoints/` holds runs in progress only.

After training the final model scores the validation and the test split (predictions.parquet holds both,
metrics.json the test scores and the validation ones as `val_*`): validation chooses, test reports.

On N GPUs the job runs this under torchrun, one process per GPU (distributed.py): every step takes the same
global batch and micro batches as one process would, dealt to the ranks, with the gradients summed over them;
rank 0 writes the checkpoint and the outputs. Without torchrun it is one process, on one GPU or the CPU.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import augment, cache, distributed, flops, knn, metrics, models, subsample
from .fingerprint import code_fingerprint
from .loader import make_loader, normalize, step_batches

log = logging.getLogger(__name__)

MODES = ("finetune", "linear", "knn", "freeze_blocks", "lora")
SCHEDULES = ("linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
HISTORY_COLUMNS = ("step", "epoch", "lr", "train_loss", "grad_norm", "eval_loss", "eval_accuracy")
CHECKPOINT = "checkpoint.pt"
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
KNN_CHUNK = 1024

DEFAULTS: dict[str, Any] = {
    "mode": "finetune",
    "lr": 1e-5,
    "epochs": 3,
    "batch_size": 256,
    "micro_batch_size": None,  # None: the whole batch at once
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,  # the Hugging Face Trainer's default; None: no clipping
    "augment": [],  # any of augment.AUGMENTATIONS; the study used none
    "schedule": "linear",
    "warmup_ratio": 0.0,
    "min_lr_ratio": 0.0,  # cosine only: the floor, as a fraction of lr
    "seed": 0,
    "log_every": 1,
    "eval_every_epochs": 1,
    "checkpoint_every_steps": None,  # None: at each epoch end only
    "freeze_blocks": 0,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "targets": None},
    "knn": {"k": 20, "temperature": 0.07, "weighting": "exp"},
    "precision": "auto",
    "device": "auto",
    "n_bootstrap": 1000,
    "label_fraction": 1.0,  # share of the train split's labels used, as whole groups (subsample.py)
}


class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGUSR1 after saving a checkpoint; rerunning resumes from it."""


def resolve_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """DEFAULTS overlaid with `settings` (nested for lora and knn), checked; unknown keys are errors."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    resolved = copy.deepcopy(DEFAULTS)
    for key, value in settings.items():
        if isinstance(DEFAULTS[key], dict):
            extra = sorted(set(value or {}) - set(DEFAULTS[key]))
            if extra:
                raise ValueError(f"unknown {key} setting(s) {extra}; known: {sorted(DEFAULTS[key])}")
            resolved[key].update(value or {})
        else:
            resolved[key] = value
    s = resolved
    micro = s["micro_batch_size"] or s["batch_size"]
    checks = [
        (s["mode"] in MODES, f"mode must be one of {MODES}, got {s['mode']!r}"),
        (s["schedule"] in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {s['schedule']!r}"),
        (s["precision"] in PRECISIONS, f"precision must be one of {PRECISIONS}, got {s['precision']!r}"),
        (s["epochs"] >= 1 or s["mode"] == "knn", f"epochs must be >= 1, got {s['epochs']}"),
        (s["batch_size"] >= 1 and micro >= 1, "batch_size and micro_batch_size must be >= 1"),
        (
            s["batch_size"] % micro == 0,
            f"micro_batch_size {micro} must divide batch_size {s['batch_size']} (gradient accumulation)",
        ),
        (0 <= s["warmup_ratio"] < 1, f"warmup_ratio must be in [0, 1), got {s['warmup_ratio']}"),
        (0 <= s["min_lr_ratio"] <= 1, f"min_lr_ratio must be in [0, 1], got {s['min_lr_ratio']}"),
        (s["log_every"] >= 1 and s["eval_every_epochs"] >= 1, "log_every and eval_every_epochs must be >= 1"),
        (
            s["checkpoint_every_steps"] is None or s["checkpoint_every_steps"] >= 1,
            "checkpoint_every_steps must be >= 1 or null",
        ),
        (s["freeze_blocks"] >= 0, f"freeze_blocks must be >= 0, got {s['freeze_blocks']}"),
        (
            s["max_grad_norm"] is None or s["max_grad_norm"] > 0,
            f"max_grad_norm must be > 0 or null, got {s['max_grad_norm']}",
        ),
        (0 < s["label_fraction"] <= 1, f"label_fraction must be in (0, 1], got {s['label_fraction']}"),
    ]
    for ok, problem in checks:
        if not ok:
            raise ValueError(f"training settings: {problem}")
    try:
        resolved["augment"] = augment.check(s["augment"])
    except ValueError as err:
        raise ValueError(f"training settings: {err}") from None
    return resolved


# ----------------------------------------------------------------------------------------------------- device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    """A factory of autocast contexts: bf16 mixed precision, or nothing (fp32)."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------------------- modes


def _count_m(params: Iterator[nn.Parameter], trainable_only: bool = False) -> float:
    return sum(p.numel() for p in params if p.requires_grad or not trainable_only) / 1e6


def apply_lora(model: nn.Module, lora: dict[str, Any]) -> nn.Module:
    """LoRA adapters (peft) on the backbone's target modules; its base weights frozen, the head trainable.

    peft's inject_adapter_in_model (what get_peft_model does underneath, minus the PeftModel wrapper) adapts the
    backbone in place, so the Classifier keeps its head, attributes and readable state-dict names.
    """
    from peft import LoraConfig, inject_adapter_in_model  # imported here: only this mode needs peft

    targets = lora["targets"] or model.lora_targets  # the model raises LoraUnsupportedError if it has none
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=targets if isinstance(targets, str) else list(targets),  # a string is one regex
    )
    model.backbone = inject_adapter_in_model(config, model.backbone)  # marks only the adapters trainable
    model.head.requires_grad_(True)
    return model


def prepare_mode(model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """Set which parameters train, per the mode (Classifier.freeze: the stem is what precedes the first block)."""
    mode = settings["mode"]
    if mode in ("linear", "knn"):
        model.freeze()
        model.head.requires_grad_(mode == "linear")
    elif mode == "freeze_blocks":
        model.freeze(settings["freeze_blocks"])
    elif mode == "lora":
        model = apply_lora(model, settings["lora"])
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    log.info("mode %s: %d parameter tensors frozen (%s)", mode, len(frozen), _abbreviate(frozen))
    return model


def _abbreviate(names: list[str], n: int = 6) -> str:
    return (
        ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "") if names else "none"
    )


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except modules whose parameters are all frozen, which stay in eval mode."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; weight decay on matrices and kernels only (not biases, norm scales)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def lr_lambda(
    schedule: str, total_steps: int, warmup_steps: int, min_lr_ratio: float
) -> Callable[[int], float]:
    """LR multiplier per step: linear warmup from 0, then linear decay to 0 or cosine decay to min_lr_ratio.

    The same curves as transformers' get_linear_schedule_with_warmup and
    get_cosine_with_min_lr_schedule_with_warmup (what the study's Trainer used), without importing transformers.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ----------------------------------------------------------------------------------------- forward passes


@torch.no_grad()
def extract_features(
    model: nn.Module, loader, *, device: torch.device, autocast
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float32 features and (N,) labels of a whole split, in row order, on `device`."""
    model.eval()
    feats, labels, index = [], [], []
    for batch in tqdm(loader, desc="features", unit="batch", mininterval=5):
        x = normalize(batch["pixels"], model.mean, model.std, device=device)
        with autocast():
            feats.append(model.forward_features(x).float())
        labels.append(batch["labels"])
        index.append(batch["index"])
    order, feats = torch.cat(index).to(device), torch.cat(feats)
    out = torch.empty_like(feats)
    out[order] = feats
    out_labels = torch.empty(len(order), dtype=torch.int64, device=device)
    out_labels[order] = torch.cat(labels).to(device)
    return out, out_labels


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device, autocast) -> dict[str, Any]:
    """Mean cross-entropy, accuracy, and (N, C) probabilities + labels in row order, of a whole split."""
    model.eval()
    probs, labels, index = [], [], []
    loss_sum = 0.0
    for batch in tqdm(loader, desc="eval", unit="batch", mininterval=5):
        x = normalize(batch["pixels"], model.mean, model.std, device=device)
        y = batch["labels"].to(device)
        with autocast():
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        probs.append(torch.softmax(logits, dim=1).cpu())
        labels.append(batch["labels"])
        index.append(batch["index"])
    order = torch.cat(index)
    p, y = torch.empty_like(torch.cat(probs)), torch.empty_like(torch.cat(labels))
    p[order], y[order] = torch.cat(probs), torch.cat(labels)
    return {
        "loss": loss_sum / len(y),
        "accuracy": float((p.argmax(1) == y).double().mean()),
        "probs": p.double().numpy(),
        "labels": y.numpy(),
    }


# ----------------------------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors, lists and numbers, so torch.load(weights_only=True) reads it back."""
    np_state = np.random.get_state()  # noqa: NPY002 - the global RNG is what third-party code draws from
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))  # noqa: NPY002
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save leaves the previous checkpoint intact


def checkpoint_identity(**parts: Any) -> str:
    """What a checkpoint must match to be resumed: the run's parts (model, settings, data) and the code that
    trains it (this module's closure and the versions of the packages it imports), as canonical JSON."""
    parts["code"] = code_fingerprint(__name__)
    return json.dumps(parts, sort_keys=True, default=str)


def load_checkpoint(path: Path, identity: str) -> dict[str, Any] | None:
    """The checkpoint at `path` if it exists and was written by this very run and code, else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unreadable checkpoint must not block a fresh start
        log.warning("ignoring unreadable checkpoint %s (%s); starting from scratch", path, err)
        return None
    if state.get("identity") != identity:
        try:
            saved, wanted = json.loads(state.get("identity") or "{}"), json.loads(identity)
            differ = sorted(k for k in wanted.keys() | saved.keys() if saved.get(k) != wanted.get(k))
        except (TypeError, ValueError):
            differ = ["everything"]
        log.warning(
            "ignoring checkpoint %s: written for another %s; starting from scratch", path, ", ".join(differ)
        )
        return None
    return state


def remove_checkpoint(path: Path) -> None:
    """Delete a finished run's checkpoint, and its folders up the tree as long as they are empty."""
    path.unlink(missing_ok=True)
    with suppress(OSError):  # a parent holds other runs' checkpoints (or the folder is gone)
        os.removedirs(path.parent)


def _data_fingerprint(cache_dir: str | Path) -> str:
    """The cache's content, by the checksums of its shards: a rebuilt cache invalidates old checkpoints."""
    shards = sorted(s["sha256"] for s in cache.load_info(cache_dir)["shards"])
    return hashlib.sha256("".join(shards).encode()).hexdigest()


@contextmanager
def preemption_flag() -> Iterator[dict[str, str | None]]:
    """While inside, SIGTERM/SIGUSR1 only record their name in the yielded dict (see the module docstring)."""
    flag: dict[str, str | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():  # signals can only be caught there
        yield flag
        return

    def handler(signum, frame):
        flag["signal"] = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in PREEMPT_SIGNALS}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------------------------------- the run


def _eval_split(cache_dir: str | Path) -> str:
    rows = cache.load_info(cache_dir)["rows"]
    if "val" in rows:
        return "val"
    log.warning("%s has no val split: per-epoch evaluation uses the test split", cache_dir)
    return "test"


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    pd.DataFrame(rows, columns=list(HISTORY_COLUMNS)).to_csv(path, index=False)


def run_training(
    *,
    model_name: str,
    model_entry: dict,
    train_cache: str,
    eval_cache: str,
    run_dir: str,
    checkpoint_dir: str,
    settings: dict,
    resolution: int,
    splits: str,
    weights_path: str | None = None,
) -> dict:
    """Train (or, for knn, fit) one model per `settings`; write config.json, history.csv, predictions.parquet and
    metrics.json into run_dir (and the trained weights to `weights_path`, if given); return the metrics.
    `splits`: the splits table, for the lesion groups (bootstrap intervals, label fractions). Raises Preempted
    after checkpointing on SIGTERM/SIGUSR1.

    Under torchrun every rank calls this (distributed.py); rank 0 alone writes files and returns the metrics,
    the others return {} once training is done."""
    s = resolve_settings(settings)
    run_dir, ckpt_path = Path(run_dir), Path(checkpoint_dir) / CHECKPOINT
    run_dir.mkdir(parents=True, exist_ok=True)
    device = distributed.local_device(resolve_device(s["device"]))
    distributed.init(device)  # under torchrun: join the other ranks (distributed.py); else nothing
    precision = resolve_precision(s["precision"], device)
    autocast = autocast_for(device, precision)
    classes = list(cache.load_info(train_cache)["classes"])
    eval_classes = list(cache.load_info(eval_cache)["classes"])
    if classes != eval_classes:
        raise ValueError(f"train cache classes {classes} differ from eval cache classes {eval_classes}")
    eval_split = _eval_split(eval_cache)
    config = {
        "model": model_name,
        "model_entry": model_entry,
        "resolution": resolution,
        "train_cache": str(train_cache),
        "eval_cache": str(eval_cache),
        "eval_split_per_epoch": eval_split,
        "classes": classes,
        "checkpoint": str(ckpt_path),
        "settings": s,
        "device": str(device),
        "precision": precision,
        "world_size": distributed.world_size(),
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
    }
    if distributed.is_main():
        (run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    log.info("run %s: %s on %s (%s), mode %s", run_dir, model_name, device, precision, s["mode"])

    random.seed(s["seed"])
    np.random.seed(s["seed"])  # noqa: NPY002 - seeds the global RNG, for any third-party code drawing from it
    torch.manual_seed(s["seed"])  # before building: the new head's initial weights depend on it
    model = models.build_model(
        models.parse_spec(model_name, model_entry), num_classes=len(classes), resolution=resolution
    )
    # Cost figures of the architecture as deployed (LoRA adapters can be merged into the weights).
    gmacs = flops.count_gmacs(model, resolution)
    params_m = _count_m(model.parameters())
    model = prepare_mode(model, s).to(device)
    distributed.broadcast_model(model)
    trainable_m = _count_m(model.parameters(), trainable_only=True)
    log.info(
        "%.2fM parameters, %.3fM trainable, %.3f GMACs at %d px", params_m, trainable_m, gmacs, resolution
    )

    micro = s["micro_batch_size"] or s["batch_size"]
    # Label efficiency: only a seeded, grouped share of the train split (None: all of it).
    train_ids = subsample.train_subset(splits, s["label_fraction"], s["seed"])
    eval_loader = make_loader(eval_cache, eval_split, batch_size=micro, shuffle=False, seed=s["seed"])
    if s["mode"] == "knn":
        history, train = _fit_knn(
            model, s, train_cache, eval_loader, device=device, autocast=autocast, train_ids=train_ids
        )
    else:
        identity = checkpoint_identity(
            model=model_name,
            model_entry=model_entry,
            resolution=resolution,
            settings={k: v for k, v in s.items() if k != "n_bootstrap"},
            train_data=_data_fingerprint(train_cache),
            eval_data=_data_fingerprint(eval_cache),
        )
        history, train = _train(
            model,
            s,
            train_cache,
            eval_loader,
            ckpt_path,
            identity,
            device=device,
            autocast=autocast,
            train_ids=train_ids,
        )
    if not distributed.is_main():  # training is done; rank 0 evaluates and writes for the job
        return {}
    _write_history(run_dir / "history.csv", history)
    if weights_path is not None:
        save_weights(model, weights_path)

    predictions, evaluation = _final_evaluation(
        model, s, eval_cache, splits, train, classes, device=device, autocast=autocast
    )
    predictions.to_parquet(run_dir / "predictions.parquet", index=False)
    scores = metrics.compute_run_metrics(predictions, classes, n_bootstrap=s["n_bootstrap"], seed=s["seed"])
    extra = {
        "gmacs": gmacs,
        "params_m": params_m,
        "effective_input_px": model.effective_input_px,
        "peak_train_mem_mb": train["peak_mem_mb"],
        "peak_eval_mem_mb": evaluation["peak_mem_mb"],
        "train_img_per_s": train["images"] / train["seconds"] if train["seconds"] > 0 else None,
        "eval_img_per_s": len(predictions) / evaluation["seconds"] if evaluation["seconds"] > 0 else None,
        # What the rates divide: images through the model while training (kNN: the feature bank), and seconds.
        "train_images": train["images"],
        "train_seconds": train["seconds"],
        "mode": s["mode"],
        "trainable_params_m": trainable_m,
        "steps": train["steps"],
        "device": str(device),
        "precision": precision,
        "world_size": distributed.world_size(),
    }
    payload = metrics.write_metrics(run_dir / "metrics.json", scores, extra)
    log.info(
        "test accuracy %.4f, AUC %s (n=%d); val accuracy %s, AUC %s",
        scores["accuracy"],
        scores["auc"],
        scores["n_eval"],
        scores.get("val_accuracy"),
        scores.get("val_auc"),
    )
    remove_checkpoint(ckpt_path)  # the run is complete: its checkpoint would only go stale
    return payload


def _final_evaluation(
    model, s, eval_cache, splits, train, classes, *, device, autocast
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The final model's predictions on the val (if the cache has one) and test splits, with the full model on
    pixels (in linear and knn mode too: their eval cost is what deployment would pay), and the cost of it."""
    micro = s["micro_batch_size"] or s["batch_size"]
    groups = pd.read_parquet(splits, columns=["image_id", "group_id"]).set_index("image_id")["group_id"]
    frames = []
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    for split in [x for x in metrics.SPLITS if x in cache.load_info(eval_cache)["rows"]]:
        loader = make_loader(eval_cache, split, batch_size=micro, shuffle=False, seed=s["seed"])
        if s["mode"] == "knn":
            feats, _ = extract_features(model, loader, device=device, autocast=autocast)
            probs = _knn_probs(train["bank"], feats, s, len(classes))
            labels = loader.dataset.labels.numpy()
        else:
            result = evaluate(model, loader, device=device, autocast=autocast)
            probs, labels = result["probs"], result["labels"]
        ids = loader.dataset.image_ids
        if missing := sorted(set(ids) - set(groups.index)):
            raise ValueError(
                f"{len(missing)} {split} images of {eval_cache} are not in {splits}: {missing[:5]}"
            )
        frame = metrics.predictions_frame(
            ids, labels, probs, classes, group_ids=groups.loc[ids].tolist(), split=split
        )
        frames.append(frame)
    _sync(device)
    cost = {"seconds": time.perf_counter() - start, "peak_mem_mb": _peak_mb(device)}
    return pd.concat(frames, ignore_index=True), cost


def save_weights(model: nn.Module, path: str | Path) -> None:
    """The trained model's state dict as safetensors (written to a temporary name, then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, path)


def _knn_probs(
    bank: tuple[torch.Tensor, torch.Tensor], query: torch.Tensor, s: dict, n_classes: int
) -> np.ndarray:
    feats, labels = bank
    probs = knn.knn_predict(
        feats,
        labels,
        query,
        num_classes=n_classes,
        k=s["knn"]["k"],
        temperature=s["knn"]["temperature"],
        weighting=s["knn"]["weighting"],
        chunk_size=KNN_CHUNK,
    )
    return probs.double().cpu().numpy()


def _fit_knn(
    model, s, train_cache, eval_loader, *, device, autocast, train_ids=None
) -> tuple[list[dict], dict]:
    """kNN "training": the train split's features are the classifier; one history row scores it on eval."""
    micro = s["micro_batch_size"] or s["batch_size"]
    loader = make_loader(
        train_cache, "train", batch_size=micro, shuffle=False, seed=s["seed"], image_ids=train_ids
    )
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    bank = extract_features(model, loader, device=device, autocast=autocast)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = _peak_mb(device)
    feats, labels = extract_features(model, eval_loader, device=device, autocast=autocast)
    probs = _knn_probs(bank, feats, s, len(eval_loader.dataset.classes))
    accuracy = float((probs.argmax(1) == labels.cpu().numpy()).mean())
    log.info("kNN on %s: accuracy %.4f", eval_loader.dataset.split, accuracy)
    # kNN votes are often exactly 0 for the true class, so no eval_loss (cross-entropy) is reported.
    history = [{"step": 0, "epoch": 0.0, "eval_accuracy": accuracy}]
    # Its "training" is the feature bank: train images over the time taken to extract them.
    images = len(bank[1])
    return history, {"bank": bank, "seconds": seconds, "images": images, "peak_mem_mb": peak, "steps": 0}


def _train(
    model, s, train_cache, eval_loader, ckpt_path, identity, *, device, autocast, train_ids=None
) -> tuple[list[dict], dict]:
    """The training loop, resuming from `ckpt_path` when it holds this run; returns (history, train stats).

    With N ranks (distributed.py) each takes every N-th micro batch of a step; unset, a micro batch is a 1/N share.
    """
    micro = s["micro_batch_size"] or math.ceil(s["batch_size"] / distributed.world_size())
    loader = make_loader(
        train_cache, "train", batch_size=micro, shuffle=True, seed=s["seed"], image_ids=train_ids
    )
    steps_per_epoch = math.ceil(len(loader.dataset) / s["batch_size"])
    total_steps = steps_per_epoch * s["epochs"]
    warmup = math.ceil(s["warmup_ratio"] * total_steps)

    optimizer = torch.optim.AdamW(param_groups(model, s["weight_decay"]), lr=s["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(s["schedule"], total_steps, warmup, s["min_lr_ratio"])
    )
    state = {
        "step": 0,
        "epoch": 0,
        "batches_done": 0,  # global batches (optimizer steps) of `epoch` already trained on
        "history": [],
        "loss_window": [0.0, 0.0, 0],  # sums of step losses and gradient norms, and steps, since the last row
        "seconds": 0.0,
        "images": 0,
        "peak_mem_mb": None,
    }
    ckpt = load_checkpoint(ckpt_path, identity)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        # Each rank's own RNG; a run resumed on another number of GPUs uses rank 0's.
        rank_rng = ckpt.get("rank_rng", [])
        restore_rng_state(
            rank_rng[distributed.rank()] if len(rank_rng) == distributed.world_size() else ckpt["rng"]
        )
        state = ckpt["state"]
        log.info(
            "resuming from %s: step %d, epoch %d, %d steps into it",
            ckpt_path,
            state["step"],
            state["epoch"],
            state["batches_done"],
        )

    def checkpoint() -> None:
        rngs = distributed.gather_objects(rng_state())
        if distributed.is_main():  # the ranks hold identical weights and state (distributed.py)
            save_checkpoint(
                ckpt_path,
                {
                    "identity": identity,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rngs[0],
                    "rank_rng": rngs,
                    "state": state,
                },
            )
        distributed.barrier()  # no rank exits (or goes on) before the checkpoint is on disk

    # Linear probing: the frozen backbone's features, once (see the module docstring).
    features = None
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    if s["mode"] == "linear" and state["epoch"] < s["epochs"]:
        plain = make_loader(
            train_cache,
            "train",
            batch_size=micro,
            shuffle=False,
            seed=s["seed"],
            verify=False,
            image_ids=train_ids,
        )
        features, _ = extract_features(model, plain, device=device, autocast=autocast)

    trainable = [p for p in model.parameters() if p.requires_grad]
    max_norm = s["max_grad_norm"] or math.inf  # inf: measure the norm, clip nothing
    draws = None  # this epoch's augmentation draws, per dataset row (augment.py)

    def forward(batch) -> torch.Tensor:
        if features is not None:
            return model.head(features[batch["index"].to(device)])
        pixels = batch["pixels"].to(device, non_blocking=True)
        if draws is not None:
            pixels = augment.apply(pixels, draws[batch["index"]])
        return model(normalize(pixels, model.mean, model.std))

    bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", mininterval=5)
    with preemption_flag() as flag, bar:
        for epoch in range(state["epoch"], s["epochs"]):
            loader.set_epoch(epoch)
            if s["augment"] and features is None:
                draws = augment.epoch_draws(len(loader.dataset), s["seed"], epoch, s["augment"])
            elif s["augment"] and epoch == state["epoch"]:
                log.warning("augment %s does not apply to linear probes on frozen features", s["augment"])
            set_train_mode(model)
            steps = step_batches(
                loader, s["batch_size"], rank=distributed.rank(), world_size=distributed.world_size()
            )
            for step_size, micro_batches in itertools.islice(steps, state["batches_done"], None):
                step_loss = torch.zeros((), device=device)
                for batch in micro_batches:
                    # Sum over the micro batch / size of the whole step: the summed gradient is the mean.
                    y = batch["labels"].to(device)
                    with autocast():
                        logits = forward(batch)
                    loss = F.cross_entropy(logits.float(), y, reduction="sum") / step_size
                    loss.backward()
                    step_loss += loss.detach()
                distributed.all_reduce_gradients(model.parameters())
                # On the summed gradient of the whole step (every rank holds the same one), before the step.
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm).item()
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                distributed.sync_buffers(model)
                # One exchange per step: the step's loss over all ranks, and whether any rank was signalled.
                loss_sum, signalled = distributed.sum_over_ranks(
                    [step_loss.item(), bool(flag["signal"])], device
                )
                flag["signal"] = flag["signal"] or ("a signal to another rank" if signalled else None)
                state["step"] += 1
                state["batches_done"] += 1
                state["images"] += step_size
                window = state["loss_window"]
                window[0], window[1], window[2] = window[0] + loss_sum, window[1] + grad_norm, window[2] + 1
                bar.update()
                if state["step"] % s["log_every"] == 0:
                    mean_loss, mean_norm = window[0] / window[2], window[1] / window[2]
                    state["loss_window"] = [0.0, 0.0, 0]
                    state["history"].append(
                        {
                            "step": state["step"],
                            "epoch": state["step"] / steps_per_epoch,
                            "lr": lr,
                            "train_loss": mean_loss,
                            "grad_norm": mean_norm,
                        }
                    )
                    log.info(
                        "step %d/%d lr %.3g train_loss %.4f grad_norm %.3g",
                        state["step"],
                        total_steps,
                        lr,
                        mean_loss,
                        mean_norm,
                    )
                every = s["checkpoint_every_steps"]
                if flag["signal"] or (every and state["step"] % every == 0):
                    _account(state, start, device)
                    checkpoint()
                    start = time.perf_counter()
                if flag["signal"]:
                    raise Preempted(
                        f"{flag['signal']} at step {state['step']}: checkpoint saved to {ckpt_path}"
                    )

            _account(state, start, device)
            if (epoch + 1) % s["eval_every_epochs"] == 0 or epoch + 1 == s["epochs"]:
                result = evaluate(model, eval_loader, device=device, autocast=autocast)
                row = {"step": state["step"], "epoch": float(epoch + 1)}
                state["history"].append(
                    {**row, "eval_loss": result["loss"], "eval_accuracy": result["accuracy"]}
                )
                log.info(
                    "epoch %d: eval_loss %.4f eval_accuracy %.4f",
                    epoch + 1,
                    result["loss"],
                    result["accuracy"],
                )
            state["epoch"], state["batches_done"] = epoch + 1, 0
            checkpoint()
            flag["signal"] = flag["signal"] or (
                "a signal to another rank"
                if distributed.sum_over_ranks([bool(flag["signal"])], device)[0]
                else None
            )
            if flag["signal"]:
                raise Preempted(f"{flag['signal']} after epoch {epoch + 1}: checkpoint saved to {ckpt_path}")
            start = time.perf_counter()
    return state["history"], {**state, "steps": state["step"]}


def _account(state: dict[str, Any], start: float, device: torch.device) -> None:
    """Add the training time since `start` and the peak memory so far to the run's totals."""
    _sync(device)
    state["seconds"] += time.perf_counter() - start
    peak = _peak_mb(device)
    if peak is not None:
        state["peak_mem_mb"] = max(peak, state["peak_mem_mb"] or 0.0)
