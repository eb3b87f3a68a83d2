"""GPU throughput and memory of the study's backbones: what `dermcompress plan` turns into GPU-hours.

ViT-B/16 (timm) and DINOv2-B/14 (transformers, dinov2-base's shape) at 224 px, batch 256, as the registry builds
them (random weights: throughput and memory need no hub), in fp32 and in bf16 autocast, eager and under
torch.compile. For each: training images/s (the training loop's step: normalise on the device, forward,
cross-entropy, backward, gradient clipping to norm 1, AdamW) and evaluation images/s (forward under no_grad),
each after warm-up steps, timed with CUDA synchronisation; and peak GPU memory of each phase
(torch.cuda.max_memory_allocated, reset before it). The study's Table 1 reports 31,982 MB peak for ViT-B/16 at
224 px (its Trainer, batch 256, fp32 weights).

    .venv/bin/python benchmarks/gpu.py [--batch 256] [--steps 10] [--warmup 3] [--out results/benchmarks/gpu.csv]

Writes one CSV row per model x precision x compile x phase (model, res, phase, precision, compile, batch,
img_per_s, peak_mem_mb) and prints the table; `dermcompress plan --throughput results/benchmarks/gpu.csv`
reads it (bf16, eager: what the training code runs). Without a GPU it says so and exits 2; `--device cpu
--models vit_b16 --batch 2 --steps 1 --warmup 0 --no-compile` runs the same code on the CPU as a check that it
works (no GPU figures).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from dermcompress.data.loader import normalize
from dermcompress.learn.models import build_architecture
from dermcompress.learn.registry import parse_spec

RES = 224


def backbones(tmp: Path) -> dict[str, dict]:
    """Registry entries of the two backbones, with random weights (DINOv2 saved to a folder, as a hub one)."""
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp / "dinov2_b14"
    Dinov2Model(Dinov2Config(image_size=518)).save_pretrained(folder)  # dinov2-base's shape
    return {
        "vit_b16": {"source": "timm:vit_base_patch16_224", "pretrained": False},
        "dinov2_b14": {"source": f"local:{folder}"},
    }


def timed(fn, steps: int, warmup: int, device: torch.device) -> tuple[float, float | None]:
    """(seconds per call, peak MB) of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return seconds, peak


def measure(name, entry, *, precision, compiled, batch, steps, warmup, device) -> list[dict]:
    model = build_architecture(parse_spec(name, entry), num_classes=2, resolution=RES).to(device)
    forward = torch.compile(model) if compiled else model
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    )
    pixels = torch.randint(0, 256, (batch, 3, RES, RES), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)

    def train_step():
        with autocast():
            logits = forward(normalize(pixels, model.mean, model.std))
        F.cross_entropy(logits.float(), labels).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_step():
        with autocast():
            forward(normalize(pixels, model.mean, model.std))

    rows = []
    for phase, step in (("train", train_step), ("eval", eval_step)):
        model.train(phase == "train")
        seconds, peak = timed(step, steps, warmup, device)
        rows.append(
            {
                "model": name,
                "res": RES,
                "phase": phase,
                "precision": precision,
                "compile": compiled,
                "batch": batch,
                "img_per_s": batch / seconds,
                "peak_mem_mb": peak,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            }
        )
        print(
            f"{name:<11} {precision:<5} {'compile' if compiled else 'eager':<8} {phase:<6}"
            f" {batch / seconds:>9,.1f} img/s  peak {peak if peak is None else f'{peak:,.0f} MB'}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="*", default=["vit_b16", "dinov2_b14"])
    parser.add_argument("--no-compile", action="store_true", help="eager only (torch.compile takes minutes)")
    parser.add_argument("--out", default="results/benchmarks/gpu.csv")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; nothing measured (see --device cpu for a check)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        entries = backbones(Path(tmp))
        for name in args.models:
            for precision in ("fp32", "bf16"):
                for compiled in (False,) if args.no_compile else (False, True):
                    rows += measure(  # each model freed before the next: one in memory at a time
                        name,
                        entries[name],
                        precision=precision,
                        compiled=compiled,
                        batch=args.batch,
                        steps=args.steps,
                        warmup=args.warmup,
                        device=device,
                    )
    table = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_markdown(index=False, floatfmt=",.1f"))
    print(f"written to {args.out}; study's Table 1: ViT-B/16 224 px peak 31,982 MB (fp32, batch 256)")
    return 0 if all(math.isfinite(r["img_per_s"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
