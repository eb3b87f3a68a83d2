"""The workflow through a real SLURM: a one-node cluster stood up on this machine (tests/slurm/up.sh), the
SLURM executor plugin, the CI profile (profiles/slurm-ci), sbatch and srun for every job.

One workflow run (the module fixture) carries the tests: a trimmed demo with three identical training runs but
for where they run: `single` on one fake H100; `preempted` likewise but stopped mid-training with the signal
SLURM sends before a time limit (`scancel --signal=TERM`, what `--signal=TERM@...` delivers), then resumed by
Snakemake's retry; and `ddp` on two fake H100s, i.e. two ranks under torchrun, stopped and resumed likewise.
The model is a ViT without dropout and the micro batch is half the global batch, so all three must end with the
very same predictions (test_ddp.py explains why exactly).

Without root or apt the SLURM tests skip locally, saying why; with DERMCOMPRESS_REQUIRE_SLURM=1 (`make test`,
`make test-slurm`) or CI set they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, copy_workflow, write_config

pytestmark = [pytest.mark.workflow, pytest.mark.slurm]

UP, DOWN = REPO / "tests/slurm/up.sh", REPO / "tests/slurm/down.sh"
REQUIRED = bool(os.environ.get("DERMCOMPRESS_REQUIRE_SLURM") or os.environ.get("CI"))
TIMEOUT_S = 900  # the whole workflow run; `timeout -s INT` makes Snakemake cancel its jobs and stop
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+)\b")

# Three runs that differ only in their experiment's name (and so in how the CI profile places them).
GRID = {
    "models": ["tiny_vit"],
    "resolutions": [64],
    "train_variants": ["clean"],
    "eval_variants": ["clean"],
    "modes": ["finetune"],
    "lr": [1.0e-3],
    "schedules": ["cosine"],
    "epochs": [4],
    "seeds": [0],
}
EXPERIMENTS = ("single", "preempted", "ddp")
PREEMPTED = ("preempted", "ddp")  # stopped once mid-training, then resumed by Snakemake's retry
METRICS = ("accuracy", "auc", "f1_macro", "balanced_accuracy")
OVERLAY = {
    "data": {"synthetic": {"n": 1000, "seed": 0}},
    "resize": {"resolutions": [64]},
    "degrade": {"variants": {"clean": {"fractions": {}}}},
    "cache": {"rows_per_shard": 256, "row_group_size": 32},
    "models": {"tiny_vit": {"source": "timm:vit_tiny_patch16_224", "pretrained": False}},
    # Two micro batches per step: one process accumulates them, two ranks take one each.
    "training": {"batch_size": 32, "micro_batch_size": 16, "epochs": 4, "log_every": 1, "n_bootstrap": 50},
    "experiments": {name: {"description": f"SLURM test: {name}", **GRID} for name in EXPERIMENTS},
    "run_experiments": list(EXPERIMENTS),
}


def say(request, line: str) -> None:
    """Show a line in pytest's output even when output is captured (so a reader sees sbatch at work)."""
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(line, flush=True)


@pytest.fixture(scope="module")
def slurm(request):
    """A running one-node SLURM: ours, stood up for this module (and torn down after), or one already up."""
    start = time.monotonic()
    proc = subprocess.run([str(UP)], capture_output=True, text=True, timeout=600)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        reason = (
            f"cannot stand up a test SLURM here: {output.splitlines()[-1] if output else proc.returncode}"
        )
        if REQUIRED:
            pytest.fail(f"{reason}\n{output}")
        pytest.skip(reason)
    say(request, f"\n{output} (tests/slurm/up.sh took {time.monotonic() - start:.1f} s)")
    yield
    if "already running" not in output:
        subprocess.run([str(DOWN)], check=False, timeout=120)


class Run:
    """`snakemake` in the background, its output collected line by line as it comes."""

    def __init__(self, workdir: Path, *args: str) -> None:
        cmd = ["timeout", "-s", "INT", str(TIMEOUT_S), sys.executable, "-m", "snakemake", *args]
        self.proc = subprocess.Popen(
            cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def submissions(self) -> list[tuple[str, str, Path]]:
        """(SLURM job id, rule, SLURM log) of every sbatch so far, in order."""
        found = []
        for line in list(self.lines):
            if m := SUBMITTED.search(line):
                log = Path(m.group(2))
                found.append(
                    (m.group(1), log.parts[log.parts.index("slurm_logs") + 1].removeprefix("rule_"), log)
                )
        return found

    def wait(self) -> int:
        code = self.proc.wait(timeout=TIMEOUT_S + 60)
        self.reader.join(timeout=10)
        return code


def run_log(workdir: Path, experiment: str) -> Path:
    return next((workdir / "results/logs/runs" / experiment).rglob("*.log"))


def preempt_when_training(run: Run, workdir: Path) -> dict[str, tuple[str, int]]:
    """Wait for the first attempt of each run in PREEMPTED to log an optimizer step, then send its job SIGTERM as
    SLURM would before a time limit. Returns experiment -> (its SLURM job id, the run's total steps)."""
    signalled: dict[str, tuple[str, int]] = {}
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and run.proc.poll() is None and len(signalled) < len(PREEMPTED):
        for experiment in set(PREEMPTED) - set(signalled):
            jobs = [
                j
                for j, rule, log in run.submissions()
                if rule == "train" and log.parent.name.startswith(experiment)
            ]
            logs = list((workdir / "results/logs/runs" / experiment).rglob("*.log"))
            steps = STEP_LINE.findall(logs[0].read_text()) if jobs and logs else []
            if steps:
                subprocess.run(["scancel", "--signal=TERM", jobs[0]], check=True)
                signalled[experiment] = jobs[0], int(steps[0][1])
        time.sleep(0.05)
    if len(signalled) < len(PREEMPTED):
        pytest.fail(
            f"only {sorted(signalled)} of {PREEMPTED} started training:\n" + "\n".join(run.lines[-60:])
        )
    return signalled


@pytest.fixture(scope="module")
def finished(slurm, request, tmp_path_factory):
    """The trimmed demo through SLURM with the runs in PREEMPTED stopped once: (workdir, Run, {experiment: (job
    id, steps)})."""
    workdir = copy_workflow(tmp_path_factory.mktemp("slurm"))
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    for key, value in OVERLAY.items():  # sections merge, except the model registry and the experiments
        merge = isinstance(value, dict) and key not in ("models", "experiments")
        config[key] = {**config[key], **value} if merge else value
    write_config(workdir / "config.yaml", config)
    run = Run(workdir, "--profile", "profiles/slurm-ci")
    signalled = preempt_when_training(run, workdir)
    code = run.wait()
    for line in run.lines:  # Snakemake's own words: real sbatch job ids
        if "submitted with SLURM jobid" in line:
            say(request, line)
    if code != 0:
        pytest.fail(f"snakemake through SLURM failed ({code}):\n" + "\n".join(run.lines[-150:]))
    return workdir, run, signalled


def outputs(workdir: Path, experiment: str) -> tuple[Path, dict]:
    metrics = next((workdir / "results/runs" / experiment).rglob("metrics.json"))
    return metrics.parent, json.loads(metrics.read_text())


def train_jobs(run: Run, experiment: str) -> list[tuple[str, Path]]:
    """(SLURM job id, SLURM log) of each attempt of an experiment's training run, in order."""
    return [
        (j, log)
        for j, rule, log in run.submissions()
        if rule == "train" and log.parent.name.startswith(experiment)
    ]


def test_demo_runs_end_to_end_through_slurm(finished):
    workdir, run, signalled = finished
    jobs = run.submissions()
    rules = {rule for _, rule, _ in jobs}
    # Every stage went through sbatch (aggregation too, unless the workflow declares it local).
    assert {"synth", "ingest", "task", "split", "resize", "degrade", "train"} <= rules, rules
    assert all(log.is_file() for _, _, log in jobs), "SLURM writes each job's log"
    # Training jobs asked SLURM for H100s on the GPU partition: one, or two for the `ddp` experiment.
    for experiment in EXPERIMENTS:
        for job, _ in train_jobs(run, experiment):
            shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
            gpus = 2 if experiment == "ddp" else 1
            assert f"TresPerJob=gres:gpu:h100:{gpus}" in shown and "Partition=gpu" in shown, shown
    # With two GPUs the script relaunched itself under torchrun, and the run trained on two ranks.
    _, ddp = outputs(workdir, "ddp")
    assert ddp["world_size"] == 2 and ddp["steps"] == signalled["ddp"][1]
    assert all("launching 2 ranks" in log.read_text() for _, log in train_jobs(run, "ddp"))
    # The three runs agree to the last bit: one GPU; one GPU, stopped and resumed; two GPUs, stopped and resumed.
    single_dir, single = outputs(workdir, "single")
    assert single["world_size"] == 1 and single["accuracy"] > 0.5
    reference = pd.read_parquet(single_dir / "predictions.parquet")
    for experiment in PREEMPTED:
        other_dir, other = outputs(workdir, experiment)
        pd.testing.assert_frame_equal(
            pd.read_parquet(other_dir / "predictions.parquet"), reference, check_exact=True
        )
        assert {k: other[k] for k in METRICS} == {k: single[k] for k in METRICS}
    # Aggregation ran on the finished runs.
    assert len(pd.read_csv(workdir / "results/runs/index.csv")) == len(EXPERIMENTS)


@pytest.mark.parametrize("experiment", PREEMPTED)
def test_preempted_training_resumes_from_its_checkpoint(finished, experiment):
    workdir, run, signalled = finished
    signalled_job, total_steps = signalled[experiment]
    attempts = train_jobs(run, experiment)
    assert [job for job, _ in attempts] == [signalled_job, attempts[-1][0]] and len(attempts) == 2, attempts
    # Attempt 1: stopped by the signal after a step (or an epoch), wrote a checkpoint, failed on purpose.
    first = attempts[0][1].read_text()
    stopped = re.search(r"Preempted: SIGTERM (?:at step (\d+)|after epoch \d+)", first)
    assert stopped, first[-3000:]
    # Attempt 2 (Snakemake's retry): the checkpoint was still there (outside the job's outputs) and it resumed.
    log = run_log(workdir, experiment).read_text()
    resumed = re.search(r"resuming from \S+checkpoint\.pt: step (\d+), epoch (\d+)", log)
    assert resumed, log[-3000:]
    step = int(resumed.group(1))
    assert 0 < step < total_steps
    if stopped.group(1):
        assert int(stopped.group(1)) == step
    _, metrics = outputs(workdir, experiment)
    assert metrics["steps"] == total_steps


def test_h100_profile_maps_rules_to_partitions_and_gpus(tmp_path):
    """The production profile as Snakemake reads it (a dry run: no cluster needed): data stages on the CPU
    partition, training on one H100 with the warning signal, and its documented per-experiment GPU override."""
    workdir = copy_workflow(tmp_path / "wf")
    profile = yaml.safe_load((workdir / "profiles/slurm-h100/config.yaml").read_text())
    override = (
        "4 if wildcards.experiment == 'resolution_sweep' else 1"  # the example in the profile's comments
    )
    assert f'gpu: "{override}"' in (workdir / "profiles/slurm-h100/config.yaml").read_text()
    profile["set-resources"]["train"]["gpu"] = override
    (workdir / "profiles/slurm-h100/config.yaml").write_text(yaml.safe_dump(profile))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--profile",
            "profiles/slurm-h100",
            "--configfile",
            str(REPO / "config.demo.yaml"),
            "-n",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Each planned job: its `rule NAME:` line, then indented lines, among them its resources and wildcards.
    jobs = re.findall(r"(?m)^rule (\w+):\n(?:[ \t].*\n)*?[ \t]+resources: (.*)", proc.stdout + proc.stderr)
    by_rule: dict[str, list[str]] = {}
    for rule, resources in jobs:
        by_rule.setdefault(rule, []).append(resources)
    assert all("slurm_partition=cpu" in r and "gpu" not in r for r in by_rule["degrade"] + by_rule["resize"])
    trains = by_rule["train"]
    assert all(
        "slurm_partition=gpu" in r and "gpu_model=h100" in r and "--signal=TERM@600" in r for r in trains
    )
    wildcards = re.findall(
        r"(?m)^rule train:\n(?:[ \t].*\n)*?[ \t]+wildcards: experiment=(\w+)", proc.stdout + proc.stderr
    )
    assert len(wildcards) == len(trains) > 1 and "resolution_sweep" in wildcards
    for experiment, resources in zip(wildcards, trains, strict=True):
        assert f"gpu={4 if experiment == 'resolution_sweep' else 1}," in resources, (experiment, resources)
