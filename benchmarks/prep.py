"""Data preparation throughput: the resize + degrade + cache stages against a naive resize-and-save script.

Synthetic photo-like 1024x1024 JPEGs (quality 90: smooth colour field, dark lesion-like blobs, mild texture; JPEG
sizes like real photos, not like noise) are written to a temporary folder. Then, in the same run:

- pipeline: what the workflow runs with config.yaml's settings, one job after another and each with every core
  this process may use: for each resolution, run_resize (its own decode of every image, as the workflow's
  per-resolution resize rule does), run_degrade (after_resize, the `degraded` variant) and run_cache; and once
  more with one thread, to separate the gain of the method from that of the second core;
- naive: for each image and each resolution separately, open the full image with PIL, convert to RGB, resize
  with Image.LANCZOS (squash) and save it as PNG, in one thread.

    .venv/bin/python benchmarks/prep.py [--n 300] [--resolutions 224 112 56] [--repeats 2]

Each contender runs --repeats times and its best run counts (the machine may be shared). Prints images/s (an
image = one source image taken through every resolution), the ratio, seconds per stage, and per resolution the
mean absolute difference (grey levels) between the pipeline's clean resized pixels and the naive PNGs. Exits 1
if a target is missed (>= 3x the naive rate; difference < 2 grey levels).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import yaml
from PIL import Image

from dermcompress.cache import run_cache
from dermcompress.config import variant_settings
from dermcompress.degrade import run_degrade
from dermcompress.pixeltable import read_pixel_table
from dermcompress.resize import available_threads, run_resize

CONFIG_FILE = Path(__file__).resolve().parents[1] / "config.yaml"
SIDE = 1024
QUALITY = 90


def photo_like(seed: int) -> np.ndarray:
    """A smooth colour field with a few dark blobs and mild texture, as uint8 (SIDE, SIDE, 3)."""
    rng = np.random.default_rng(seed)
    field = cv2.resize(rng.uniform(90, 230, (6, 6, 3)).astype(np.float32), (SIDE, SIDE), cv2.INTER_CUBIC)
    yy, xx = np.mgrid[:SIDE, :SIDE].astype(np.float32)
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0.25, 0.75, 2) * SIDE
        rx, ry = rng.uniform(0.05, 0.2, 2) * SIDE
        blob = np.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2))
        field *= 1 - rng.uniform(0.3, 0.7) * blob[..., None]
    texture = cv2.GaussianBlur(rng.normal(0, 1, (SIDE, SIDE, 3)).astype(np.float32), (0, 0), 2.0) * 20
    noise = rng.normal(0, 2, (SIDE, SIDE, 3)).astype(np.float32)
    return np.clip(field + texture + noise, 0, 255).astype(np.uint8)


def write_images(folder: Path, n: int, threads: int) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """n JPEGs in `folder`, plus the splits and manifest frames the stages read; returns the mean file size."""
    folder.mkdir(parents=True)
    ids = [f"ISIC_{i:07d}" for i in range(n)]

    def write(i: int) -> int:
        path = folder / f"{ids[i]}.jpg"
        Image.fromarray(photo_like(i)).save(path, quality=QUALITY)
        return path.stat().st_size

    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(write, range(n)))
    # 70/10/20 train/val/test, as the workflow's split stage roughly makes it.
    split = np.where(np.arange(n) % 10 < 7, "train", np.where(np.arange(n) % 10 < 8, "val", "test"))
    splits = pd.DataFrame(
        {
            "image_id": ids,
            "group_id": ids,
            "label": ["MEL", "NV"] * (n // 2) + ["MEL"] * (n % 2),
            "split": split,
        }
    )
    manifest = pd.DataFrame({"image_id": ids, "status": "ok", "member": [f"{i}.jpg" for i in ids]})
    return splits, manifest, int(np.mean(sizes))


def run_pipeline(
    root: Path, images: Path, splits, manifest, resolutions, config, threads
) -> dict[str, float]:
    """The workflow's resize, degrade and cache jobs for every resolution; seconds per stage."""
    variant = variant_settings(config, "degraded")
    seconds = {"resize": 0.0, "degrade": 0.0, "cache": 0.0}
    for res in resolutions:
        resized, degraded = root / f"resized/{res}px.parquet", root / f"degraded/{res}px/degraded.parquet"
        start = time.perf_counter()
        run_resize(
            splits=splits, manifest=manifest, images=images, out=resized, resolution=res,
            policy=config["resize"]["policy"], reduced_decode=config["resize"]["reduced_decode"],
            max_pixels=config["data"]["max_pixels"], threads=threads,
        )  # fmt: skip
        seconds["resize"] += time.perf_counter() - start
        start = time.perf_counter()
        run_degrade(
            out=degraded, splits=splits, manifest=manifest, variant=variant,
            order="after_resize", resolution=res, resized=resized, threads=threads,
        )  # fmt: skip
        seconds["degrade"] += time.perf_counter() - start
        start = time.perf_counter()
        run_cache(
            degraded=degraded, out_dir=root / f"cache/{res}px/degraded", classes=config["data"]["classes"],
            rows_per_shard=config["cache"]["rows_per_shard"], row_group_size=config["cache"]["row_group_size"],
        )  # fmt: skip
        seconds["cache"] += time.perf_counter() - start
    return seconds


def run_naive(out: Path, paths: list[Path], resolutions) -> None:
    """What a naive script does: every image decoded in full once per resolution, resized, saved as PNG."""
    for res in resolutions:
        (out / str(res)).mkdir(parents=True, exist_ok=True)
    for path in paths:
        for res in resolutions:
            with Image.open(path) as img:
                small = img.convert("RGB").resize((res, res), Image.LANCZOS)
            small.save(out / str(res) / f"{path.stem}.png")


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of the fastest of `repeats` calls."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        runs.append((time.perf_counter() - start, result))
    return min(runs, key=lambda run: run[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="source images")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 112, 56])
    parser.add_argument("--repeats", type=int, default=2, help="runs per contender; the best one counts")
    args = parser.parse_args(argv)
    config = yaml.safe_load(CONFIG_FILE.read_text())
    threads = available_threads()
    print(
        f"{args.n} synthetic {SIDE}x{SIDE} JPEGs (q{QUALITY}), resolutions {args.resolutions}, pipeline threads "
        f"{threads}, policy {config['resize']['policy']}, reduced_decode {config['resize']['reduced_decode']}, "
        f"best of {args.repeats}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        splits, manifest, mean_size = write_images(root / "images", args.n, threads)
        paths = [root / "images" / member for member in manifest["member"]]
        splits_path, manifest_path = root / "splits.parquet", root / "manifest.parquet"
        splits.to_parquet(splits_path)
        manifest.to_parquet(manifest_path)
        for path in paths:  # both contenders start from a warm page cache
            path.read_bytes()

        pipeline = functools.partial(
            run_pipeline, root, root / "images", splits_path, manifest_path, args.resolutions, config
        )
        pipeline_s, stages = best_of(args.repeats, functools.partial(pipeline, threads))
        single_s, single_stages = best_of(args.repeats, functools.partial(pipeline, 1))
        naive_s, _ = best_of(
            args.repeats, functools.partial(run_naive, root / "naive", paths, args.resolutions)
        )

        diffs = {}
        for res in args.resolutions:
            meta, pixels = read_pixel_table(root / f"resized/{res}px.parquet")
            naive = np.stack(
                [np.asarray(Image.open(root / "naive" / str(res) / f"{i}.png")) for i in meta["image_id"]]
            )
            diffs[res] = float(np.abs(pixels.astype(np.int16) - naive).mean())

    ratio = naive_s / pipeline_s
    print(
        f"\n{args.n} source images of {mean_size / 1024:.0f} KiB on average, {len(args.resolutions)} resolutions"
    )
    print(f"  {'':<12} {'images/s':>9} {'seconds':>8}")
    rows = [
        (f"pipeline x{threads}", pipeline_s, stages, f"resize + degrade + cache, {threads} threads"),
        ("pipeline x1", single_s, single_stages, "the same, 1 thread"),
        ("naive", naive_s, {}, "full decode + LANCZOS + PNG per resolution, 1 thread"),
    ]
    for name, seconds, parts, legend in rows:
        print(f"  {name:<12} {args.n / seconds:>9.1f} {seconds:>8.1f}   {legend}")
        for stage, s in parts.items():
            print(f"    {stage:<10} {'':>9} {s:>8.1f}")
    print(f"  pipeline / naive: {ratio:.1f}x ({threads} threads), {naive_s / single_s:.1f}x (1 thread)")
    print(
        "  mean |pipeline - naive| (grey levels): " + ", ".join(f"{r} px {d:.2f}" for r, d in diffs.items())
    )
    checks = {"pipeline >= 3x naive": ratio >= 3, "difference < 2 grey levels": max(diffs.values()) < 2}
    for name, passed in checks.items():
        print(f"  {'PASS' if passed else 'FAIL'}: {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
