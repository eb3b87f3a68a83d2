"""Training throughput: the project's own loop (train.run_training) against the Hugging Face Trainer.

Issue 3 allows a loop of our own instead of the study's Trainer "if you can show it is simpler or faster". In the
same run, on the same synthetic cache (balanced 2 classes, NV brighter than MEL, as tests/test_train.py's fixture;
written with write_pixel_table + run_cache into a temporary folder) and the same model (a registry Classifier
built by dermcompress.learn.models from the same seed, so both start from identical weights), with the same settings
(finetune, AdamW, weight decay 0.01, batch 64, a linear schedule without warmup, fp32 on CPU, a loss logged every
step, gradients clipped to norm 1.0 as the study's Trainer did, no evaluation during training), alternately,
`--repeats` times each:

- ours: run_training(mode="finetune") as the workflow calls it. Timed from the outside as it is (model build,
  GMACs count, reading and verifying the cache, training, the one evaluation it does after the last epoch on the
  64-image val split, checkpoints, the final val and test evaluations of 64 images each and metrics.json):
  nothing subtracted.
  `loop img/s` is its own `train_img_per_s` from metrics.json (the training steps only).
- trainer: transformers.Trainer on the same Classifier, wrapped to return {"loss", "logits"}, fed by a torch
  Dataset over the same cached pixels (read and verified the same way) that normalizes one image per item, with
  TrainingArguments per_device_train_batch_size, num_train_epochs, learning_rate, weight_decay=0.01,
  lr_scheduler_type="linear", max_grad_norm=1.0 (the Trainer's default, and run_training's), logging_steps=1,
  report_to="none", save_strategy="no", eval_strategy="no", dataloader_num_workers=0, use_cpu=True, seed; the
  optimizer is the Trainer's default; its train sampler yields the cache loader's order of each epoch
  (EpochOrder), so both see the same batches. The wall time covers building the model, the dataset, the
  Trainer and train(); `loop img/s` is the Trainer's own train_samples_per_second (its training loop only).

    .venv/bin/python benchmarks/train_loop.py [--model timm:resnet10t] [--res 56] [--n-train 512] [--epochs 2]
        [--repeats 3] [--threads 1]

Prints, per run, images/s of the training loop and of the whole call, the mean train loss over all steps and the
last step's loss; then the best of each path, the ratios ours / Trainer, and the per-step losses and gradient
norms of the first run side by side. Both paths do the same job: the same initial weights, the same batches in
the same order and the same clipping, so the losses agree up to floating-point differences. Benchmarks CPU code under
whatever else the machine runs: repeat, and read the range. TQDM_DISABLE=1 silences the progress bars on stderr.

Known differences that do not change the work done: the Trainer's default optimizer is torch's fused AdamW,
run_training's torch's default (foreach) AdamW, the same update; the Trainer exempts from weight decay biases and
parameters named like norms (LayerNorm, `norm1`), run_training every parameter with fewer than 2 dims: for ViTs
the groups are the same, for ResNets the Trainer also decays BatchNorm scales (`bn1.weight`). Work the Trainer
does that run_training does not, and that is part of its cost: per-item fetch and collate, and a gc.collect at
the start of train() (in its wall time, not in its loop time).
"""

from __future__ import annotations

import argparse
import inspect
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from dermcompress.data.cache_write import run_cache
from dermcompress.data.loader import CacheDataset, make_loader, normalize
from dermcompress.data.pixeltable import write_pixel_table
from dermcompress.learn import loop, models, train

CLASSES = ["MEL", "NV"]
N_HELD_OUT = 64  # val and test images each: run_training evaluates on them, the Trainer does not


def make_cache(root: Path, n_train: int, res: int, seed: int = 0) -> Path:
    """A cache of n_train train + 64 val + 64 test images, balanced, NV brighter than MEL (learnable)."""
    rng = np.random.default_rng(seed)
    splits = ["train"] * n_train + ["val"] * N_HELD_OUT + ["test"] * N_HELD_OUT
    labels = np.arange(len(splits)) % 2
    base = np.where(labels == 1, 150, 40)[:, None, None, None]
    pixels = (base + rng.integers(0, 70, (len(splits), res, res, 3))).astype(np.uint8)
    meta = pd.DataFrame(
        {
            "image_id": [f"ISIC_{i:07d}" for i in rng.permutation(len(splits))],
            "label": [CLASSES[i] for i in labels],
            "split": splits,
            "degradation": "none",
            "degradation_params": "{}",
        }
    )
    table = root / "degraded.parquet"
    write_pixel_table(table, meta, pixels, metadata={"resolution": str(res), "variant": "clean"})
    # Every image its own lesion group: run_training reads the groups for its bootstrap intervals.
    meta.assign(group_id=meta["image_id"])[["image_id", "group_id", "label", "split"]].to_parquet(
        root / "splits.parquet", index=False
    )
    run_cache(degraded=table, out_dir=root / "cache", classes=CLASSES, rows_per_shard=2048, row_group_size=64)
    return root / "cache"


def run_ours(cache: Path, out: Path, args: argparse.Namespace) -> dict:
    settings = {
        "mode": "finetune",
        "lr": args.lr,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "schedule": "linear",
        "seed": args.seed,
        "log_every": 1,
        "eval_every_epochs": args.epochs,  # only the evaluation after the last epoch, which it always does
        "precision": "fp32",
        "device": "cpu",
        "n_bootstrap": 100,
    }
    start = time.perf_counter()
    result = train.run_training(
        model_name="bench",
        model_entry={"source": args.model, "pretrained": False},
        train_cache=str(cache),
        eval_cache=str(cache),
        run_dir=str(out / "run"),
        checkpoint_dir=str(out / "ckpt"),
        settings=settings,
        resolution=args.res,
        splits=str(cache.parent / "splits.parquet"),
    )
    wall = time.perf_counter() - start
    history = pd.read_csv(out / "run" / "history.csv").dropna(subset=["train_loss"])
    return {
        "loop": result["train_img_per_s"],
        "wall": wall,
        "losses": history.train_loss.tolist(),
        "grad_norms": history.grad_norm.tolist(),
        "mean_loss": float(history.train_loss.mean()),
        "steps": result["steps"],
    }


# ------------------------------------------------------------------------------- the Trainer path (its glue)


class PixelDataset(Dataset):
    """The cached train split as the Trainer wants it: item i -> {"pixel_values": normalized float, "labels"}."""

    def __init__(self, cache: Path, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.data = CacheDataset(cache, "train")
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": normalize(self.data.pixels[i], self.mean, self.std),
            "labels": self.data.labels[i],
        }


class EpochOrder(torch.utils.data.Sampler):
    """The Trainer's train sampler: each epoch, the cache loader's seeded order (loader.BatchLoader)."""

    def __init__(self, cache: Path, seed: int) -> None:
        self.loader = make_loader(cache, "train", batch_size=1, shuffle=True, seed=seed, verify=False)

    def set_epoch(self, epoch: int) -> None:  # accelerate calls it before each epoch
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def __iter__(self):
        return iter(self.loader.indices().tolist())


class OrderedTrainer(Trainer):
    """transformers' Trainer with the cache loader's epoch order (otherwise exactly the Trainer)."""

    def __init__(self, *args, order: EpochOrder, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.order = order

    def _get_train_sampler(self, train_dataset=None):
        return self.order


class WithLoss(nn.Module):
    """A Classifier -> the Trainer's model contract: forward(pixel_values, labels) -> {"loss", "logits"}."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = self.classifier(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels)
        return out


def run_trainer(cache: Path, out: Path, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    # Seeded as run_training seeds before building: the same initial weights.
    random.seed(args.seed)
    np.random.seed(args.seed)  # noqa: NPY002 - the global RNG, as run_training seeds it
    torch.manual_seed(args.seed)
    spec = models.parse_spec("bench", {"source": args.model, "pretrained": False})
    classifier = models.build_model(spec, num_classes=len(CLASSES), resolution=args.res)
    dataset = PixelDataset(cache, classifier.mean, classifier.std)
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = OrderedTrainer(
        model=WithLoss(classifier),
        args=training_args,
        train_dataset=dataset,
        order=EpochOrder(cache, args.seed),
    )
    for callback in (PrinterCallback, ProgressCallback):  # no per-step printing
        trainer.remove_callback(callback)
    output = trainer.train()
    wall = time.perf_counter() - start
    logged = [row for row in trainer.state.log_history if "loss" in row]
    return {
        "loop": output.metrics["train_samples_per_second"],
        "wall": wall,
        "losses": [row["loss"] for row in logged],
        "grad_norms": [row["grad_norm"] for row in logged],
        "mean_loss": output.metrics["train_loss"],
        "steps": output.global_step,
        "optim": training_args.optim,
    }


# ---------------------------------------------------------------------------------------------------- report


def line_counts() -> str:
    """The two code paths' sizes, measured from their source; empty if that source changed since import."""
    objects = {
        "Loop": loop.Loop,
        "train": loop.train,
        "run_training": train.run_training,
        "PixelDataset": PixelDataset,
        "EpochOrder": EpochOrder,
        "OrderedTrainer": OrderedTrainer,
        "WithLoss": WithLoss,
        "run_trainer": run_trainer,
    }
    if any(obj is None for obj in objects.values()):
        return ""
    sources = {name: inspect.getsourcelines(obj)[0] for name, obj in objects.items()}
    # inspect reads the file now but took line numbers at import: a file edited since then gives wrong counts.
    if not all(f" {name}" in lines[0] for name, lines in sources.items()):
        return ""
    n = {name: len(lines) for name, lines in sources.items()}
    ours = n["Loop"] + n["train"]
    glue = sum(
        n[name] for name in ("PixelDataset", "EpochOrder", "OrderedTrainer", "WithLoss", "run_trainer")
    )
    trainer_py = len(Path(inspect.getsourcefile(Trainer)).read_text().splitlines())
    return (
        f"Lines: our loop (loop.Loop and loop.train) is {ours} (the steps plus checkpoint/resume and SIGTERM/SIGUSR1"
        f" handling; run_training around it, {n['run_training']} more, adds setup, validation and outputs); the"
        f" Trainer glue here (PixelDataset, EpochOrder, OrderedTrainer, WithLoss, run_trainer) is {glue}, for"
        " training only, on top of"
        f" transformers' trainer.py ({trainer_py} lines)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="timm:resnet10t", help="timm:NAME, random init (e.g. timm:test_vit)"
    )
    parser.add_argument("--res", type=int, default=56)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each path, alternating; the best counts"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, for both paths. 1 by default: on a small shared machine OpenMP's barriers wait for"
        " threads the OS has descheduled, which makes the timings erratic (and here slower), not faster",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = line_counts()  # now, before the runs give anyone time to edit train.py
    transformers.logging.set_verbosity_error()
    steps = args.epochs * -(-args.n_train // args.batch_size)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads;"
        f" {args.model} (random init) at {args.res} px, {args.n_train} train images, {len(CLASSES)} classes,"
        f" batch {args.batch_size}, {args.epochs} epochs ({steps} steps), AdamW lr {args.lr:g} wd 0.01, linear"
        " schedule, gradients clipped to norm 1.0, fp32 on CPU"
    )
    runs: dict[str, list[dict]] = {"run_training": [], "Trainer": []}
    images = args.n_train * args.epochs
    print(
        f"{'run':>3}  {'path':<12} {'loop img/s':>10} {'wall s':>7} {'wall img/s':>10} {'mean loss':>9} {'last loss':>9}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = make_cache(root, args.n_train, args.res, args.seed)
        for rep in range(args.repeats):
            for name, fn in (("run_training", run_ours), ("Trainer", run_trainer)):
                result = fn(cache, root / f"{name}_{rep}", args)
                assert result["steps"] == steps == len(result["losses"]), (name, result["steps"], steps)
                runs[name].append(result)
                print(
                    f"{rep + 1:>3}  {name:<12} {result['loop']:>10,.1f} {result['wall']:>7.2f}"
                    f" {images / result['wall']:>10,.1f} {result['mean_loss']:>9.5f} {result['losses'][-1]:>9.5f}",
                    flush=True,
                )
    ours, theirs = runs["run_training"], runs["Trainer"]
    best = {name: max(r["loop"] for r in rs) for name, rs in runs.items()}
    best_wall = {name: min(r["wall"] for r in rs) for name, rs in runs.items()}
    ratios = [o["loop"] / t["loop"] for o, t in zip(ours, theirs, strict=True)]
    print(
        f"Trainer optimizer: {theirs[0]['optim']}; run_training: torch.optim.AdamW (its default implementation)"
    )
    print(
        f"loop images/s, best of {args.repeats}: run_training {best['run_training']:,.1f},"
        f" Trainer {best['Trainer']:,.1f}: ours is {best['run_training'] / best['Trainer']:.2f}x the Trainer's rate"
        f" (per repeat: {', '.join(f'{r:.2f}x' for r in ratios)})"
    )
    print(
        f"wall s, best of {args.repeats}: run_training {best_wall['run_training']:.2f} (with its evaluations and"
        f" outputs), Trainer {best_wall['Trainer']:.2f} (training only): ours takes"
        f" {best_wall['run_training'] / best_wall['Trainer']:.2f}x the Trainer's time"
    )
    # The same job: same initial weights, same batches in the same order, so the per-step losses agree up to
    # the optimizers' floating-point differences (and, for ResNets, the weight decay on BatchNorm scales).
    for key, what in (("losses", "train loss"), ("grad_norms", "gradient norm (before clipping)")):
        a, b = ours[0][key], theirs[0][key]
        diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
        clipped = sum(x > 1.0 for x in a) if key == "grad_norms" else None
        print(
            f"per-step {what}, run 1: step 1 {a[0]:.6f} vs {b[0]:.6f}, last step {a[-1]:.6f} vs {b[-1]:.6f},"
            f" largest difference over the {steps} steps {diff:.2e}"
            + (f" ({clipped} of {steps} steps clipped)" if clipped is not None else "")
        )
    if lines:
        print(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
