"""The workflow through a real SLURM: a one-node cluster stood up on this machine (tests/slurm/up.sh), the
SLURM executor plugin, the CI profile (profiles/slurm-ci), sbatch and srun for every job.

The module fixture runs a trimmed demo with three trainings that are the same computation under three registry
names (so three runs): `tiny_single` on one fake H100, evaluated on two variants, the training and both
evaluations one group submission asking for one GPU; `tiny_preempted` likewise but stopped mid-training with
the signal SLURM sends before a time limit (`scancel --signal=TERM`, what `--signal=TERM@...` delivers), then
resumed by Snakemake's retry; and `tiny_ddp` on two fake H100s, i.e. two ranks under torchrun, stopped and
resumed likewise. The model is a ViT without dropout and the micro batch is half the global batch, so all three
must end with the very same predictions (test_ddp.py explains why exactly). A linear probe (`tiny_probe`) reads
frozen features of three splits, extracted in one submission on one GPU; and two short runs at 32 px are packed
into one submission. All of it is one Snakemake run, as a user's would be.

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
from test_workflow import kind

pytestmark = [pytest.mark.workflow, pytest.mark.slurm]

UP, DOWN = REPO / "tests/slurm/up.sh", REPO / "tests/slurm/down.sh"
REQUIRED = bool(os.environ.get("DERMCOMPRESS_REQUIRE_SLURM") or os.environ.get("CI"))
TIMEOUT_S = 900  # the whole workflow run; `timeout -s INT` makes Snakemake cancel its jobs and stop
SUBMITTED = re.compile(r"Job \S+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+)\b")

# Three trainings that differ only in their model's registry name (and so in how the CI profile places them).
GRID = {
    "resolutions": [64],
    "train_variants": ["clean"],
    "eval_variants": ["clean"],
    "modes": ["finetune"],
    "lr": [1.0e-3],
    "schedules": ["cosine"],
    "epochs": [4],
    "seeds": [0],
    "reference": {"res": 64},
}
EXPERIMENTS = {"single": "tiny_single", "preempted": "tiny_preempted", "ddp": "tiny_ddp"}
PREEMPTED = ("preempted", "ddp")  # stopped once mid-training, then resumed by Snakemake's retry
PROBE = "tiny_probe"  # a linear probe on frozen features: its three feature extractions share one submission
# Two short runs at 32 px packed into one submission (`--group-components run_32px=2`, as slurm-h100 packs its
# 56 px runs); the 64 px runs above are never packed (their group is run_64px).
PACKED = "tiny_packed"
PACK = ("--group-components", "features=8", "run_32px=2")
METRICS = ("accuracy", "auc", "f1_macro", "balanced_accuracy")
OVERLAY = {
    "data": {"synthetic": {"n": 600, "seed": 0}},
    "resize": {"resolutions": [64, 32]},
    "degrade": {
        "variants": {
            "clean": {"fractions": {}},
            "jpeg_only": {"fractions": {"jpeg": 1.0}, "splits": ["train", "val", "test"]},
        }
    },
    "cache": {"rows_per_shard": 256, "row_group_size": 32},
    "models": {
        name: {"source": "timm:vit_tiny_patch16_224", "pretrained": False}
        for name in (*EXPERIMENTS.values(), PROBE, PACKED)
    },
    # Two micro batches per step: one process accumulates them, two ranks take one each.
    "training": {
        "batch_size": 32,
        "micro_batch_size": 16,
        "epochs": 4,
        "log_every": 1,
        "n_bootstrap": 50,
        "probe": {"learning_rates": [1.0e-3, 1.0e-2], "iterations": 20, "batch_size": 64, "momentum": 0.9},
    },
    "experiments": {
        name: {
            "description": f"SLURM test: {name}",
            **GRID,
            "models": [model],
            # `single` is evaluated on two variants: both evaluations ride in its training's submission.
            "eval_variants": ["clean", "jpeg_only"] if name == "single" else ["clean"],
        }
        for name, model in EXPERIMENTS.items()
    }
    | {
        "probe": {
            "description": "SLURM test: a linear probe",
            **{k: v for k, v in GRID.items() if k not in ("lr", "schedules", "epochs")},
            "models": [PROBE],
            "modes": ["linear"],
        },
        "packed": {
            "description": "SLURM test: a pack",
            **GRID,
            "models": [PACKED],
            "resolutions": [32],
            "lr": [3.0e-3, 1.0e-2],
            "reference": {"res": 32},
        },
    },
    "run_experiments": [*EXPERIMENTS, "probe", "packed"],
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
        self.shown: dict[str, str] = {}  # SLURM job id -> `scontrol show job`
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

    def watch_jobs(self) -> None:
        """Keep what `scontrol show job` says of each submission while SLURM still knows it (slurmctld forgets
        finished jobs after MinJobAge)."""
        for job, _, _ in self.submissions():
            if job not in self.shown:
                shown = subprocess.run(
                    ["scontrol", "show", "job", job], capture_output=True, text=True
                ).stdout
                if shown:
                    self.shown[job] = shown

    def wait(self) -> int:
        deadline = time.monotonic() + TIMEOUT_S + 60
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.watch_jobs()
            time.sleep(0.5)
        code = self.proc.wait(timeout=60)
        self.reader.join(timeout=10)
        self.watch_jobs()
        return code


def train_log(workdir: Path, experiment: str) -> Path:
    return next((workdir / "results/logs/runs" / EXPERIMENTS[experiment]).rglob("train.log"))


def run_jobs(run: Run, experiment: str) -> list[tuple[str, Path]]:
    """(SLURM job id, SLURM log) of each submission of an experiment's run (its training's group), in order."""
    folder = f"results/runs/{EXPERIMENTS[experiment]}/"
    return [
        (j, log)
        for j, rule, log in run.submissions()
        if rule.startswith("group_run_") and log.is_file() and folder in log.read_text()
    ]


def preempt_when_training(
    run: Run, workdir: Path, experiments: tuple[str, ...]
) -> dict[str, tuple[str, int]]:
    """Wait for the first attempt of each run in `experiments` to log an optimizer step, then send its job
    SIGTERM as SLURM would before a time limit. Returns experiment -> (its SLURM job id, the run's steps)."""
    signalled: dict[str, tuple[str, int]] = {}
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and run.proc.poll() is None and len(signalled) < len(experiments):
        for experiment in set(experiments) - set(signalled):
            jobs = run_jobs(run, experiment)
            logs = list((workdir / "results/logs/runs" / EXPERIMENTS[experiment]).rglob("train.log"))
            steps = STEP_LINE.findall(logs[0].read_text()) if jobs and logs else []
            if steps:
                subprocess.run(["scancel", "--signal=TERM", jobs[0][0]], check=True)
                signalled[experiment] = jobs[0][0], int(steps[0][1])
        run.watch_jobs()
        time.sleep(0.05)
    if len(signalled) < len(experiments):
        pytest.fail(
            f"only {sorted(signalled)} of {experiments} started training:\n" + "\n".join(run.lines[-60:])
        )
    return signalled


def through_slurm(request, workdir: Path, experiments: tuple[str, ...], *args: str) -> tuple[Run, dict]:
    """One Snakemake run through SLURM, its runs in `experiments` stopped once mid-training."""
    run = Run(workdir, "--profile", "profiles/slurm-ci", *args)
    signalled = preempt_when_training(run, workdir, experiments)
    code = run.wait()
    for line in run.lines:  # Snakemake's own words: real sbatch job ids
        if "submitted with SLURM jobid" in line:
            say(request, line)
    if code != 0:
        pytest.fail(f"snakemake through SLURM failed ({code}):\n" + "\n".join(run.lines[-150:]))
    return run, signalled


@pytest.fixture(scope="module")
def finished(slurm, request, tmp_path_factory):
    """The trimmed demo through SLURM in one Snakemake run, the runs in PREEMPTED stopped once: (workdir,
    {experiment: its Snakemake Run}, {experiment: (job id, steps)})."""
    workdir = copy_workflow(tmp_path_factory.mktemp("slurm"))
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    for key, value in OVERLAY.items():  # sections merge, except the model registry and the experiments
        merge = isinstance(value, dict) and key not in ("models", "experiments")
        config[key] = {**config[key], **value} if merge else value
    write_config(workdir / "config.yaml", config)
    run, signalled = through_slurm(request, workdir, PREEMPTED, *PACK)
    return workdir, {name: run for name in [*EXPERIMENTS, "probe", "packed"]}, signalled


def rules_in(smk: str) -> set[str]:
    """The rules a .smk file defines (`rule NAME:`, `use rule ... as NAME with:`), and the kinds of those it makes
    per set of jobs (`rule_name("figures", ...)`: the rules `figures__...`, of kind `figures`)."""
    text = (REPO / smk).read_text()
    return (
        set(re.findall(r"(?m)^rule (\w+):", text))
        | set(re.findall(r"(?m)^use rule \w+ as (\w+) with:", text))
        | set(re.findall(r'rule_name\(\s*"(\w+)"', text))
    )


def local_rules() -> set[str]:
    """The rules the Snakefile's `localrules:` block names: they run where Snakemake runs, never through sbatch."""
    block = re.search(r"(?m)^localrules:\n((?:[ \t]+\w+,?\n)+)", (REPO / "Snakefile").read_text())
    return set(re.findall(r"\w+", block.group(1)))


AGGREGATION = rules_in("workflow/rules/aggregate.smk")


def evaluation(workdir: Path, experiment: str, variant: str = "clean") -> tuple[Path, dict]:
    (metrics,) = (workdir / "results/runs" / EXPERIMENTS[experiment]).rglob(f"eval/{variant}/metrics.json")
    return metrics.parent, json.loads(metrics.read_text())


def test_demo_runs_end_to_end_through_slurm(finished):
    workdir, runs, signalled = finished
    jobs = runs["single"].submissions()
    rules = {rule for _, rule, _ in jobs}
    # Every data stage went through sbatch, aggregation never (the Snakefile's localrules); training and
    # evaluation only inside groups.
    assert {
        "synth",
        "ingest",
        "task",
        "split",
        "resize",
        "degrade",
    } <= rules, rules
    # (a group's submission is named by its group and its rules: train and the run's one evaluation rule)
    assert any(r.startswith("group_run_64px_") and "evaluate__clean__jpeg_only" in r for r in rules), rules
    assert not {kind(r) for r in rules} & {"train", "evaluate"}, rules
    assert not {kind(r) for r in rules} & AGGREGATION, rules  # on the login node (localrules)
    assert list((workdir / "results/figures").glob("*.png")), "the figures jobs ran, none through sbatch"
    assert all(log.is_file() for _, _, log in jobs), "SLURM writes each job's log"
    # One submission for the training and its evaluation job (both eval variants), asking SLURM for one H100 on
    # the GPU partition.
    ((job, log),) = run_jobs(runs["single"], "single")
    text = log.read_text()
    # (the job step's Snakemake runs each as a local rule)
    assert text.count("localrule train:") == 1, text[-3000:]
    assert text.count("localrule evaluate__clean__jpeg_only:") == 1, text[-3000:]
    shown = runs["single"].shown[job]
    assert "TresPerJob=gres:gpu:h100:1" in shown and "Partition=gpu" in shown, shown
    for job, _ in run_jobs(runs["ddp"], "ddp"):
        assert "TresPerJob=gres:gpu:h100:2" in runs["ddp"].shown[job]
    # With two GPUs the script relaunched itself under torchrun, and the run trained on two ranks.
    _, ddp = evaluation(workdir, "ddp")
    assert ddp["steps"] == signalled["ddp"][1]
    assert all("launching 2 ranks" in log.read_text() for _, log in run_jobs(runs["ddp"], "ddp"))
    assert "rank 0 of 2" in train_log(workdir, "ddp").read_text()
    # The three runs agree to the last bit: one GPU; one GPU, stopped and resumed; two GPUs, stopped and resumed.
    single_dir, single = evaluation(workdir, "single")
    assert single["accuracy"] > 0.5
    reference = pd.read_parquet(single_dir / "predictions.parquet")
    for experiment in PREEMPTED:
        other_dir, other = evaluation(workdir, experiment)
        pd.testing.assert_frame_equal(
            pd.read_parquet(other_dir / "predictions.parquet"), reference, check_exact=True
        )
        assert {k: other[k] for k in METRICS} == {k: single[k] for k in METRICS}
    # The weights went away with their evaluations; aggregation ran on the finished runs.
    assert not list((workdir / "results").rglob("weights.safetensors"))
    assert not list((workdir / "results").rglob("checkpoint.pt"))
    assert (
        len(pd.read_csv(workdir / "results/runs/index.csv")) == len(EXPERIMENTS) + 4
    )  # single: two variants; the probe; the pack's two runs


def test_feature_extractions_share_one_submission_and_one_gpu(finished):
    """The probe's feature extractions (train, val, test of its variant) are one job, the backbone built once,
    in one submission of the profile's features group (group-components), asking SLURM for one H100; the probe
    read what it wrote."""
    workdir, runs, _ = finished
    run = runs["probe"]
    rules = [rule for _, rule, _ in run.submissions()]
    assert "features" not in {kind(r) for r in rules}, rules
    ((job, log),) = [(j, log) for j, rule, log in run.submissions() if rule.startswith("group_features_")]
    assert log.read_text().count("localrule features__train__val__test:") == 1
    shown = run.shown[job]
    assert "TresPerJob=gres:gpu:h100:1" in shown and "Partition=gpu" in shown, shown
    features = sorted(p.name for p in (workdir / "results/features" / PROBE).rglob("*.parquet"))
    assert features == ["test.parquet", "train.parquet", "val.parquet"], features
    (metrics,) = (workdir / "results/runs" / PROBE).rglob("eval/clean/metrics.json")
    assert json.loads(metrics.read_text())["n_eval"] > 0


def test_short_runs_pack_into_one_submission_on_one_gpu(finished):
    """Two more runs packed into one submission (PACK, as slurm-h100 packs its 56 px runs): the pack asks SLURM for
    one H100 and the sum of its trainings' time limits plus an evaluation's; the trainings run one after another
    on that GPU (the profile's one gpu_slot per submission), each followed by its evaluation."""
    workdir, runs, _ = finished
    run = runs["packed"]
    ((job, log),) = [(j, log) for j, rule, log in run.submissions() if rule.startswith("group_run_32px_")]
    text = log.read_text()
    assert text.count("localrule train:") == 2, text[-3000:]
    assert len(re.findall(r"localrule evaluate__\w+:", text)) == 2, text[-3000:]
    shown = run.shown[job]
    # runtime: 30 + 30 minutes of training, then the evaluations side by side (30)
    assert "TresPerJob=gres:gpu:h100:1" in shown and "TimeLimit=01:30:00" in shown, shown
    spans = []
    for lr in ("lr0.003", "lr0.01"):
        (train,) = (workdir / "results/logs/runs" / PACKED).rglob(f"{lr}_*/**/train.log")
        stamps = [line[:23] for line in train.read_text().splitlines() if line[:2] == "20"]
        spans.append((stamps[0], stamps[-1]))
        assert list((workdir / "results/runs" / PACKED).rglob(f"{lr}_*/**/eval/clean/metrics.json"))
    first, second = sorted(spans)
    assert first[1] <= second[0], spans  # one after another


@pytest.mark.parametrize("experiment", PREEMPTED)
def test_preempted_training_resumes_from_its_checkpoint(finished, experiment):
    workdir, runs, signalled = finished
    signalled_job, total_steps = signalled[experiment]
    attempts = run_jobs(runs[experiment], experiment)
    assert [job for job, _ in attempts] == [signalled_job, attempts[-1][0]] and len(attempts) == 2, attempts
    # Attempt 1: stopped by the signal after a step (or an epoch), wrote a checkpoint, failed on purpose.
    first = attempts[0][1].read_text()
    stopped = re.search(r"Preempted: SIGTERM (?:at step (\d+)|after epoch \d+)", first)
    assert stopped, first[-3000:]
    # Attempt 2 (Snakemake's retry): the checkpoint was still there (outside the job's outputs) and it resumed.
    log = train_log(workdir, experiment).read_text()
    resumed = re.search(r"resuming from \S+checkpoint\.pt: step (\d+), epoch (\d+)", log)
    assert resumed, log[-3000:]
    step = int(resumed.group(1))
    assert 0 < step < total_steps
    if stopped.group(1):
        assert int(stopped.group(1)) == step
    _, metrics = evaluation(workdir, experiment)
    assert metrics["steps"] == total_steps


def test_h100_profile_maps_rules_to_partitions_and_gpus(tmp_path):
    """The production profile as Snakemake reads it (a dry run of the study: no cluster needed): data stages
    and probes on the CPU partition; training, evaluation and features on one H100, training with the warning
    signal; and its documented GPU override for some runs."""
    workdir = copy_workflow(tmp_path / "wf")
    text = (workdir / "profiles/slurm-h100/config.yaml").read_text()
    override = "4 if wildcards.model == 'vit_b16' and wildcards.res == '224' else 1"  # the profile's example
    assert f'gpu: "{override}"' in text
    profile = yaml.safe_load(text)
    profile["set-resources"]["train"]["gpu"] = override
    (workdir / "profiles/slurm-h100/config.yaml").write_text(yaml.safe_dump(profile))
    cmd = [sys.executable, "-m", "snakemake", "--profile", "profiles/slurm-h100", "-n"]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Each planned job: its `rule NAME:` line, then indented lines, among them its wildcards and resources.
    jobs = re.findall(
        r"(?m)^\s*rule (\w+):\n(?:[ \t].*\n)*?[ \t]+wildcards: (.*)\n(?:[ \t].*\n)*?[ \t]+resources: (.*)",
        proc.stdout + proc.stderr,
    )
    by_rule: dict[str, list[tuple[str, str]]] = {}
    for rule, wildcards, resources in jobs:
        by_rule.setdefault(kind(rule), []).append((wildcards, resources))
    # Aggregation only reads small run outputs: every rule of aggregate.smk runs on the login node, never as a
    # cluster job (whose job step would start a Snakemake of its own for a few seconds of work).
    # (the Snakefile's localrules block names them, but the figures rules, made per set of figure kinds, which
    # say `localrule: True` themselves: test_demo_runs_end_to_end_through_slurm sees them run unsubmitted)
    assert {"table", "subgroups", "figures", "bytes_summary"} <= AGGREGATION <= local_rules() | {"figures"}
    for rule in ("degrade", "resize", "linear", "evaluate_probe"):
        assert all("slurm_partition=cpu" in r and "gpu=" not in r for _, r in by_rule[rule]), rule
    for rule in ("train", "features", "pretrain"):
        assert all("slurm_partition=gpu" in r and "gpu_model=h100" in r for _, r in by_rule[rule]), rule
    # Domain pretraining: one GPU job per pretraining config.yaml's experiments load, warned before its limit.
    assert len(by_rule["pretrain"]) == 3
    assert all("gpu=1" in r and "--signal=TERM@600" in r for _, r in by_rule["pretrain"])
    # Evaluations use their training's GPU: a group asks for the training's GPUs, not one more per evaluation.
    evaluations = by_rule["evaluate"]
    assert all("slurm_partition=gpu" in r and re.search(r"\bgpu=0\b", r) for _, r in evaluations), (
        evaluations[0]
    )
    assert all("--signal=TERM@600" in r for _, r in by_rule["train"])
    trains = by_rule["train"]
    assert len(trains) == 340  # the study (dermcompress plan counts them: tests/test_runs.py)
    for wildcards, resources in trains:
        big = "model=vit_b16," in wildcards and "res=224," in wildcards  # not vit_b16_derm
        assert f"gpu={4 if big else 1}," in resources, (wildcards, resources)
    assert any("model=vit_b16," in w and "res=224," in w for w, _ in trains)
    assert (
        "Group job run_56px" in proc.stdout + proc.stderr and "Group job probes" in proc.stdout + proc.stderr
    )
