"""The run layer's DAG, as Snakemake plans and runs it: each distinct training once, evaluated by one job on
all its eval variants; frozen features once for every probe, one job per backbone input writing each split;
weights that go away after their evaluations; no checkpoints left behind; and `dermcompress plan`, which counts
it all from the same DAG, with the jobs' fixed cost (start-up and set-up) beside the compute."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
from conftest import copy_workflow, snakemake, write_config
from safetensors.torch import save_file
from test_workflow import planned_jobs

from dermcompress.learn.phases import Phases
from dermcompress.learn.runs import FEATURES_DIR, Run
from dermcompress.study.plan import ASSUMED_FIXED_SECONDS, GPU_RULES, fixed_costs, format_plan, make_plan

pytestmark = pytest.mark.workflow

GRID = {
    "models": ["tiny"],
    "resolutions": [16],
    "train_variants": ["clean"],
    "eval_variants": ["clean"],
    "modes": ["finetune"],
    "lr": [1.0e-3],
    "seeds": [0],
    "reference": {"res": 16},
}
BASE = {
    "resize": {"resolutions": [16]},
    "models": {"tiny": {"source": "timm:resnet10t", "pretrained": False}},
    "degrade": {
        "variants": {
            "clean": {"fractions": {}},
            "degraded": {"fractions": {"jpeg": 0.2, "blur": 0.2, "quantize": 0.2}, "splits": ["train"]},
            "jpeg_only": {"fractions": {"jpeg": 1.0}, "splits": ["train", "val", "test"]},
            "blur_only": {"fractions": {"blur": 1.0}, "splits": ["train", "val", "test"]},
            "quantize_only": {"fractions": {"quantize": 1.0}, "splits": ["train", "val", "test"]},
        }
    },
}


def plan_jobs(
    workdir: Path, experiments: dict, models: dict | None = None
) -> set[tuple[str, tuple[str, ...]]]:
    """(rule, wildcards) of the jobs that a dry run of `experiments` plans (data stages included)."""
    overlay = {**BASE, "experiments": experiments, "run_experiments": list(experiments)}
    overlay["models"] = {**BASE["models"], **(models or {})}
    write_config(workdir / "grid.yaml", overlay)
    proc = snakemake(workdir, "--dry-run", "--configfile", "grid.yaml")
    return planned_jobs(proc.stdout + proc.stderr)


def kinds(jobs) -> Counter:
    """Jobs per kind of rule: a rule's name before `__` (`evaluate__clean__jpeg_only` is an evaluate job)."""
    return Counter(rule.split("__")[0] for rule, _ in jobs)


def written(jobs, kind: str) -> Counter:
    """What the jobs of a kind write, from their outputs: each eval variant an evaluation job scores (its
    eval/<variant>/metrics.json), each split a features job extracts (<split>.parquet), counted over the jobs."""
    found = Counter()
    for job in (j for j in jobs if j[0].split("__")[0] == kind):
        if kind == "features":
            found.update(Path(o).stem for o in job.outputs if o.endswith(".parquet"))
        else:
            found.update(Path(o).parent.name for o in job.outputs if o.endswith("/metrics.json"))
    return found


def wildcard(jobs, kind: str, name: str) -> list[str]:
    """The value of one wildcard of each job of a kind."""
    return [
        dict(w.split("=", 1) for w in wildcards)[name]
        for rule, wildcards in jobs
        if rule.split("__")[0] == kind
    ]


def test_a_training_two_experiments_ask_for_is_planned_once(workflow_dir):
    jobs = plan_jobs(
        workflow_dir,
        {"one": GRID, "two": {**GRID, "eval_variants": ["clean", "jpeg_only"], "training": {"log_every": 5}}},
    )
    assert kinds(jobs)["train"] == 1 and kinds(jobs)["table"] == 2
    # One evaluation job scores the run on both variants (the union of what the experiments ask).
    assert kinds(jobs)["evaluate"] == 1 and written(jobs, "evaluate") == Counter(["clean", "jpeg_only"])
    (train,) = [dict(w.split("=", 1) for w in wildcards) for rule, wildcards in jobs if rule == "train"]
    run_dir = Run.from_wildcards(SimpleNamespace(**train)).run_dir
    assert wildcard(jobs, "evaluate", "run") == [run_dir.removeprefix("results/runs/")]


def test_a_robustness_grid_trains_each_model_once_and_evaluates_it_per_variant(workflow_dir):
    variants = ["clean", "jpeg_only", "blur_only", "quantize_only"]
    jobs = plan_jobs(
        workflow_dir, {"robust": {**GRID, "train_variants": ["clean", "degraded"], "eval_variants": variants}}
    )
    # Two trainings, one evaluation job each, writing the 2 x 4 evaluations: every variant once per run.
    assert kinds(jobs)["train"] == 2 and kinds(jobs)["evaluate"] == 2
    assert written(jobs, "evaluate") == Counter(dict.fromkeys(variants, 2))
    assert len(set(wildcard(jobs, "evaluate", "run"))) == 2


def test_features_are_planned_once_for_every_probe_and_label_fraction(workflow_dir):
    """Linear and kNN probes at three label fractions and two seeds read the same three feature tables (the
    train, val and test split of the one variant) of a pretrained backbone, which one job writes; a random one's
    are its seed's."""
    grid = {k: v for k, v in GRID.items() if k != "lr"}
    grid |= {"modes": ["linear", "knn"], "label_fractions": [0.25, 0.5, 1.0], "seeds": [0, 1]}
    (workflow_dir / "models").mkdir()
    save_file(timm.create_model("resnet10t").state_dict(), str(workflow_dir / "models/tiny.safetensors"))
    pretrained = {"saved": {"source": "local:models/tiny.safetensors", "arch": "timm:resnet10t"}}
    jobs = plan_jobs(workflow_dir, {"probes": {**grid, "models": ["saved"]}}, models=pretrained)
    # One job (model x resolution x variant x init) writes train, val and test: seeds and fractions share them.
    assert kinds(jobs)["features"] == 1 and written(jobs, "features") == Counter(["train", "val", "test"])
    assert wildcard(jobs, "features", "features") == ["saved/16px/clean/pretrained"]
    assert kinds(jobs)["linear"] == 3 * 2  # fractions x seeds
    # kNN on all labels of a pretrained backbone is one run; on fewer labels the seed draws them. Each probe run
    # is one evaluation job, on its one eval variant.
    assert kinds(jobs)["evaluate_probe"] == 3 * 2 + (2 * 2 + 1)
    assert written(jobs, "evaluate_probe") == {"clean": 3 * 2 + (2 * 2 + 1)}
    assert kinds(jobs)["train"] == kinds(jobs)["evaluate"] == 0
    random_init = plan_jobs(workflow_dir, {"probes": grid})
    assert kinds(random_init)["features"] == 2  # one per seed, each writing the three splits
    assert written(random_init, "features") == Counter(dict.fromkeys(["train", "val", "test"], 2))
    assert sorted(wildcard(random_init, "features", "features")) == [
        f"tiny/16px/clean/seed{seed}" for seed in (0, 1)
    ]


def test_finished_study_leaves_no_weights_and_no_checkpoints(finished_study):
    """By default a run's weights are temporary (deleted once its evaluations have read them) and finished
    runs delete their checkpoints: results/ holds predictions, metrics and curves, not models."""
    results = finished_study / "results"
    assert not list(results.rglob("weights.safetensors"))
    assert not list(results.rglob("checkpoint.pt"))
    assert list(
        (results / ".lineage/records").rglob("weights.safetensors.json")
    )  # what they were stays on record
    assert list(results.rglob("eval/clean/metrics.json"))


def test_plan_counts_the_study_from_the_dag(tmp_path):
    """`dermcompress plan` on the repository's study: 340 distinct finetunes, three domain pretrainings, one evaluation job per run (all its
    eval variants), one feature extraction job per model x resolution x variant x init (all the splits the
    probes read), one GPU submission per training (its evaluation job in it), the short 56 px runs and the
    feature jobs packed, nothing left on disk at the end; per experiment what it adds to the others (runs shared
    across experiments are paid once); and the jobs' fixed cost beside the compute, assumed (and labelled so)
    where no log measures it."""
    workdir = copy_workflow(tmp_path / "wf")
    plan = make_plan(workdir, full_isic2019=True)
    # The study's 235 and the domain pretraining experiments' 105: domain_pretraining's 100 finetunes (4 models x
    # 5 label fractions x 5 seeds, both backbone pairs in one experiment) less the 5 of vit_b16 at 100%
    # (frozen_vs_finetuned's), and compression_aware's 10.
    assert plan["trainings"] == 235 + 45 + 50 + 10 == 340
    assert plan["jobs_by_kind"]["train"] == plan["jobs"]["train"] == 340
    # One evaluation job per run: the trainings; 60 linear probes, and the domain experiments' 50 + 50 less the 25
    # of vit_b16 that label_efficiency runs; 48 kNN banks and the domain experiments' 21 per new model (4 label
    # fractions x 5 seeds, 100% once: nothing in it depends on the seed).
    assert plan["linear_probes"] == 60 + 25 + 50 == 135
    assert plan["evaluation_jobs"] == 340 + 135 + 48 + 3 * 21
    assert plan["jobs_by_kind"]["evaluate"] == 340 and plan["jobs_by_kind"]["evaluate_probe"] == 135 + 48 + 63
    # Their evaluations, one per eval variant: compression_sweep's 510 (below); robustness's 80 less the 10 clean
    # evaluations of its clean-trained runs (the sweep's); the lr sweeps', resolution_sweep's and the finetunes
    # of frozen_vs_finetuned (clean only), less the runs they share (vit_lr_sweep's lr 1e-4 runs at 224 and 56
    # px are robustness's degraded ones, frozen_vs_finetuned's ViT and DINOv2 finetunes the lr sweeps'); and one
    # per probe run.
    trained = 510 + (80 - 10) + (45 - 10) + 45 + 15 + (20 - 10)
    assert trained == 685
    # and the domain experiments' new finetunes on clean (45 + 50), compression_aware's on its 14 variants.
    assert plan["gpu_evaluations"] == trained + 45 + 50 + 10 * 14 == 920
    assert plan["evaluations"] == 920 + 135 + 48 + 63
    # Features: the degraded variant's train and val (the probes' training), the clean one's val and test (the
    # scored) of each backbone: 3 pretrained, the random one once per seed; and of the domain experiments' three
    # new backbones (vit_b16_derm, dinov2_b14_timm, dinov2_b14_derm).
    assert plan["feature_jobs"] == plan["jobs_by_kind"]["features"] == 2 * (3 + 5 + 3)
    assert plan["jobs"]["features__train__val"] == plan["jobs"]["features__val__test"] == 3 + 5 + 3
    assert plan["feature_extractions"] == 6 * 4 + 4 * 5  # tables: 4 per backbone
    # Issue 22's target was 500 GPU jobs for the study (952 with a job per evaluation); the domain experiments
    # add 105 trainings, their 105 evaluation jobs, 6 feature jobs and the 3 pretrainings.
    assert plan["pretrainings"] == plan["jobs"]["pretrain"] == 3
    assert plan["gpu_jobs"] == 340 + 340 + 22 + 3 == 235 + 235 + 16 + 219
    # 270 trainings at 224 and 112 px alone, the 70 at 56 px four to a pack, the feature jobs eight to a pack,
    # each pretraining a submission of its own.
    assert plan["gpu_submissions"] == 270 + math.ceil(70 / 4) + math.ceil(22 / 8) + 3 < plan["gpu_jobs"]
    # Pretraining's image-passes and GPU-hours are counted (and are part of the whole).
    assert plan["pretrain_image_passes"] > 0 and 0 < plan["pretrain_gpu_hours"] < plan["gpu_hours"]
    # An experiment owns the pretrainings its models load: compression_aware its 10 runs, their 10 evaluation
    # jobs, the compression-aware pretraining (added) and the plain one (domain_pretraining's too).
    aware = plan["experiments"]["compression_aware"]
    assert aware["gpu_jobs"] == 10 + 10 + 2 and aware["gpu_jobs_added"] == 10 + 10 + 1
    # domain_pretraining, both backbone pairs in one experiment: its 100 finetunes and their evaluation jobs,
    # two feature jobs per backbone (vit_b16's are frozen_vs_finetuned's), the two pretrainings its models load
    # (the ViT's is compression_aware's too: one added).
    domain = plan["experiments"]["domain_pretraining"]
    assert domain["trainings"] == 100 and domain["trainings_added"] == 95
    assert domain["gpu_jobs"] == 100 + 100 + 2 * 4 + 2 and domain["gpu_jobs_added"] == 95 + 95 + 2 * 3 + 1
    assert set(plan["experiments"]) >= {"domain_pretraining", "compression_aware"}
    assert "domain_pretraining_dinov2" not in plan["experiments"]
    sweep = plan["experiments"]["compression_sweep"]
    # 2 models x 3 resolutions x (clean + 3 matched codecs) x 5 seeds; robustness's clean ViT runs at 224 and
    # 56 px are the sweep's (same lr, schedule and epochs), so they are not added.
    assert sweep["trainings"] == 2 * 3 * 4 * 5 and sweep["trainings_added"] == 120 - 2 * 5
    # Each training is evaluated by one job: on 14 variants (the clean-trained) or its own codec (the matched
    # arm); the shared runs' jobs are shared too (robustness evaluates them on other variants).
    assert sweep["gpu_jobs"] == 120 + 120 and sweep["gpu_jobs_added"] == 2 * 110
    assert sweep["evaluations"] == 2 * 3 * 5 * 14 + 3 * 2 * 3 * 5 == 510
    # The shared runs' clean evaluations are robustness's too.
    assert sweep["evaluations_added"] == 510 - 2 * 5
    robustness = plan["experiments"]["robustness"]
    assert robustness["trainings_added"] == robustness["gpu_jobs_added"] == 0  # all shared with the sweeps
    # What it adds is evaluations: the three single degradations on its 20 runs, scored in the shared jobs, so
    # compute but no fixed cost.
    assert robustness["evaluations"] == 20 * 4 and robustness["evaluations_added"] == 20 * 3
    assert robustness["gpu_hours_added"] > 0 and robustness["fixed_gpu_hours_added"] == 0
    # label_efficiency's probes read the features frozen_vs_finetuned's do (ViT and DINOv2).
    efficiency = plan["experiments"]["label_efficiency"]
    assert efficiency["gpu_jobs"] == 2 * 2 and efficiency["gpu_jobs_added"] == 0
    assert 0 < sweep["gpu_hours_added"] < sweep["gpu_hours"] < plan["gpu_hours"]
    assert sum(c["trainings_added"] for c in plan["experiments"].values()) < plan["trainings"]
    text = format_plan(plan)
    assert "compression_sweep: trainings 120 (added 110)" in text
    assert plan["disk"]["weights_end_gb"] == plan["disk"]["checkpoints_end_gb"] == 0
    assert plan["split_sizes"] == {"train": 6511, "val": 724, "test": 1809}
    assert plan["image_passes_forward_backward"] > 0 and plan["gpu_hours"] > 0
    # The fixed cost: no job has run in the copy, so each kind's start-up + set-up is the assumed figure, and
    # says so; per experiment, its GPU jobs' (the sweep's: 120 trainings and their 120 evaluation jobs).
    assert not (workdir / "results/logs").exists()
    for kind in GPU_RULES:
        fixed = plan["fixed"][kind]
        assert fixed["seconds"] == ASSUMED_FIXED_SECONDS[kind] and fixed["logs"] == 0
        assert fixed["source"].startswith("assumed") and fixed["jobs"] == plan["jobs_by_kind"][kind]
    fixed_hours = sum(plan["jobs_by_kind"][k] * ASSUMED_FIXED_SECONDS[k] for k in GPU_RULES) / 3600
    assert plan["fixed_gpu_hours"] == pytest.approx(fixed_hours)
    assert plan["compute_share"] == pytest.approx(plan["gpu_hours"] / (plan["gpu_hours"] + fixed_hours))
    sweep_fixed = 120 * (ASSUMED_FIXED_SECONDS["train"] + ASSUMED_FIXED_SECONDS["evaluate"]) / 3600
    assert sweep["fixed_gpu_hours"] == pytest.approx(sweep_fixed)
    assert sweep["compute_share"] == pytest.approx(sweep["gpu_hours"] / (sweep["gpu_hours"] + sweep_fixed))
    assert (
        f"+ {plan['fixed_gpu_hours']:.3g} fixed" in text
        and f"train {ASSUMED_FIXED_SECONDS['train']:.1f} s (assumed)" in text
    )
    assert json.loads(json.dumps(plan)) == plan  # JSON-ready, as `dermcompress plan --json` prints it


def test_plan_measures_the_fixed_cost_from_the_jobs_logs(tmp_path, caplog):
    """Start-up + set-up per kind of GPU job: the median of the `wall time` lines (learn/phases.py) in the logs
    that the workflow's jobs write (a log's last line: a retried job appends), not those of other rules or of
    an older layout; a kind that no log measures keeps the assumed figure."""

    def wall_time_line(startup: float, setup: float, work: str) -> str:
        phases = Phases(startup=startup)
        phases.seconds |= {"setup": setup, work: 1.0}
        with caplog.at_level(logging.INFO, logger="dermcompress.learn.phases"):
            phases.log()
        return f"2026-12-07 14:37:45,042 INFO dermcompress.learn.phases: {caplog.records[-1].getMessage()}\n"

    def write(path: str, *lines: str) -> None:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("".join(lines))

    def run_logs(**fields) -> str:
        run = Run(model="tiny", res=16, train_variant="clean", **fields)
        return run.run_dir.replace("results/runs/", "results/logs/runs/", 1)

    assert {k: v["logs"] for k, v in fixed_costs(tmp_path).items()} == dict.fromkeys(GPU_RULES, 0)
    trained = [run_logs(mode="finetune", lr="0.001", schedule="cosine", epochs=3, seed=s) for s in (0, 1, 2)]
    # Three trainings: 2.0 + 1.0, 1.5 + 2.5, 6.0 + 2.0 s (median 4.0 s, mean 5.0 s); the last one retried.
    write(f"{trained[0]}/train.log", "starting\n", wall_time_line(2.0, 1.0, "train"))
    write(f"{trained[1]}/train.log", wall_time_line(1.5, 2.5, "train"))
    write(f"{trained[2]}/train.log", wall_time_line(9.0, 9.0, "train"), wall_time_line(6.0, 2.0, "train"))
    # Two evaluation jobs; a probe run's evaluation (on CPUs) and an older layout's log do not count.
    write(f"{trained[0]}/evaluate.log", wall_time_line(3.0, 0.5, "evaluate"))
    write(f"{trained[1]}/evaluate.log", wall_time_line(3.0, 1.5, "evaluate"))
    write(f"{trained[2]}/evaluate_clean.log", wall_time_line(30.0, 30.0, "evaluate"))
    write(f"{run_logs(mode='linear')}/evaluate.log", wall_time_line(20.0, 20.0, "evaluate"))
    # A data stage's log and a features log without a wall time line (a job that failed) do not count either.
    write("results/logs/ingest.log", wall_time_line(50.0, 50.0, "ingest"))
    folder = FEATURES_DIR.format(model="tiny", res=16, variant="clean", init="seed0")
    write(f"{folder.replace('results/features/', 'results/logs/features/', 1)}.log", "Traceback ...\n")

    fixed = fixed_costs(tmp_path)
    assert (fixed["train"]["seconds"], fixed["train"]["logs"]) == (4.0, 3)
    assert (fixed["evaluate"]["seconds"], fixed["evaluate"]["logs"]) == (4.0, 2)
    assert all(fixed[k]["source"].startswith("measured") for k in ("train", "evaluate"))
    assert fixed["features"] == {
        "seconds": ASSUMED_FIXED_SECONDS["features"],
        "logs": 0,
        "source": fixed_costs(tmp_path / "elsewhere")["features"]["source"],
    }
    assert fixed["features"]["source"].startswith("assumed")
