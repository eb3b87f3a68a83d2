"""What a torch job pays to start, through Snakemake, against a bare `python -c 'import torch'` in the same run.

Two measurements, both of the checkout given by `--workflow` (default: this one):

- imports: per script of a torch job or of the data half in scripts/, a fresh interpreter runs the script's own
  import statements (with the workflow's src/ first on the path, as its jobs have it): median seconds from the
  interpreter's start to its imports done, and the median excess over a bare `import torch` timed alternately
  with them; and which heavy packages those imports load (scikit-learn, scipy, matplotlib, timm, transformers,
  pandas, ...). Nothing of the job's work runs: this is what the script costs before its first line.
- through Snakemake: a fresh copy of the workflow runs config.demo.yaml's synthetic data set with a few of its
  experiments (`--experiments`; by default frozen_vs_finetuned and robustness: trainings, evaluations, frozen
  features, linear probes, probe evaluations), one job at a time (`--cores 1`), so that a job's start-up is not
  stretched by another job beside it. From each torch job's log: its start-up, from when the operating system
  created its process to its first log line (job_logging's `started N s after the process`; a checkout that logs
  none has the `start-up` of its `wall time` line instead, the same instant to 0.1 s, which psutil measured: less
  psutil's clock offset, measured here), its set-up phase (building the model, which imports timm where a model
  is built from timm, and opening the cache), and its wall time. The baseline: a bare `python -c 'import torch'`
  `--repeats` times before the run and as many after it, median seconds from its process's start to torch
  imported (its wall time, which adds the interpreter's exit, is shown too: a job skips that, exit_now).

Times from a process's start come from the kernel's clock since boot (/proc/uptime, /proc/self/stat): psutil's
create_time adds that to a boot time in whole seconds and read 0.9 s too much on the development machine.

Jobs are grouped by kind from the rule that ran them (Snakemake's output names each job's rule and log), by
the rule name's prefix before `__` (`evaluate__clean__jpeg_q75` is an evaluate job): train, evaluate, features,
linear, evaluate_probe. Prints, per kind, the jobs' median start-up and its excess over the bare import, and exits
1 if a kind's median excess is over 1 s (the target), or if the run has no torch job.

    .venv/bin/python benchmarks/startup.py [--workflow DIR] [--experiments NAME ...] [--repeats 3] [--cores 1]
                                           [--keep DIR] [--idle 0.25] [--imports-only]

The machine may be shared: like prep.py, the timed parts wait until other processes use under `--idle` cores,
and the Snakemake run reports how many they used meanwhile. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prep import copy_workflow, load, show, timed, wait_until_idle

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 1.0
# What a torch job must not import before its work begins (and what else is worth seeing in the table).
HEAVY = ("sklearn", "scipy", "matplotlib", "timm", "transformers", "pandas", "torchvision", "peft", "fvcore")
# Rule name (its prefix before `__`) -> kind of torch job; other rules are the data half and aggregation.
TORCH_KINDS = {
    "train": "train",
    "evaluate": "evaluate",
    "features": "features",
    "linear": "linear",
    "evaluate_probe": "evaluate_probe",
}
# The data half's scripts; the torch jobs' are every script that imports dermcompress.learn.
DATA_SCRIPTS = (
    "synth",
    "ingest",
    "ingest_gather",
    "task",
    "split",
    "resize",
    "resize_gather",
    "degrade",
    "data_summary",
    "bytes_summary",
)
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
STARTED = re.compile(r"started (\d+\.\d+) s after the process")
WALL = re.compile(r"wall time (\d+\.\d+) s: (.*)")
PHASE = re.compile(r"([\w -]+?) (\d+\.\d+) s \(\d+%\)")


AGE = """
import os
from pathlib import Path
uptime = float(Path("/proc/uptime").read_text().split()[0])
started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
print(uptime - started / os.sysconf("SC_CLK_TCK"), flush=True)
os._exit(0)
"""


def imports_seconds(code: str, env: dict | None = None) -> float:
    """Seconds from a fresh interpreter's start until `code` has run (the interpreter's exit left out: a job
    skips it, exit_now)."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\n{AGE}"], env=env, check=True, capture_output=True, text=True
    ).stdout
    return float(out)


def script_imports(script: Path) -> str:
    """The script's top-level import statements, as one line of code (its work, which needs the `snakemake`
    object, is left out)."""
    tree = ast.parse(script.read_text())
    return "; ".join(ast.unparse(n) for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom))


def imports_table(workflow: Path, repeats: int, idle: tuple[float, float]) -> None:
    """Per script: seconds from a fresh interpreter's start to its imports done, and their excess over a bare
    `import torch` timed alternately with them (the median of the paired differences: a shared machine's load
    drifts), and the heavy packages they load."""
    env = {**os.environ, "PYTHONPATH": str(workflow / "src")}
    wait_until_idle(*idle)
    print(f"\nimports of each script (fresh interpreter; medians of {repeats}; src: {workflow / 'src'})")
    print(f"  {'script':<22} {'seconds':>8} {'- torch':>8}  heavy packages loaded")
    bare_all = []
    for script in sorted((workflow / "scripts").glob("*.py")):
        code = script_imports(script)
        if script.stem not in DATA_SCRIPTS and "dermcompress.learn" not in code:
            continue  # aggregation (tables, figures): local jobs, not the start-up in question
        pairs = [(imports_seconds("import torch", env), imports_seconds(code, env)) for _ in range(repeats)]
        bare_all += [b for b, _ in pairs]
        seconds = statistics.median(s for _, s in pairs)
        excess = statistics.median(s - b for b, s in pairs)
        probe = code + "; import sys; print(' '.join(sys.modules))"
        loaded = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout
        heavy = " ".join(h for h in ("torch", *HEAVY) if h in loaded.split())
        print(f"  {script.stem:<22} {seconds:>8.2f} {excess:>+8.2f}  {heavy}")
    print(f"  (bare `import torch`: median {statistics.median(bare_all):.2f} s of {len(bare_all)})")


def write_config(workdir: Path, experiments: list[str]) -> Path:
    """config.demo.yaml with only `experiments` run."""
    config = yaml.safe_load((workdir / "config.demo.yaml").read_text())
    unknown = sorted(set(experiments) - set(config["experiments"]))
    if unknown:
        sys.exit(f"config.demo.yaml has no experiments {unknown}; it has {sorted(config['experiments'])}")
    config["run_experiments"] = experiments
    path = workdir / "config.startup.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def rules_by_log(output: str) -> dict[str, str]:
    """Log path -> rule name, from Snakemake's job announcements (`rule NAME:` ... `    log: PATH`)."""
    found, rule = {}, None
    for line in output.splitlines():
        if match := re.match(r"^(?:local)?(?:rule|checkpoint) (\S+):$", line):
            rule = match.group(1)
        elif rule and (match := re.match(r"^\s+log: (.+)$", line)):
            for path in match.group(1).split(", "):
                found[path.removesuffix(" (check log file(s) for error details)")] = rule
        elif not line.startswith(" "):
            rule = None
    return found


def kind_of(rule: str | None, log: Path) -> str | None:
    """The kind of torch job a rule (or, failing that, its log path) is, or None for other rules."""
    if rule is not None:
        return TORCH_KINDS.get(rule.split("__")[0])
    parts, stem = log.parts, log.stem.split("__")[0]
    if "features" in parts:
        return "features"
    if stem in ("train", "linear"):
        return stem
    if stem.startswith("evaluate") and "runs" in parts:
        return "evaluate_probe" if {"linear", "knn"} & set(parts) else "evaluate"
    return None


def job_figures(log: Path, offset: float) -> dict | None:
    """From a torch job's log: start-up (process start to its first log line), set-up, wall seconds.

    The `started N s after the process` line of job_logging gives the start-up; a checkout that logs none has
    only its `wall time` line, whose start-up (and so total) psutil measured, `offset` seconds too long
    (psutil_offset)."""
    stamps, started, wall = [], None, None
    for line in log.read_text().splitlines():
        if match := STAMP.match(line):
            stamps.append(datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
        if started is None and (match := STARTED.search(line)):
            started = float(match.group(1))
        if match := WALL.search(line):
            wall = (float(match.group(1)), dict(PHASE.findall(match.group(2))))
    if wall is None:  # no `wall time` line: not a job with phases (or it failed)
        return None
    total, phases = wall
    phases = {name.strip(): float(s) for name, s in phases.items()}
    late = 0.0 if started is not None else offset  # the `wall time` line's start-up and total, too long
    return {
        "startup": started if started is not None else phases.get("start-up", 0.0) - late,
        "setup": phases.get("setup", 0.0),
        "wall": total - late,
        "started_line": started is not None,
    }


def proc_age() -> float:
    """Seconds since this process was created, from the kernel's clock since boot (Linux)."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return uptime - started / os.sysconf("SC_CLK_TCK")


def psutil_offset() -> float:
    """How much psutil's create_time makes a process look older than it is (its boot time is in whole seconds,
    on a wall clock that may have been stepped since): what a checkout's `wall time` start-up has too much."""
    import psutil

    return (time.time() - psutil.Process().create_time()) - proc_age()


def bare_import_torch() -> tuple[float, float]:
    """A bare `python -c 'import torch'`: seconds from its process's start to torch imported, and the wall time
    of the command (which adds the interpreter's exit after torch, ~0.3-1 s, that a job skips: exit_now)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, capture_output=True)
    return imports_seconds("import torch"), time.perf_counter() - start


def through_snakemake(args: argparse.Namespace, base: Path) -> int:
    workdir = copy_workflow(args.workflow, base / "wf")
    shutil.copy2(args.workflow / "config.demo.yaml", workdir / "config.demo.yaml")
    config = write_config(workdir, args.experiments)
    idle = (args.idle, args.patience)
    bare: list[tuple[float, float]] = []
    wait_until_idle(*idle)
    bare += [bare_import_torch() for _ in range(args.repeats)]
    cmd = [
        str(Path(sys.executable).parent / "snakemake"),
        "--cores",
        str(args.cores),
        "--configfile",
        str(config.name),
    ]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as `make demo` runs it
    run = timed(cmd, workdir, workdir / "snakemake.log", idle)
    bare += [bare_import_torch() for _ in range(args.repeats)]
    bare_s = statistics.median(age for age, _ in bare)
    offset = psutil_offset()

    rules = rules_by_log((workdir / "snakemake.log").read_text())
    kinds: dict[str, list[dict]] = defaultdict(list)
    for log in sorted((workdir / "results/logs").rglob("*.log")):
        rel = log.relative_to(workdir).as_posix()
        kind = kind_of(rules.get(rel), log.relative_to(workdir))
        if kind and (figures := job_figures(log, offset)):
            kinds[kind].append(figures)
    print(f"\nthrough Snakemake: {', '.join(args.experiments)} of config.demo.yaml, --cores {args.cores}")
    print(f"  {show('snakemake', run)}")
    print(
        f"  bare `python -c 'import torch'`, {len(bare)} times, half before the run, half after: medians "
        f"{bare_s:.2f} s from its process's start to torch imported, {statistics.median(w for _, w in bare):.2f} s "
        "of wall time with the interpreter's exit (what a job skips: exit_now); the first is the baseline"
    )
    if not any(j["started_line"] for jobs in kinds.values() for j in jobs):
        print(
            f"  (no `started` lines: start-ups from the `wall time` lines, less psutil's clock offset "
            f"of {offset:.2f} s measured here)"
        )
    print(
        f"  {'kind':<15} {'jobs':>4} {'start-up':>9} {'- torch':>8} {'set-up':>7} {'wall':>6}"
        "   (medians, seconds; start-up: to the job's first log line)"
    )
    checks = {}
    for kind in TORCH_KINDS.values():
        jobs = kinds.get(kind)
        if not jobs:
            continue
        med = {key: statistics.median(j[key] for j in jobs) for key in ("startup", "setup", "wall")}
        excess = med["startup"] - bare_s
        print(
            f"  {kind:<15} {len(jobs):>4} {med['startup']:>9.2f} {excess:>+8.2f} {med['setup']:>7.2f} "
            f"{med['wall']:>6.2f}"
        )
        checks[f"{kind}: start-up {excess:+.2f} s beyond a bare import torch <= {TARGET_S:.0f} s"] = (
            excess <= TARGET_S
        )
    if not checks:
        print("no torch job found in the run's logs")
        return 1
    print()
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}: {name}")
    return 0 if all(checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflow", type=Path, default=REPO, help="checkout to run (default: this one)")
    parser.add_argument(
        "--experiments",
        nargs="+",
        default=["frozen_vs_finetuned", "robustness"],
        help="config.demo.yaml experiments to run (default: frozen_vs_finetuned robustness)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timings of each import, and of the bare one")
    parser.add_argument(
        "--cores", type=int, default=1, help="Snakemake --cores (default 1: one job at a time)"
    )
    parser.add_argument("--keep", type=Path, help="keep the work folder here (default: a temporary folder)")
    parser.add_argument(
        "--idle",
        type=float,
        default=0.25,
        help="before each timed part, wait until other processes use fewer cores than this (default 0.25)",
    )
    parser.add_argument("--patience", type=float, default=600, help="longest wait for that, in seconds (600)")
    parser.add_argument("--imports-only", action="store_true", help="only the per-script import table")
    args = parser.parse_args(argv)
    args.workflow = args.workflow.resolve()
    print(f"{load()}; workflow {args.workflow}", flush=True)
    imports_table(args.workflow, args.repeats, (args.idle, args.patience))
    if args.imports_only:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        return through_snakemake(args, base)


if __name__ == "__main__":
    sys.exit(main())
