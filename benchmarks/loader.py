"""Loader throughput: the parquet cache + make_loader against a naive per-file JPEG DataLoader.

Both produce normalized float batches of 256 (the training input); the naive loader decodes one JPEG (q95) per
image with PIL, converts it with pil_to_tensor and collates per item, with 0 and 2 worker processes. Images are
smooth synthetic ones written to a temporary folder, as both a degraded pixel table (then cached by run_cache)
and JPEG files.

    .venv/bin/python benchmarks/loader.py [--n56 2000] [--n224 1000] [--repeats 3]

Prints images/s per loader and resolution and checks the targets (cache >= 5x naive; >= 10,000 images/s at
56 px); exits 1 if a target is missed. At 224 px a batch is 38 MB of uint8 and 154 MB of float: on CPU the
first-touch page faults of such fresh allocations cost more than the copies themselves.
THP_MEM_ALLOC_ENABLE=1 (PyTorch's switch for transparent huge pages on large CPU allocations) removes most of
that cost; on GPU the caching allocator does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from dermcompress.data.cache_write import run_cache
from dermcompress.data.loader import make_loader, normalize
from dermcompress.data.pixeltable import write_pixel_table

BATCH = 256
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLASSES = ["MEL", "NV"]
LEGEND = {
    "cache": "make_loader + normalize into a reused float buffer (checked)",
    "cache_cold": "the same, first epoch including read + sha256 verify of the cache",
    "cache_fresh": "make_loader + normalize into a new float tensor per batch",
    "cache_uint8": "make_loader, uint8 batches only (what crosses to the GPU)",
    "naive_w0": "JPEG files, PIL + pil_to_tensor + collate, 0 workers, + normalize (reused buffer)",
    "naive_w2": "the same, 2 workers",
}


def synthetic_images(n: int, res: int, seed: int) -> np.ndarray:
    """Smooth colour fields with mild noise: JPEG sizes and decode times like real photos, not like noise."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, res, res, 3), np.uint8)
    for i in range(n):
        coarse = rng.integers(40, 220, (6, 6, 3), dtype=np.uint8)
        smooth = cv2.resize(coarse, (res, res), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        out[i] = np.clip(smooth + rng.integers(-6, 7, smooth.shape), 0, 255)
    return out


class JpegFiles(Dataset):
    """What a naive pipeline does: open, decode and convert one file per item."""

    def __init__(self, paths: list[Path], labels: list[int]) -> None:
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as img:
            return pil_to_tensor(img.convert("RGB")), self.labels[i]


def prepare(root: Path, n: int, res: int) -> tuple[Path, JpegFiles]:
    pixels = synthetic_images(n, res, seed=res)
    labels = [CLASSES[i % 2] for i in range(n)]
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    meta = pd.DataFrame(
        {
            "image_id": ids,
            "split": "train",
            "label": labels,
            "degradation": "none",
            "degradation_params": json.dumps({}),
        }
    )
    table = root / f"degraded_{res}.parquet"
    write_pixel_table(table, meta, pixels, metadata={"resolution": str(res), "variant": "clean"})
    cache = root / f"cache_{res}"
    run_cache(degraded=table, out_dir=cache, classes=CLASSES, rows_per_shard=2048, row_group_size=64)
    jpeg_dir = root / f"jpeg_{res}"
    jpeg_dir.mkdir()
    paths = []
    for image_id, img in zip(ids, pixels, strict=True):
        path = jpeg_dir / f"{image_id}.jpg"
        Image.fromarray(img).save(path, quality=95)
        paths.append(path)
    return cache, JpegFiles(paths, [CLASSES.index(lab) for lab in labels])


def epoch_rate(batches, n: int, out: torch.Tensor | None, fresh: bool = False) -> float:
    """images/s of one full epoch, normalization to float included: into `out`, or a new tensor if `fresh`."""
    start = time.perf_counter()
    seen = 0
    for pixels, _labels in batches():
        if fresh:
            normalize(pixels, MEAN, STD)
        elif out is not None:
            normalize(pixels, MEAN, STD, out=out[: len(pixels)])
        seen += len(pixels)
    elapsed = time.perf_counter() - start
    assert seen == n, (seen, n)
    return n / elapsed


def bench(root: Path, n: int, res: int, repeats: int) -> dict[str, float]:
    cache, files = prepare(root, n, res)
    start = time.perf_counter()
    loader = make_loader(cache, "train", batch_size=BATCH, shuffle=True, seed=0)
    load_s = time.perf_counter() - start
    # Both loaders normalize into one reused float buffer. A fresh 154 MB tensor per 224 px batch costs more
    # in first-touch page faults than the arithmetic on CPU; on GPU the caching allocator reuses memory anyway.
    out = torch.empty(BATCH, 3, res, res)

    def cached():
        loader.set_epoch(loader.epoch + 1)
        return ((b["pixels"], b["labels"]) for b in loader)

    def best(batches, **kw) -> float:
        return max(epoch_rate(batches, n, **kw) for _ in range(repeats))

    rates = {"cache": best(cached, out=out)}
    # The first epoch including reading and verifying the cache: what a single-epoch job would see.
    rates["cache_cold"] = n / (load_s + n / rates["cache"])
    rates["cache_fresh"] = best(cached, out=None, fresh=True)
    rates["cache_uint8"] = best(cached, out=None)
    for workers in (0, 2):
        naive = DataLoader(files, batch_size=BATCH, shuffle=True, num_workers=workers)
        rates[f"naive_w{workers}"] = best(lambda naive=naive: iter(naive), out=out)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n56", type=int, default=2000)
    parser.add_argument("--n224", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="epochs per loader; the best one counts")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in the main process. 1 by default: on a small shared machine OpenMP's barriers wait"
        " for threads the OS has descheduled, which makes memory-bound copies erratic, not faster",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}", file=sys.stderr)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for res, n in ((56, args.n56), (224, args.n224)):
            rates = bench(Path(tmp), n, res, args.repeats)
            best_naive = max(rates["naive_w0"], rates["naive_w2"])
            ratio = rates["cache"] / best_naive
            print(f"\n{res} px, {n} images (images/s, best of {args.repeats} epochs)")
            for name, rate in rates.items():
                print(f"  {name:<12} {rate:>10,.0f}   {LEGEND[name]}")
            print(f"  cache / best naive: {ratio:.1f}x (cold: {rates['cache_cold'] / best_naive:.1f}x)")
            checks = {"cache >= 5x naive": ratio >= 5}
            if res == 56:
                checks["cache >= 10,000 images/s"] = rates["cache"] >= 10_000
            for name, passed in checks.items():
                print(f"  {'PASS' if passed else 'FAIL'}: {name}")
                ok &= passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
