"""Ingest of a full-size source: images per second, as a user runs it, and where the time goes.

Images: photo-like JPEGs (quality 90) of the three real ISIC 2019 sizes (600x450, 1024x1024, 1504x1128, in the
real mix; benchmarks/prep.py draws them), in the official layout. Three measurements, in one run:

- through Snakemake: `snakemake --cores 2 results/data/manifest.parquet` on a fresh copy of this workflow (the
  ingest job's own wall time from its benchmark file, and the whole command's);
- a naive baseline on one core: per image, read the file, sha256 it and fully decode it with PIL (what a script
  that "checks every image" does);
- per image, on one core, what ingest does and what each step costs: read, sha256, the header and its EXIF
  orientation, and the verifying decode (a JPEG at 1/8 scale: every byte entropy-decoded), beside a full decode:
  the step that takes most of the time is the limit.

    .venv/bin/python benchmarks/ingest.py [--n 3000] [--sample 300] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from prep import REPO, bench_config, copy_workflow, image_size, official_layout, timed, write_pool

from dermcompress.data.images import decode_image
from dermcompress.data.images import image_size as header_size
from dermcompress.data.ingest import VERIFY_DRAFT

BIG = 89_478_485


def through_snakemake(root: Path, work: Path) -> tuple[float, float]:
    """(whole command, ingest job) wall seconds of `snakemake --cores 2 results/data/manifest.parquet` on a
    fresh copy of this workflow (prep.copy_workflow), on an idle machine (prep.timed)."""
    copy_workflow(REPO, work)
    bench_config(work, root)
    snakemake = str(Path(sys.executable).parent / "snakemake")
    run = timed(
        [snakemake, "--cores", "2", "results/data/manifest.parquet"],
        work,
        work / "snakemake.log",
        (0.25, 600),
    )
    with open(work / "results/benchmarks/ingest.tsv") as f:
        job = float(next(csv.DictReader(f, delimiter="\t"))["s"])
    return run.wall, job


def naive(paths: list[Path]) -> float:
    """Seconds for read + sha256 + a full PIL decode of every file, one core."""
    start = time.perf_counter()
    for path in paths:
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        with Image.open(path) as img:
            img.convert("RGB").load()
    return time.perf_counter() - start


def steps(paths: list[Path]) -> dict[str, float]:
    """Milliseconds per image of each step of inspect_image, and of a full decode, on one core."""
    ms = dict.fromkeys(("read", "sha256", "header + EXIF", "verify decode (1/8)", "full decode"), 0.0)
    for path in paths:
        t0 = time.perf_counter()
        data = path.read_bytes()
        t1 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        t2 = time.perf_counter()
        header_size(data)
        t3 = time.perf_counter()
        decode_image(data, max_pixels=BIG, draft_size=VERIFY_DRAFT)
        t4 = time.perf_counter()
        decode_image(data, max_pixels=BIG)
        t5 = time.perf_counter()
        for key, seconds in zip(ms, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            ms[key] += seconds * 1000 / len(paths)
    return ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="images (default 3000)")
    parser.add_argument("--sample", type=int, default=300, help="images timed step by step (default 300)")
    parser.add_argument("--keep", type=Path, help="keep the work folder here (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_pool(base / "pool", args.n)
        root = official_layout(base / "isic", base / "pool", args.n)
        paths = sorted((root / "ISIC_2019_Training_Input").glob("*.jpg"))
        sizes = {image_size(i) for i in range(args.n)}
        mean_kib = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        print(
            f"{args.n} JPEGs of {len(sizes)} sizes ({mean_kib:.0f} KiB on average) in {time.perf_counter() - start:.0f} s"
        )

        wall, job = through_snakemake(root, base / "wf")
        print(
            f"\nthrough Snakemake (2 cores): ingest job {job:.1f} s = {args.n / job:.0f} images/s; "
            f"the whole command {wall:.1f} s = {args.n / wall:.0f} images/s"
        )
        seconds = naive(paths)
        print(
            f"naive read + sha256 + full decode, 1 core: {seconds:.1f} s = {args.n / seconds:.0f} images/s "
            f"({seconds / job:.2f}x the ingest job's time)"
        )

        sample = paths[:: max(1, len(paths) // args.sample)][: args.sample]
        ms = steps(sample)
        verify = sum(v for k, v in ms.items() if k != "full decode")
        print(
            f"\nper image on 1 core, {len(sample)} images (ms): "
            + ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
        )
        limit = max((k for k in ms if k != "full decode"), key=ms.get)
        print(
            f"ingest's own steps: {verify:.2f} ms per image ({1000 / verify:.0f} images/s per core); the limit "
            f"is the {limit}, {ms[limit] / verify:.0%} of it (a full decode would take "
            f"{ms['full decode']:.1f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
