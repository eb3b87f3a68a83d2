"""Probes on frozen features (features.py): linear heads as DINOv2's eval/linear.py, kNN as its eval/knn.py.

Linear (rule `linear`, on the CPU): the train split's features (of the run's label fraction) train one linear
head per learning rate of `training.probe.learning_rates` at once, on the same feature batches, with one SGD
optimizer (momentum 0.9, a parameter group per head), a cosine schedule over a fixed number of `iterations`, and
heads initialised as DINOv2's (weights N(0, 0.01), bias 0). The rates are for a batch of 256 and scale with
`probe.batch_size / 256`, as DINOv2 scales them; every head starts from the same draw. Every head is scored on the validation split of the training
variant; the best validation AUC (ties: validation balanced accuracy) is the run's head (`head.safetensors`),
and `probe.csv` lists every head's validation scores, so the choice can be checked. The test split plays no
part in it.

kNN: L2-normalised features, each query's k nearest training features voting with softmax(similarity / T)
(knn.py); several k at once (`training.knn.k`), the one scoring best on the training variant's validation split
kept, by the same rule.

Evaluation (rules `evaluate_probe__<variants>`, one job per run on all its eval variants): the run's head, or
the kNN bank, loaded once, scores the val and test features of each eval variant; predictions.parquet and
metrics.json as every evaluation writes them (metrics.write_evaluation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from dermcompress.data import integrity, subsample
from dermcompress.data.loader import PERMUTATION, epoch_generator

from . import knn, metrics
from .features import Features, read_features
from .phases import Phases
from .runs import HISTORY_COLUMNS
from .settings import resolve_settings

log = logging.getLogger(__name__)

PROBE_COLUMNS = ("lr", "val_loss", "val_accuracy", "val_auc", "val_balanced_accuracy", "chosen")
KNN_CHUNK = 1024


def selection_score(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """What chooses among a probe's heads or k's: (validation AUC, validation balanced accuracy), higher better;
    an undefined AUC counts as -inf."""
    from sklearn.metrics import balanced_accuracy_score  # where scored: not at every probe job's start-up

    auc = metrics.auc_score(labels, probs)
    return (-math.inf if auc is None else auc, float(balanced_accuracy_score(labels, probs.argmax(1))))


def _batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of row indices: seeded permutations of the rows, one after another (an epoch each)."""
    for epoch in range(2**62):
        order = torch.randperm(n, generator=epoch_generator(seed, epoch, stream=PERMUTATION))
        yield from order.split(batch_size)


def train_heads(
    train: Features, probe: dict[str, Any], *, seed: int
) -> tuple[nn.ModuleList, list[list[float]]]:
    """One linear head per learning rate, trained together on the same batches; and each step's losses."""
    dim, n_classes = train.features.shape[1], len(train.classes)
    heads = nn.ModuleList(nn.Linear(dim, n_classes) for _ in probe["learning_rates"])
    with torch.no_grad():  # every head starts from the same draw: the rates alone differ
        start = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(seed)) * 0.01
        for head in heads:
            head.weight.copy_(start)
            head.bias.zero_()
    scale = probe["batch_size"] / 256
    optimizer = torch.optim.SGD(
        [
            {"params": h.parameters(), "lr": lr * scale}
            for h, lr in zip(heads, probe["learning_rates"], strict=True)
        ],
        momentum=probe["momentum"],
        weight_decay=probe["weight_decay"],
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, probe["iterations"], eta_min=0)
    losses = []
    batches = _batches(len(train.labels), probe["batch_size"], seed)
    for _ in range(probe["iterations"]):
        index = next(batches)
        x, y = train.features[index], train.labels[index]
        step = [F.cross_entropy(head(x), y) for head in heads]
        torch.stack(step).sum().backward()  # independent heads: each gets its own loss's gradient
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append([loss.item() for loss in step])
    return heads, losses


@torch.no_grad()
def head_probs(head: nn.Module, feats: torch.Tensor) -> np.ndarray:
    return torch.softmax(head(feats), dim=1).double().numpy()


def run_linear(
    *, train_features: str, val_features: str, splits: str, settings: dict, run_dir: str
) -> dict[str, Any]:
    """A linear probe run: heads trained on `train_features` (the run's label fraction), the best on
    `val_features` kept -> head.safetensors, probe.csv, history.csv, config.json, train.json in run_dir."""
    phases = Phases.from_process_start()
    s = resolve_settings(settings)
    probe, run_dir = s["probe"], Path(run_dir)
    with phases("setup"):
        train = read_features(train_features, subsample.train_subset(splits, s["label_fraction"], s["seed"]))
        val = read_features(val_features)
    with phases("train"):
        heads, losses = train_heads(train, probe, seed=s["seed"])
    scores = []
    for lr, head in zip(probe["learning_rates"], heads, strict=True):
        probs = head_probs(head, val.features)
        loss = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), val.labels))
        accuracy = float((probs.argmax(1) == val.labels.numpy()).mean())
        scores.append(
            {
                "lr": lr,
                "val_loss": loss,
                "val_accuracy": accuracy,
                "score": selection_score(val.labels.numpy(), probs),
            }
        )
    best = max(range(len(scores)), key=lambda i: scores[i]["score"])  # first of equals: the smaller rate
    log.info(
        "probe: lr %g chosen on val (AUC %.4f, balanced accuracy %.4f)",
        scores[best]["lr"],
        *scores[best]["score"],
    )
    with phases("writing"):
        run_dir.mkdir(parents=True, exist_ok=True)
        chosen = heads[best]
        head = {"weight": chosen.weight.detach().contiguous(), "bias": chosen.bias.detach().contiguous()}
        integrity.write_bytes(
            run_dir / "head.safetensors",
            safetensors.torch.save(head, metadata={"lr": str(scores[best]["lr"])}),
        )
        _write_probe_table(run_dir / "probe.csv", scores, best)
        _write_history(
            run_dir / "history.csv", losses, best, probe, len(train.labels), scores[best], s["log_every"]
        )
        trainable = sum(p.numel() for p in chosen.parameters())
        summary = _probe_summary(train, s, seconds=phases.seconds["train"], trainable=trainable)
        summary["probe_lr"] = scores[best]["lr"]
        summary["wall_seconds"] = phases.summary()
        integrity.write_json(run_dir / "train.json", summary)
        config = {
            "mode": "linear",
            "train_features": train_features,
            "val_features": val_features,
            "classes": train.classes,
            "settings": s,
        }
        integrity.write_json(run_dir / "config.json", config, default=str)
    phases.log()
    return summary


def _write_probe_table(path: Path, scores: list[dict], best: int) -> None:
    rows = [
        {
            "lr": x["lr"],
            "val_loss": x["val_loss"],
            "val_accuracy": x["val_accuracy"],
            "val_auc": x["score"][0],
            "val_balanced_accuracy": x["score"][1],
            "chosen": i == best,
        }
        for i, x in enumerate(scores)
    ]
    pd.DataFrame(rows, columns=list(PROBE_COLUMNS)).replace(-math.inf, np.nan).to_csv(path, index=False)


def _write_history(path, losses, best, probe, n_train, score, log_every) -> None:
    """The chosen head's curve in history.csv's columns: its loss every `log_every` steps, then its val row."""
    steps_per_epoch = max(1, math.ceil(n_train / probe["batch_size"]))
    lr0 = probe["learning_rates"][best] * probe["batch_size"] / 256
    rows = []
    for start in range(0, len(losses), log_every):
        window = [step[best] for step in losses[start : start + log_every]]
        step = start + len(window)
        lr = lr0 * 0.5 * (1 + math.cos(math.pi * (step - 1) / probe["iterations"]))
        rows.append(
            {"step": step, "epoch": step / steps_per_epoch, "lr": lr, "train_loss": float(np.mean(window))}
        )
    rows.append(
        {
            "step": len(losses),
            "epoch": len(losses) / steps_per_epoch,
            "eval_loss": score["val_loss"],
            "eval_accuracy": score["val_accuracy"],
        }
    )
    pd.DataFrame(rows, columns=list(HISTORY_COLUMNS)).to_csv(path, index=False)


def _probe_summary(bank: Features, s: dict, *, seconds: float, trainable: int) -> dict[str, Any]:
    """train.json of a probe: the backbone's figures from its features, the cost of the train features (and of
    fitting the probe, `seconds`)."""
    meta = bank.meta
    train_seconds = meta["seconds"] * len(bank.labels) / max(1, meta["images"]) + seconds
    return {
        "gmacs": meta["gmacs"],
        "params_m": meta["params_m"],
        "effective_input_px": meta["effective_input_px"],
        "trainable_params_m": trainable / 1e6,
        "peak_train_mem_mb": meta["peak_mem_mb"],
        "train_images": len(bank.labels),
        "train_seconds": train_seconds,
        "train_img_per_s": len(bank.labels) / train_seconds if train_seconds > 0 else None,
        "steps": s["probe"]["iterations"] if s["mode"] == "linear" else 0,
        "mode": s["mode"],
    }


def knn_probs(bank: Features, query: Features, s: dict, k: int) -> np.ndarray:
    probs = knn.knn_predict(
        bank.features,
        bank.labels,
        query.features,
        num_classes=len(bank.classes),
        k=k,
        temperature=s["knn"]["temperature"],
        weighting=s["knn"]["weighting"],
        chunk_size=KNN_CHUNK,
    )
    return probs.double().cpu().numpy()


def run_probe_evaluations(
    *,
    mode: str,
    evaluations: dict[str, tuple[dict[str, str], str]],
    splits: str,
    settings: dict,
    head: str | None = None,
    train_summary: str | None = None,
    bank_features: str | None = None,
    choose_features: str | None = None,
) -> dict[str, dict]:
    """A linear probe's head (`head`, `train_summary`) or a kNN bank (`bank_features`, k chosen on
    `choose_features`), loaded once, scored on each eval variant's features ({variant: ({split: features file},
    out_dir)}, val and test) -> predictions.parquet and metrics.json in each out_dir; the metrics by variant."""
    phases = Phases.from_process_start()
    s = resolve_settings(settings)
    with phases("setup"):
        if mode == "linear":
            tensors = safetensors.torch.load(integrity.read_bytes(head))
            classifier = nn.Linear(tensors["weight"].shape[1], tensors["weight"].shape[0])
            classifier.load_state_dict(tensors)
            train = integrity.read_json(train_summary)
        else:
            bank = read_features(
                bank_features, subsample.train_subset(splits, s["label_fraction"], s["seed"])
            )
    if mode == "knn":
        with phases("evaluate"):
            k, chosen = _choose_k(bank, read_features(choose_features), s)
        train = {**_probe_summary(bank, s, seconds=0.0, trainable=0), "knn_k": k, "knn_val_scores": chosen}

    def probs_of(query: Features) -> np.ndarray:
        return head_probs(classifier, query.features) if mode == "linear" else knn_probs(bank, query, s, k)

    payloads = {}
    for variant, (eval_features, out_dir) in evaluations.items():
        own = phases.fork()  # the shared start-up, set-up and choice of k, then this variant's scoring
        log.info("eval variant %s: %s", variant, ", ".join(eval_features.values()))
        with phases("evaluate"), own("evaluate"):
            queries = {split: read_features(path) for split, path in eval_features.items()}
            frames = [_predictions(q, probs_of(q), splits, split) for split, q in queries.items()]
        test = queries["test"].meta
        cost = {
            "peak_eval_mem_mb": test["peak_mem_mb"],
            "eval_img_per_s": test["img_per_s"],
            "device": test["device"],
            "precision": test["precision"],
        }
        with phases("writing"), own("writing"):
            payloads[variant] = metrics.write_evaluation(
                out_dir,
                pd.concat(frames, ignore_index=True),
                queries["test"].classes,
                s,
                train=train,
                cost=cost,
                phases=own,
            )
    phases.log()
    return payloads


def _choose_k(bank: Features, val: Features, s: dict) -> tuple[int, dict[str, list[float]]]:
    """The k of `knn.k` whose votes score best on `val` (the training variant's validation split)."""
    scores = {k: selection_score(val.labels.numpy(), knn_probs(bank, val, s, k)) for k in s["knn"]["k"]}
    best = max(scores, key=lambda k: scores[k])
    log.info("kNN: k = %d chosen on val (AUC %.4f, balanced accuracy %.4f)", best, *scores[best])
    return best, {str(k): list(v) for k, v in scores.items()}


def _predictions(query: Features, probs: np.ndarray, splits: str, split: str) -> pd.DataFrame:
    groups = metrics.group_ids(splits, query.image_ids, f"{query.meta['cache']}/{split}")
    return metrics.predictions_frame(
        query.image_ids, query.labels.numpy(), probs, query.classes, group_ids=groups, split=split
    )
