"""The data half end to end, as a user runs it (`snakemake --cores 2`), against a naive script, in the same run.

Images: photo-like JPEGs (quality 90) of the three real ISIC 2019 sizes, half 600x450 (HAM10000), a third
1024x1024 (BCN_20000), the rest 1504x1128 (MSK), in the official layout (image folder, ground truth, metadata).
For each size N (default 60, 600 and 2400 images; 60 measures the fixed cost):

- pipeline: a fresh copy of this workflow with the repository's config.yaml, data.isic_root pointing at the
  images, variants `clean` and `degraded` only, resolutions 224/112/56, `run_experiments: []`, run as
  `snakemake --cores 2`: ingest, task, split, resize, degradation and the caches, process start-up, lineage
  records and Snakemake's own work included. Then a no-op `snakemake` (nothing to do) and the per-job times
  from the logs: where the fixed cost goes;
- naive: one Python process on one core that, per image, decodes the full JPEG once, then per resolution
  resizes the full image with LANCZOS (squash), applies the study's degradation (JPEG q75, Gaussian blur,
  MAXCOVERAGE quantization, one each on 20% of the training share) and saves a PNG: one variant.

    .venv/bin/python benchmarks/prep.py [--sizes 60 600 2400] [--repeats 1] [--workflow DIR] [--idle 0.25]
    .venv/bin/python benchmarks/prep.py --codecs [--sizes 600]

`--codecs` measures the transmission codecs instead (codec.py), three ways: per format x quality x resolution,
milliseconds to encode (and decode) one image on one core and its mean kB, beside a lossless PNG (the
reference), on photo-like images resized to 224/112/56 px; the thread pool's speed-up (imagepool.map_images, what
a degrade job runs) with 2 threads against 1; and through Snakemake, what adding the codec variants to a
finished data half costs a user: the rerun's wall time and each new degrade job's, against the clean and
degraded variants' own degrade jobs in the run before (the baseline, in the same run).

`--workflow` runs another checkout (e.g. the code before a change) the same way. The machine may be shared:
each timed run waits until other processes use under `--idle` cores, and reports how many they used meanwhile
(from /proc/stat) beside its wall and CPU seconds. Prints, per size, seconds and the ratio naive / pipeline, the
mean absolute difference (grey levels) between the pipeline's clean cache and the naive PNGs of the images it
left undegraded, the bytes of pixel data stored per image, and (smallest size) where the time went. Exits 1 if a
target is missed: fixed cost (60 images) <= 20 s; >= 1.5x naive at 600 images, >= 3x at 2400; difference < 2
grey levels.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "scripts", "src", "envs", "profiles")
SIZES = ((600, 450), (1024, 1024), (1504, 1128))  # HAM10000, BCN_20000, MSK
QUALITY = 90
RESOLUTIONS = (224, 112, 56)
TARGETS = {"fixed_s": 20.0, 600: 1.5, 2400: 3.0, "grey": 2.0}
# The codecs of config.yaml's variants, one quality each for the pipeline run and a span for the table.
CODECS = {
    "jpeg_q75": {"format": "jpeg", "quality": 75},
    "webp_q60": {"format": "webp", "quality": 60},
    "avif_q60": {"format": "avif", "quality": 60},
}
CODEC_SPAN = (
    [{"format": "jpeg", "quality": q} for q in (95, 75, 30)]
    + [{"format": "webp", "quality": q} for q in (95, 60, 30)]
    + [{"format": "avif", "quality": q} for q in (90, 60, 40)]
)
GT_HEADER = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
META_HEADER = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
NOISE_SIDE = 1600


def image_size(i: int) -> tuple[int, int]:
    """Half HAM, a third BCN, a sixth MSK, interleaved so every prefix of the set has the same mix."""
    k = i % 6
    return SIZES[0] if k < 3 else SIZES[1] if k < 5 else SIZES[2]


def noise_tiles(rng: np.random.Generator, count: int = 4) -> list[np.ndarray]:
    """Blurred noise (skin texture and sensor noise), cropped at random offsets per image: cheap to draw."""
    tiles = []
    for _ in range(count):
        fine = rng.normal(0, 1, (NOISE_SIDE, NOISE_SIDE, 3)).astype(np.float32)
        tiles.append(
            cv2.GaussianBlur(fine, (0, 0), 1.2) * 18 + rng.normal(0, 2, fine.shape).astype(np.float32)
        )
    return tiles


def photo_like(i: int, tiles: list[np.ndarray]) -> bytes:
    """A smooth skin-coloured field, one to three dark lesion-like blobs, fine texture; a JPEG of real size."""
    rng = np.random.default_rng(i)
    width, height = image_size(i)
    field = cv2.resize(rng.uniform(110, 220, (5, 5, 3)).astype(np.float32), (width, height), cv2.INTER_CUBIC)
    small = (max(8, width // 16), max(8, height // 16))
    yy, xx = np.mgrid[: small[1], : small[0]].astype(np.float32)
    shade = np.ones(small[::-1], np.float32)
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0.3, 0.7) * small[0], rng.uniform(0.3, 0.7) * small[1]
        rx, ry = rng.uniform(0.08, 0.25) * small[0], rng.uniform(0.08, 0.25) * small[1]
        shade *= 1 - rng.uniform(0.3, 0.7) * np.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2))
    field *= cv2.resize(shade, (width, height), interpolation=cv2.INTER_LINEAR)[..., None]
    tile = tiles[i % len(tiles)]
    y0, x0 = rng.integers(0, NOISE_SIDE - height + 1), rng.integers(0, NOISE_SIDE - width + 1)
    rgb = np.clip(field + tile[y0 : y0 + height, x0 : x0 + width], 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
    assert ok
    return buf.tobytes()


def image_ids(n: int) -> list[str]:
    return [f"ISIC_{i:07d}" for i in range(n)]


def write_pool(folder: Path, n: int) -> None:
    """n JPEGs named ISIC_0000000.jpg ... in `folder`."""
    folder.mkdir(parents=True)
    tiles = noise_tiles(np.random.default_rng(12345))

    def write(i: int) -> None:
        (folder / f"ISIC_{i:07d}.jpg").write_bytes(photo_like(i, tiles))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(write, range(n)))


def official_layout(root: Path, pool: Path, n: int) -> Path:
    """The first n images of the pool (hard links) with the two CSVs: balanced MEL/NV, 1-3 images per lesion."""
    folder = root / "ISIC_2019_Training_Input"
    folder.mkdir(parents=True)
    with open(root / "ISIC_2019_Training_GroundTruth.csv", "w", newline="") as gt_file:
        gt = csv.writer(gt_file, lineterminator="\n")
        gt.writerow(GT_HEADER)
        with open(root / "ISIC_2019_Training_Metadata.csv", "w", newline="") as meta_file:
            meta = csv.writer(meta_file, lineterminator="\n")
            meta.writerow(META_HEADER)
            for i, image_id in enumerate(image_ids(n)):
                os.link(pool / f"{image_id}.jpg", folder / f"{image_id}.jpg")
                label = i % 2  # MEL, NV alternating: balancing keeps every image
                gt.writerow([image_id, *(f"{float(j == label):.1f}" for j in range(9))])
                meta.writerow([image_id, 50, "anterior torso", f"IL_{i // 6 * 2 + i % 2:07d}", "female"])
    return root


# ---------------------------------------------------------------------------------------------------- naive

NAIVE = r"""
import io, sys, zlib
from pathlib import Path
import cv2, numpy as np
from PIL import Image
folder, out, resolutions = Path(sys.argv[1]), Path(sys.argv[2]), [int(r) for r in sys.argv[3].split(",")]
for res in resolutions:
    (out / str(res)).mkdir(parents=True, exist_ok=True)
for path in sorted(folder.glob("*.jpg")):
    full = Image.open(path).convert("RGB")
    # The study degrades 60% of the training images (70% of all): 42% of images, one op each.
    draw = zlib.crc32(path.stem.encode()) % 100
    op = "jpeg" if draw < 14 else "blur" if draw < 28 else "quantize" if draw < 42 else None
    for res in resolutions:
        small = full.resize((res, res), Image.LANCZOS)
        if op == "jpeg":
            buf = io.BytesIO()
            small.save(buf, "JPEG", quality=75)
            small = Image.open(buf).convert("RGB")
        elif op == "blur":
            small = Image.fromarray(cv2.GaussianBlur(np.asarray(small), (5, 5), 1.0))
        elif op == "quantize":
            small = small.quantize(colors=40, method=Image.Quantize.MAXCOVERAGE).convert("RGB")
        small.save(out / str(res) / f"{path.stem}.png")
"""


def naive_op(image_id: str) -> str | None:
    import zlib

    draw = zlib.crc32(image_id.encode()) % 100
    return "jpeg" if draw < 14 else "blur" if draw < 28 else "quantize" if draw < 42 else None


# ---------------------------------------------------------------------------------------------------- pipeline


def copy_workflow(source: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in WORKFLOW_FILES:
        if (source / name).is_dir():
            shutil.copytree(
                source / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            shutil.copy2(source / name, dest / name)
    return dest


def bench_config(workdir: Path, isic_root: Path) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["data"]["isic_root"] = str(isic_root)
    config["resize"]["resolutions"] = list(RESOLUTIONS)
    config["degrade"]["variants"] = {
        "clean": {"fractions": {}},
        "degraded": {"fractions": {"jpeg": 0.2, "blur": 0.2, "quantize": 0.2}, "splits": ["train"]},
    }
    config["run_experiments"] = []
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@dataclass
class Timed:
    """One command: wall seconds, CPU seconds of it and everything it started, and the CPU seconds every other
    process on the machine used meanwhile (from /proc/stat): how much of the 2 cores the command really had."""

    wall: float
    cpu: float
    others: float

    @property
    def other_cores(self) -> float:
        return self.others / self.wall


def _busy_seconds() -> float:
    """CPU seconds all processes have used since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def others_now(seconds: float = 2.0) -> float:
    """Cores other processes keep busy right now (sampled over `seconds`)."""
    busy, start = _busy_seconds(), time.perf_counter()
    time.sleep(seconds)
    return (_busy_seconds() - busy) / (time.perf_counter() - start)


def wait_until_idle(limit: float, patience: float) -> float:
    """The machine is shared: wait (at most `patience` seconds) until other processes use under `limit` cores,
    so that a measurement does not depend on what else runs. Returns what they used at the last look."""
    deadline = time.perf_counter() + patience
    used = others_now()
    while used > limit and time.perf_counter() < deadline:
        time.sleep(5)
        used = others_now()
    return used


def timed(cmd: list[str], cwd: Path, log: Path, idle: tuple[float, float] | None = None) -> Timed:
    """Run `cmd` (output to `log`), after waiting for an idle machine (`idle`: limit, patience); exit with its
    output if it fails."""
    if idle:
        wait_until_idle(*idle)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    # The copied checkout's own package (a --workflow's code), not the one installed.
    if (cwd / "src").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd / "src"), env.get("PYTHONPATH")]))
    before, busy, start = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = _busy_seconds() - busy
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Timed(wall, cpu, max(0.0, busy - cpu))


def snakemake(workdir: Path, name: str, idle: tuple[float, float] | None = None) -> Timed:
    """`snakemake --cores 2` in `workdir`, as a user runs it."""
    cmd = [str(Path(sys.executable).parent / "snakemake"), "--cores", "2"]
    return timed(cmd, workdir, workdir / f"snakemake-{name}.log", idle)


STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _stamps(log: Path) -> list[tuple[float, str]]:
    found = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        if match := STAMP.match(line):
            found.append((datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), line))
    return found


STARTED = re.compile(r"started (\d+\.\d+) s after the process")


def job_times(workdir: Path) -> list[dict]:
    """Per job: wall seconds (Snakemake's benchmark file, where the rule has one) and, from its log's time
    stamps, the seconds before its first log line (interpreter, imports: start-up; the job's own `started N s
    after the process` line where it logs one), for its lineage record (the last line), and when it started and
    ended."""
    jobs = []
    for log in sorted((workdir / "results/logs").rglob("*.log")):
        rel = log.relative_to(workdir / "results/logs").with_suffix("")
        tsv = workdir / "results/benchmarks" / rel.with_suffix(".tsv")
        stamps = _stamps(log)
        if not stamps:
            continue
        logged = stamps[-1][0] - stamps[0][0]
        wall = logged
        if tsv.is_file():
            with open(tsv) as f:
                wall = float(next(csv.DictReader(f, delimiter="\t"))["s"])
        if match := STARTED.search(stamps[0][1]):
            wall = max(wall, logged + float(match.group(1)))
        lineage = (
            stamps[-1][0] - stamps[-2][0] if len(stamps) > 1 and "lineage recorded" in stamps[-1][1] else 0
        )
        job = {"job": rel.as_posix(), "wall": wall, "startup": wall - logged, "lineage": lineage}
        job.update(
            work=wall - job["startup"] - lineage, start=stamps[0][0] - job["startup"], end=stamps[-1][0]
        )
        jobs.append(job)
    return jobs


def import_seconds(workdir: Path) -> float:
    """What a job's interpreter pays before its stage runs: Python, Snakemake's script preamble, our imports."""
    code = "from snakemake.iocontainers import Snakemake; import dermcompress.provenance.logs, dermcompress.data.resize"
    cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, 'src'); {code}"]
    return min(timed(cmd, workdir, workdir / "imports.log").wall for _ in range(3))


def pixel_bytes(workdir: Path) -> dict[str, int]:
    """Bytes of the parquet files that hold pixels, per folder (resized/, degraded/, cache/)."""
    totals: dict[str, int] = {}
    for path in (workdir / "results").rglob("*.parquet"):
        kind = path.relative_to(workdir / "results").parts[0]
        if kind in ("resized", "degraded", "cache"):
            totals[kind] = totals.get(kind, 0) + path.stat().st_size
    return totals


def grey_difference(workdir: Path, naive_out: Path) -> dict[int, float]:
    """Mean |clean cache - naive PNG| per resolution, over the images the naive script left undegraded."""
    sys.path.insert(0, str(workdir / "src"))
    from dermcompress.data.cache import read_split

    diffs = {}
    for res in RESOLUTIONS:
        total, count = 0.0, 0
        for split in ("train", "val", "test"):
            part = read_split(workdir / f"results/cache/{res}px/clean", split)
            for image_id, pixels in zip(part.image_ids, part.pixels, strict=True):
                if naive_op(image_id) is None:
                    naive = np.asarray(Image.open(naive_out / str(res) / f"{image_id}.png"))
                    total += float(np.abs(pixels.astype(np.int16) - naive).mean())
                    count += 1
        diffs[res] = total / count
    return diffs


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def show(name: str, run: Timed) -> str:
    return f"{name} {run.wall:.1f} s (CPU {run.cpu:.1f} s; other processes used {run.other_cores:.2f} cores)"


def report_fixed_cost(total: Timed, noop: Timed, jobs: list[dict], imports: float) -> None:
    """Where the time of the smallest run went."""
    span = max(j["end"] for j in jobs) - min(j["start"] for j in jobs)
    sums = {k: sum(j[k] for j in jobs) for k in ("wall", "startup", "work", "lineage")}
    print(f"  where the {total.wall:.1f} s went:")
    print(f"    Snakemake before the first job (a run with nothing to do takes {noop.wall:.1f} s)")
    print(
        f"    {len(jobs)} jobs in {span:.1f} s (side by side when small): {sums['wall']:.1f} s of job time, of which "
        f"start-up {sums['startup']:.1f} s (one job's interpreter and imports alone: {imports:.2f} s), "
        f"work {sums['work']:.1f} s, lineage records {sums['lineage']:.1f} s"
    )
    print(f"    the rest: Snakemake's start, scheduling and end   {total.wall - span:.1f} s")
    print(f"  {'job':<28} {'wall s':>7} {'start-up':>9} {'work':>6} {'lineage':>8}")
    for job in sorted(jobs, key=lambda j: j["start"]):
        print(
            f"  {job['job']:<28} {job['wall']:>7.2f} {job['startup']:>9.2f} {job['work']:>6.2f} "
            f"{job['lineage']:>8.2f}"
        )


def resized_pool(pool: Path, n: int, res: int) -> list[np.ndarray]:
    """The first n pool images at res x res (area-averaged, squash), RGB uint8."""
    out = []
    for path in sorted(pool.glob("*.jpg"))[:n]:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        out.append(np.ascontiguousarray(cv2.resize(bgr, (res, res), interpolation=cv2.INTER_AREA)[..., ::-1]))
    return out


def per_image_ms(fn, images: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for image in images:
        fn(image)
    return (time.perf_counter() - start) / len(images) * 1000


def codec_table(pool: Path, n: int) -> None:
    """Milliseconds per image on one core (encode; encode + decode) and mean kB, per codec x resolution."""
    from dermcompress.data import codec

    print(
        f"\ncodecs on one core, {n} photo-like images per resolution (ms per image; mean kB, kB = 1000 bytes)"
    )
    print(f"  {'codec':<15}" + "".join(f"{f'{r} px encode / +decode / kB':>34}" for r in RESOLUTIONS))
    images = {res: resized_pool(pool, n, res) for res in RESOLUTIONS}
    rows = [("PNG (reference)", codec.png_size, None)] + [
        (codec.describe(codec.codec_settings(c)), functools.partial(codec.encode, codec=c), c)
        for c in CODEC_SPAN
    ]
    for name, encode, settings in rows:
        cells = []
        for res in RESOLUTIONS:
            for image in images[res][:3]:  # warm-up: the first call loads the codec's library
                encode(image)
            enc = per_image_ms(encode, images[res])
            both = per_image_ms(lambda i, s=settings: codec.transmit(i, s), images[res]) if settings else enc
            sizes = [s if isinstance(s, int) else len(s) for s in map(encode, images[res])]
            cells.append(f"{enc:8.2f} / {both:6.2f} / {np.mean(sizes) / 1000:7.2f}")
        print(f"  {name:<15}" + "".join(f"{c:>34}" for c in cells))


def pool_speedup(pool: Path, n: int) -> None:
    """What a degrade job's thread pool (imagepool.map_images) buys for each codec at 224 px: 2 threads vs 1."""
    from dermcompress.data import codec
    from dermcompress.data.imagepool import map_images

    images = resized_pool(pool, n, 224)
    print(f"\nthread pool (imagepool.map_images) on {n} images at 224 px, encode + decode:")
    for name, settings in CODECS.items():
        task = functools.partial(codec.transmit, codec=settings)
        seconds = {}
        for threads in (1, 2):
            start = time.perf_counter()
            quiet = tqdm(disable=True)
            map_images(task, images, shape=images[0].shape, threads=threads, sizes=[], bar=quiet)
            seconds[threads] = time.perf_counter() - start
        print(
            f"  {name}: 1 thread {seconds[1]:.2f} s ({n / seconds[1]:.0f} img/s), 2 threads {seconds[2]:.2f} s"
            f" ({n / seconds[2]:.0f} img/s): {seconds[1] / seconds[2]:.2f}x"
        )


def add_codec_variants(workdir: Path) -> None:
    """The bench config plus CODECS as variants that encode every split (what a user adds to config.yaml)."""
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    for name, settings in CODECS.items():
        config["degrade"]["variants"][name] = {"codec": settings, "splits": ["train", "val", "test"]}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def codecs_through_snakemake(workdir: Path, n: int, idle: tuple[float, float]) -> None:
    """A finished data half (clean, degraded), then the codec variants added and Snakemake run again."""
    before = {j["job"]: j for j in job_times(workdir)}
    add_codec_variants(workdir)
    rerun = snakemake(workdir, "codecs", idle)
    after = [j for j in job_times(workdir) if j["job"] not in before or j["end"] > before[j["job"]]["end"]]
    print(f"\n{n} images, adding {', '.join(CODECS)} (every split) to the finished data half:")
    print(f"  {show('rerun   ', rerun)}; jobs rerun: {len(after)}")
    for name in ["degraded", *CODECS]:
        jobs = before if name == "degraded" else {j["job"]: j for j in after}
        walls = [
            jobs[f"degrade/{res}px/{name}"]["wall"]
            for res in RESOLUTIONS
            if f"degrade/{res}px/{name}" in jobs
        ]
        label = "(baseline, first run)" if name == "degraded" else ""
        print(
            f"  degrade {name:<9} {' / '.join(f'{w:.1f}' for w in walls)} s at {'/'.join(map(str, RESOLUTIONS))}"
            f" px: {n * len(walls) / sum(walls):.0f} images/s over the three jobs {label}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[60, 600, 2400], help="images per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per contender and size; the best counts")
    parser.add_argument("--workflow", type=Path, default=REPO, help="checkout to run (default: this one)")
    parser.add_argument("--keep", type=Path, help="keep the work folders here (default: a temporary folder)")
    parser.add_argument(
        "--idle",
        type=float,
        default=0.25,
        help="before each timed run, wait until other processes use fewer cores than this (default 0.25)",
    )
    parser.add_argument("--patience", type=float, default=600, help="longest wait for that, in seconds (600)")
    parser.add_argument("--codecs", action="store_true", help="measure the transmission codecs (see above)")
    args = parser.parse_args(argv)
    if args.codecs and args.sizes == parser.get_default("sizes"):
        args.sizes = [600]
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        return run(args, base)


def run(args: argparse.Namespace, base: Path) -> int:
    sizes = sorted(args.sizes)
    print(f"{load()}; workflow {args.workflow}; sizes {sizes}; best of {args.repeats}", flush=True)
    start = time.perf_counter()
    write_pool(base / "pool", max(sizes))
    mean_kib = np.mean([p.stat().st_size for p in (base / "pool").glob("*.jpg")]) / 1024
    print(f"wrote {max(sizes)} JPEGs ({mean_kib:.0f} KiB on average) in {time.perf_counter() - start:.0f} s")

    results = {}
    for n in sizes:
        root = official_layout(base / f"isic-{n}", base / "pool", n)
        best = None
        for attempt in range(args.repeats):
            workdir = copy_workflow(args.workflow, base / f"wf-{n}-{attempt}")
            bench_config(workdir, root)
            pipeline = snakemake(workdir, "run", (args.idle, args.patience))
            if best is None or pipeline.wall < best[0].wall:
                best = (pipeline, workdir)
        pipeline, workdir = best
        if args.codecs:
            codecs_through_snakemake(workdir, n, (args.idle, args.patience))
            continue
        noop = snakemake(workdir, "noop")
        naive = None
        for attempt in range(args.repeats):
            out = base / f"naive-{n}-{attempt}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            cmd = [sys.executable, "-c", NAIVE, str(root / "ISIC_2019_Training_Input"), str(out)]
            attempt_run = timed(
                [*cmd, ",".join(map(str, RESOLUTIONS))], base, out / "naive.log", (args.idle, args.patience)
            )
            if naive is None or attempt_run.wall < naive[0].wall:
                naive = (attempt_run, out)
        naive, naive_out = naive
        diffs = grey_difference(workdir, naive_out)
        stored = pixel_bytes(workdir)
        results[n] = {"pipeline": pipeline, "naive": naive, "diffs": diffs}
        print(f"\n{n} images ({load()})")
        print(f"  {show('pipeline', pipeline)}")
        print(f"  {show('naive   ', naive)}")
        print(
            f"  naive / pipeline: {naive.wall / pipeline.wall:.2f}x in time, {naive.cpu / pipeline.cpu:.2f}x in CPU "
            f"(the pipeline runs on 2 cores, the naive script on 1)"
        )
        print(
            "  mean |clean cache - naive| (grey levels): "
            + ", ".join(f"{r} px {d:.2f}" for r, d in diffs.items())
        )
        raw = sum(res * res * 3 for res in RESOLUTIONS)
        print(
            f"  pixel data on disk per image: {sum(stored.values()) / n / 1024:.0f} KiB ("
            + ", ".join(f"{k}/ {v / n / 1024:.0f}" for k, v in sorted(stored.items()))
            + f"); one raw copy of 2 variants x {len(RESOLUTIONS)} resolutions: {2 * raw / 1024:.0f} KiB, "
            f"so {sum(stored.values()) / n / (2 * raw):.2f} raw copies stored"
        )
        if n == sizes[0]:
            report_fixed_cost(pipeline, noop, job_times(workdir), import_seconds(workdir))

    if args.codecs:
        codec_table(base / "pool", min(max(sizes), 200))
        pool_speedup(base / "pool", min(max(sizes), 200))
        return 0
    checks = {}
    if 60 in results:
        fixed = results[60]["pipeline"].wall
        checks[f"fixed cost (60 images) {fixed:.1f} s <= {TARGETS['fixed_s']:.0f} s"] = (
            fixed <= TARGETS["fixed_s"]
        )
    for n in (600, 2400):
        if n in results:
            ratio = results[n]["naive"].wall / results[n]["pipeline"].wall
            checks[f"{n} images: {ratio:.2f}x naive >= {TARGETS[n]}x"] = ratio >= TARGETS[n]
    worst = max(max(r["diffs"].values()) for r in results.values())
    checks[f"difference {worst:.2f} < {TARGETS['grey']} grey levels"] = worst < TARGETS["grey"]
    print()
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}: {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
