"""Change one thing, rerun only what it affects: real `snakemake --dry-run` on a finished small study (conftest
STUDY: synthetic data at 32 and 16 px, experiments `base` (degraded -> clean) and `other` (clean -> clean) of a
tiny model, and their aggregation into tables and figures)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import CODE_EDIT, PRETRAIN_CHANGE, edited, snakemake, write_config
from test_workflow import evaluations_of, kind, planned_jobs, rules_of

pytestmark = pytest.mark.workflow

# resize writes the clean variant's cache, degrade every other variant's.
DATA_RULES = {"synth", "ingest", "task", "split", "resize", "degrade"}
BEFORE_DEGRADE = {"synth", "ingest", "task", "split", "resize"}


def dry_run(workdir: Path, change: dict | None = None) -> set:
    """Jobs a dry run plans with `change` merged into the study's config (nested keys merged)."""
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    merge(config, change or {})
    write_config(workdir / "changed.yaml", config)
    proc = snakemake(workdir, "--dry-run", "--configfile", "changed.yaml")
    return planned_jobs(proc.stdout + proc.stderr)


def merge(base: dict, change: dict) -> None:
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def wildcards(job) -> dict[str, str]:
    return dict(w.split("=", 1) for w in job[1])


def jobs_of(jobs, rule: str) -> list[dict[str, str]]:
    """The wildcards of the planned jobs of one kind of rule (test_workflow.kind)."""
    return [wildcards(job) for job in jobs if kind(job[0]) == rule]


def tables(jobs) -> set[str]:
    """The experiments whose table a dry run plans."""
    return {w["experiment"] for w in jobs_of(jobs, "table")}


# STUDY's runs: `base` finetunes on the degraded variant (and is evaluated on clean); `other` is a linear probe
# on the clean one.
BASE_RUN = {"model": "tiny", "res": "16", "train_variant": "degraded", "mode": "finetune"}


def test_nothing_changed_nothing_planned(finished_study):
    assert dry_run(finished_study) == set()


def test_new_learning_rate_reruns_only_that_training_its_evaluations_and_tables(finished_study):
    jobs = dry_run(finished_study, {"experiments": {"base": {"lr": [5.0e-4]}}})
    assert not rules_of(jobs) & DATA_RULES
    assert [t["hparams"] for t in jobs_of(jobs, "train")] == ["lr0.0005_linear_1ep"]
    assert [(e["hparams"], e["eval_variant"]) for e in evaluations_of(jobs)] == [
        ("lr0.0005_linear_1ep", "clean")
    ]
    assert not rules_of(jobs) & {"features", "linear", "evaluate_probe"}
    assert tables(jobs) == {"base"}
    assert "data_summary" not in rules_of(jobs)


def test_new_eval_variant_evaluates_the_run_again(finished_study):
    """A new eval variant needs the run's weights, which were temporary: the run trains again, and its one
    evaluation job scores the existing eval variant and the new one (with training.keep_weights no training
    runs: tests/test_train_workflow.py)."""
    jobs = dry_run(finished_study, {"experiments": {"base": {"eval_variants": ["clean", "degraded"]}}})
    assert len(jobs_of(jobs, "evaluate")) == 1
    assert [e["eval_variant"] for e in evaluations_of(jobs)] == ["clean", "degraded"]
    assert [{k: t[k] for k in BASE_RUN} for t in jobs_of(jobs, "train")] == [BASE_RUN]
    assert tables(jobs) == {"base"}


def test_new_jpeg_quality_reruns_the_degraded_variant_and_what_uses_it(finished_study):
    jobs = dry_run(finished_study, {"degrade": {"jpeg_quality": 50}})
    assert not rules_of(jobs) & BEFORE_DEGRADE
    # Only the caches an experiment reads are built: `base` trains on 16 px degraded; nothing reads 32 px's.
    assert sorted((w["res"], w["variant"]) for w in jobs_of(jobs, "degrade")) == [("16", "degraded")]
    # Only `base` trains on the degraded variant; `other` is clean throughout.
    assert [{k: t[k] for k in BASE_RUN} for t in jobs_of(jobs, "train")] == [BASE_RUN]
    assert len(jobs_of(jobs, "evaluate")) == 1
    assert not rules_of(jobs) & {"features", "linear", "evaluate_probe"}
    assert tables(jobs) == {"base"}
    assert "data_summary" not in rules_of(jobs)


def test_new_resolution_reruns_only_its_resize_and_downstream(finished_study):
    change = {"resize": {"resolutions": [32, 16, 8]}, "experiments": {"base": {"resolutions": [16, 8]}}}
    jobs = dry_run(finished_study, change)
    assert not rules_of(jobs) & {"synth", "ingest", "task", "split"}
    assert jobs_of(jobs, "resize") == [{"res": "8"}]
    for rule in ("degrade", "train"):
        assert jobs_of(jobs, rule) and all(w["res"] == "8" for w in jobs_of(jobs, rule))
    assert evaluations_of(jobs) and all(e["res"] == "8" for e in evaluations_of(jobs))
    assert tables(jobs) == {"base"}


def test_repointed_at_a_folder_that_lacks_a_file_the_dry_run_stops_naming_it(finished_study, tmp_path):
    """The walkthrough's case: in a folder with results, data.isic_root pointed at a folder holding only an ISIC
    2020 zip. Before, ingest's missing input made Snakemake drop ingest, keep the old manifest and plan resize,
    degrade and trainings on the new images. Now the dry run stops, naming the file ISIC 2020 reads first (the
    v2 ground truth); with the default source, suggesting the one the folder holds."""
    new = tmp_path / "isic2020"
    new.mkdir()
    with zipfile.ZipFile(new / "ISIC_2020_Training_JPEG.zip", "w") as archive:
        archive.writestr("train/ISIC_0000000.jpg", b"")
    config = yaml.safe_load((finished_study / "config.yaml").read_text())
    for source, named in [
        (
            "isic2020",
            "(looked for ISIC_2020_Training_GroundTruth_v2.csv, ISIC_2020_Training_GroundTruth.csv)",
        ),
        ("isic2019", "it holds ISIC_2020_Training_JPEG.zip: is it data.source: isic2020?"),
    ]:
        merge(config, {"data": {"isic_root": str(new), "source": source}})
        write_config(finished_study / "repointed.yaml", config)
        proc = snakemake(finished_study, "--dry-run", "--configfile", "repointed.yaml", check=False)
        assert proc.returncode != 0 and named in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@contextmanager
def time_kept(path: Path) -> Iterator[None]:
    """Change `path` inside the block, then give it back its time (as `cp -p` or an archive's dates would)."""
    stat = path.stat()
    yield
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_source_file_replaced_with_an_older_time_reruns_ingest(finished_study, tmp_path):
    """A change of the files under data.isic_root reruns ingest even where their times say nothing (a label fixed
    in a copy kept with `cp -p`, an image extracted with the archive's date): the ingest rule carries their stamp
    (data/sourcestamp.py) as a param. Before, Snakemake saw only times: nothing reran."""
    workdir = tmp_path / "study"
    shutil.copytree(finished_study, workdir, symlinks=True)
    data = workdir / "data"
    # The user's data: the synthetic set copied with its times (older than the results).
    shutil.copytree(workdir / "results/data/synthetic", data)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    write_config(workdir / "config.yaml", {**config, "data": {**config["data"], "isic_root": "data"}})
    manifest = "results/data/manifest.parquet"
    snakemake(workdir, manifest)

    def planned() -> set[str]:
        return rules_of(planned_jobs(snakemake(workdir, "--dry-run", manifest).stdout))

    assert planned() == set()
    labels = data / "ISIC_2019_Training_GroundTruth.csv"
    original = labels.read_text()
    header, first, rest = original.split("\n", 2)
    image, *onehot = first.split(",")
    with time_kept(labels):  # one image's label moved to the next class: same size, same time
        labels.write_text("\n".join([header, ",".join([image, onehot[-1], *onehot[:-1]]), rest]))
    assert planned() == {"ingest"}
    with time_kept(labels):
        labels.write_text(original)
    assert planned() == set()
    one, other = sorted((data / "ISIC_2019_Training_Input").glob("*.jpg"))[:2]
    with time_kept(one):  # an image's bytes replaced in place: neither its time nor its folder's changes
        one.write_bytes(other.read_bytes())
    assert planned() == {"ingest"}


def test_edit_to_degradation_module_reruns_degradation_and_downstream(finished_study):
    with edited(finished_study / "src/dermcompress/data/degrade.py"):
        jobs = dry_run(finished_study)
    assert not rules_of(jobs) & BEFORE_DEGRADE
    # The clean caches are the resize stage's, untouched by degrade.py.
    # Only the caches an experiment reads are built: `base` trains on 16 px degraded; nothing reads 32 px's.
    assert sorted((w["res"], w["variant"]) for w in jobs_of(jobs, "degrade")) == [("16", "degraded")]
    # `base` trains on the degraded variant; `other` only reads clean caches, so it stands.
    assert [{k: t[k] for k in BASE_RUN} for t in jobs_of(jobs, "train")] == [BASE_RUN]
    assert not rules_of(jobs) & {"features", "linear", "evaluate_probe"}
    assert tables(jobs) == {"base"}
    assert "data_summary" not in rules_of(jobs)


def test_adding_a_pretraining_and_a_model_of_it_plans_only_their_jobs(finished_study):
    """Issue 24: the pretrain stage, a `pretraining:` entry and a model loading its backbone added to a finished
    study plan the pretraining, the new model's runs and the new experiment's table, nothing of what was there:
    the registry and learn/__init__.py, in every training's code fingerprint, changed in their docstrings only."""
    jobs = dry_run(finished_study, PRETRAIN_CHANGE)
    assert len(jobs_of(jobs, "pretrain")) == 1 and not rules_of(jobs) & DATA_RULES
    trained = {"train", "evaluate", "features", "linear", "evaluate_probe"}
    for job in jobs:
        if kind(job[0]) in trained:
            assert "tiny_derm" in " ".join(job[1]), job
    assert {"train", "evaluate", "features", "evaluate_probe"} <= rules_of(jobs)
    assert tables(jobs) == {"derm"}


def test_comments_and_docstrings_rerun_nothing(finished_study, tmp_path):
    """Code fingerprints hash the syntax tree: a comment in a stage module, its docstring and a function's, and
    the module list in a package's docstring (data/__init__.py, in every data stage's closure) plan nothing."""
    workdir = tmp_path / "study"
    shutil.copytree(finished_study, workdir, symlinks=True)
    data = workdir / "src/dermcompress/data"
    degrade = data / "degrade.py"
    degrade.write_text(degrade.read_text().replace('"""', '"""An edited docstring. ', 1) + "\n# an edit\n")
    ingest = data / "ingest.py"
    text = ingest.read_text()
    function = re.search(r'\n    """', text).start()  # the first function's or class's docstring
    ingest.write_text(text[:function] + '\n    """An edited docstring.' + text[function + 8 :])
    package = data / "__init__.py"
    package.write_text(package.read_text().replace('"""', '"""new_module  a module listed here\n', 1))
    assert dry_run(workdir) == set()


def test_checksummed_reads_and_writes_rerun_every_job_once(finished_study, tmp_path):
    """README Changes (the one full rerun): every stage reads and writes the files it hands on through
    data/integrity.py (checksums, atomic writes), so that module is in every job's code fingerprint and any
    change to it, its arrival included, plans what `--forceall` plans: every job from ingest on, trainings and
    aggregation among them. Only synth, which writes the raw files themselves, does not read it (a synthetic
    study reruns it too: its layouts changed with the same issue)."""
    workdir = tmp_path / "study"
    shutil.copytree(finished_study, workdir, symlinks=True)
    integrity = workdir / "src/dermcompress/data/integrity.py"
    integrity.write_text(integrity.read_text() + CODE_EDIT)
    proc = snakemake(workdir, "--dry-run", "--forceall", "--configfile", "config.yaml")
    everything = planned_jobs(proc.stdout + proc.stderr)
    assert {"synth", "ingest", "train", "evaluate", "linear", "table"} <= rules_of(everything)
    assert dry_run(workdir) == {job for job in everything if job[0] != "synth"}


def test_edit_to_experiment_grid_code_reruns_only_the_study(finished_study):
    """The grids' code (study/experiments.py) is read by config checks and tables, never by a data stage or a
    run: editing it reruns the tables that expand the grids, nothing upstream."""
    with edited(finished_study / "src/dermcompress/study/experiments.py"):
        jobs = dry_run(finished_study)
    assert not rules_of(jobs) & DATA_RULES
    assert not rules_of(jobs) & {"train", "evaluate", "features", "linear", "evaluate_probe"}
    assert tables(jobs) == {"base", "other"}


def test_new_statistics_rerun_only_tables_and_figures(finished_study, tmp_path):
    """A change like the one that made the comparisons valid: every study module edited and one added (the
    tables' code), each experiment's reference and Holm family changed (the tables' params). Only aggregation
    reruns: no data stage, training, evaluation or probe, whose code lives in data/ and learn/."""
    workdir = tmp_path / "study"
    shutil.copytree(finished_study, workdir, symlinks=True)
    study = workdir / "src/dermcompress/study"
    for module in study.glob("*.py"):
        module.write_text(module.read_text() + CODE_EDIT)
    (study / "new_test.py").write_text('"""A new test."""\n')
    compare = study / "compare.py"
    compare.write_text(compare.read_text() + "from . import new_test  # noqa: F401, E402\n")
    change = {
        "experiments": {name: {"reference": {"res": 16}, "family": "table"} for name in ("base", "other")}
    }
    jobs = dry_run(workdir, change)
    aggregation = {"all", "table", "subgroups", "runs_index", "data_summary", "bytes_summary"}
    assert rules_of(jobs) - aggregation == {"figures"}
    assert tables(jobs) == {"base", "other"}
    assert not rules_of(jobs) & (DATA_RULES | {"train", "evaluate", "features", "linear", "evaluate_probe"})


def test_edit_to_training_code_retrains_from_step_zero(finished_study, tmp_path):
    """A finished run rerun because its training code changed trains again, from step 0: no checkpoint of the
    old code is left to stand in for the training (results/checkpoints/ held finished runs before)."""
    workdir = tmp_path / "study"
    shutil.copytree(finished_study, workdir, symlinks=True)
    assert not list((workdir / "results/checkpoints").rglob("*.pt"))
    module = workdir / "src/dermcompress/learn/train.py"
    module.write_text(module.read_text() + CODE_EDIT)
    proc = snakemake(workdir)
    assert "rule train:" in proc.stdout + proc.stderr
    logs = list((workdir / "results/logs/runs").rglob("train.log"))
    assert logs
    for log in logs:
        text = log.read_text()
        assert "resuming" not in text, log
        assert re.search(r"step 1/\d+ lr", text), log  # trained from the first step
    history = pd.read_csv(next((workdir / "results/runs/tiny/16px/degraded/finetune").rglob("history.csv")))
    steps = history.dropna(subset=["train_loss"])["step"].tolist()
    assert steps == list(range(1, len(steps) + 1)) and steps, "a loss row per step (log_every 1)"
    assert not list((workdir / "results/checkpoints").rglob("*.pt"))


@pytest.mark.parametrize(
    ("distribution", "reruns"),
    # timm builds every backbone: the GPU stages rerun (and what reads them). tqdm draws progress bars: a new one
    # changes no number.
    [("timm", {"train", "evaluate", "features"}), ("tqdm", set())],
)
def test_new_package_version_reruns_only_the_rules_that_import_it(finished_study, distribution, reruns):
    # A distribution found first on sys.path wins: the workflow puts its src/ there, so this is "installed".
    fake = finished_study / f"src/{distribution}-99.0.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 99.0\n")
    try:
        jobs = dry_run(finished_study)
    finally:
        shutil.rmtree(fake)
    if not reruns:
        assert jobs == set()
        return
    assert not rules_of(jobs) & DATA_RULES
    assert rules_of(jobs) & {"train", "evaluate", "features"} == reruns


def test_planted_effects_and_subgroups_rerun_only_aggregation_on_real_data(planted_study, tmp_path):
    """With a user's own data (data.isic_root; the planted study reads its data so), a change like the one that
    planted effects in the generator and added subgroup and calibration analysis reruns tables, figures and
    the report only: every study module and every synthetic-data module edited, the generator's config and the
    subgroup settings changed. No data stage, training or evaluation: their code is in data/ and learn/ outside
    the generator, and the synthetic settings do not reach them when the data are real."""
    workdir = tmp_path / "study"
    shutil.copytree(planted_study, workdir, symlinks=True)
    src = workdir / "src/dermcompress"
    for module in [*(src / "study").glob("*.py"), *(src / "data").glob("synth*.py")]:
        if module.name != "__init__.py":
            module.write_text(module.read_text() + CODE_EDIT)
    config = yaml.safe_load((workdir / "planted.yaml").read_text())
    merge(
        config,
        {
            "data": {
                "synthetic": {"n": 99, "planted": {"coarse": 0.1, "fine": 0.9, "cycles": 7, "contrast": 0.2}}
            },
            "subgroups": {"min_images": 10, "age_bands": [50]},
        },
    )
    write_config(workdir / "changed.yaml", config)
    proc = snakemake(workdir, "--dry-run", "--configfile", "changed.yaml")
    jobs = planned_jobs(proc.stdout + proc.stderr)
    assert {"table", "subgroups", "figures"} <= rules_of(jobs)
    aggregation = {"all", "table", "subgroups", "runs_index", "data_summary", "bytes_summary"}
    assert rules_of(jobs) - aggregation == {"figures"}, rules_of(jobs)
    assert not rules_of(jobs) & (DATA_RULES | {"train", "evaluate", "features", "linear", "evaluate_probe"})
