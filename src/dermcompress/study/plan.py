"""What a config costs before it runs, read off the real DAG: `dermcompress plan`.

Snakemake plans the whole workflow (`--dry-run --forceall`, with a cluster profile so that jobs are grouped as
they will be submitted); the plan counts what it would run:

- pretrainings (rule pretrain), their image-passes (each image's views: student globals and locals forward +
  backward, locals weighted by their area; teacher globals forward) and GPU-hours, as a training's;
- trainings, evaluations and frozen-feature extractions, as jobs and as what the jobs write (their outputs): a
  run's one evaluation job scores each of its eval variants, a backbone input's one features job writes each
  split its probes read; the workflow makes a rule per set of variants or splits (`evaluate__clean__jpeg_q75`,
  `features__train__val`, or a hash for a long set), and a job's kind is its rule's name before the first `__`;
- GPU jobs and cluster submissions after grouping (a training and its evaluation job are one submission; small
  groups are packed, `group-components` in the profile);
- backbone image-passes: forward + backward (training) and forward only (validation, evaluation, features);
- disk: trained weights and resume checkpoints while runs are in flight (at most `jobs` at once) and at the end,
  caches and features;
- GPU-hours of compute, from a throughput table: measured by benchmarks/gpu.py (`--throughput FILE`, its CSV),
  else an estimate scaled by each model's GMACs from one reference rate, and labelled as such;
- the fixed cost beside it: each GPU job's start-up and set-up (the interpreter, imports, the model and data
  before the first image-pass), per kind of job the median of the `wall time` lines that the workflow's own
  logs hold (results/logs), else an assumed figure (ASSUMED_FIXED_SECONDS), labelled so; and the share of the
  GPU allocation time that computes, compute / (compute + fixed): a report, not a target, since the compute side
  is an estimate until a GPU measures it;
- per experiment, its GPU jobs, evaluations, GPU-hours and fixed GPU-hours, and what it adds: the jobs and
  outputs no other selected experiment needs (runs are shared across experiments, so an experiment's own cost
  and the cost it adds differ).

Split sizes come from results/data/splits.parquet when the data stages have run, else from ISIC 2019's class
counts with the config's classes, balancing and split fractions (an estimate, labelled so).
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from dermcompress.learn import pretrain_spec
from dermcompress.learn.runs import (
    FEATURES_DIR,
    PROBE_MODES,
    TRAINED_MODES,
    Evaluation,
    Run,
    is_pretrained,
    parse_features_dir,
    parse_run_dir,
)

log = logging.getLogger(__name__)

# The estimate when nothing is measured: ViT-B/16 at 224 px (17.58 GMACs) on one H100 in bf16, images/s; other
# models and resolutions scale by their GMACs. Replace with benchmarks/gpu.py's measurements (--throughput).
REFERENCE = {"gmacs": 17.58, "train": 1500.0, "eval": 4500.0}
# Sizes of hub models whose config may not be cached on the machine that plans (a login node fetches them
# later): `dermcompress flops` on transformers' Dinov2Config() (dinov2-base's shape: 768 wide, 12 layers, 14 px
# patches, class + mean-patch features).
FALLBACK_SIZES = {
    "hf:facebook/dinov2-base": {
        res: {"gmacs": gmacs, "params_m": 86.583554, "feature_dim": 1536}
        for res, gmacs in ((224, 23.185902336), (112, 5.633772288), (56, 1.458076416))
    },
}
GPU_RULES = ("train", "evaluate", "features", "pretrain")  # the kinds of job that hold a GPU
EVALUATION_RULES = ("evaluate", "evaluate_probe")
# Start-up + set-up seconds of one GPU job, per kind, when no log in the workdir measures them: what the
# development machine (2 cores, torch jobs through Snakemake) measured for issue 22: a torch job spends 5-7 s
# before its first useful work (Python and torch 2.5-4 s, timm 2-3 s, scikit-learn 1.6 s where it scores), the
# demo's evaluations 96% of their 6.8 s. A cluster node may start twice as fast; set-up on ISIC 2019's caches
# (loading them) takes longer than on the demo's.
# A pretraining: 7.5 s of start-up on the same machine (a tiny DINO job through Snakemake; lightly imports too).
ASSUMED_FIXED_SECONDS = {"train": 6.0, "evaluate": 6.5, "features": 6.0, "pretrain": 7.5}
ASSUMED_SOURCE = (
    "assumed: issue 22's figures for this project's 2-core development machine, a torch job 5-7 s before its"
    " first useful work, an evaluation 6.5 s"
)
BYTES_PER_PARAM = 4  # float32 weights; a checkpoint adds AdamW's two moments
_JOB = re.compile(r"^(\s*)(local)?rule (\S+):$")
_GROUP = re.compile(r"Group job (\S+) \(jobs in lexicogr\. order\):")
_WILDCARDS = re.compile(r"^\s*wildcards: (.*)$")
_OUTPUT = re.compile(r"^\s*output: (.*)$")
_EVAL_METRICS = re.compile(r"/eval/([^/]+)/metrics\.json$")
# learn/phases.py's last line: `wall time 10.2 s: start-up 4.1 s (40%), setup 2.3 s (22%), ...`
_WALL_TIME = re.compile(r"wall time ([0-9.]+) s: (.*)$")
_PHASE = re.compile(r"([\w-]+) ([0-9.]+) s \(")


def rule_kind(rule: str) -> str:
    """The kind of job a rule runs: its name before the first `__` (`evaluate__clean__jpeg_q75` -> evaluate)."""
    return rule.split("__")[0]


@dataclass
class Job:
    rule: str
    wildcards: dict[str, str] = field(default_factory=dict)
    local: bool = False
    grouped: bool = False
    outputs: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return rule_kind(self.rule)

    @property
    def writes(self) -> list[str]:
        """What the job writes, read from its outputs: an evaluation job's eval variants (each one's
        eval/<variant>/metrics.json), a features job's splits (<split>.parquet); empty for the other rules."""
        if self.kind in EVALUATION_RULES:
            found = [m[1] for path in self.outputs if (m := _EVAL_METRICS.search(path))]
        elif self.kind == "features":
            found = [Path(path).stem for path in self.outputs if path.endswith(".parquet")]
        else:
            found = []
        return list(dict.fromkeys(found))

    def run(self) -> Run:
        """The run of a train, linear or evaluation job (RUN_DIR's wildcards, or {run}: the folder below
        results/runs/)."""
        if "run" in self.wildcards:
            return parse_run_dir(f"results/runs/{self.wildcards['run']}")
        return Run.from_wildcards(_Wildcards(self.wildcards))

    def features_folder(self) -> str:
        """The folder a features job writes (FEATURES_DIR)."""
        return f"results/features/{self.wildcards['features']}"

    def model_res(self) -> tuple[str, int]:
        """The model and resolution of a GPU job (or a probe's); a pretraining's model is `pretrain:<name>`
        (plan_registry), its resolution the one make_plan adds to its wildcards."""
        if self.kind == "pretrain":
            return f"pretrain:{self.wildcards['name']}", int(self.wildcards["res"])
        if self.kind == "features":
            key = parse_features_dir(self.features_folder())
            return key["model"], key["res"]
        run = self.run()
        return run.model, run.res


def dry_run(workdir: Path, configfiles: list[str], profile: str | None) -> str:
    """The text of `snakemake --dry-run --forceall` in `workdir`."""
    cmd = [sys.executable, "-m", "snakemake", "--dry-run", "--forceall", "--directory", str(workdir)]
    cmd += ["--profile", profile] if profile else ["--cores", "1"]
    if configfiles:
        cmd += ["--configfile", *configfiles]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake could not plan the workflow:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout + proc.stderr


def parse_jobs(text: str) -> tuple[list[Job], list[set[str]]]:
    """The planned jobs (rule, wildcards, local, inside a group, outputs), and each group submission's rules."""
    jobs: list[Job] = []
    groups: list[set[str]] = []
    for line in text.splitlines():
        if _GROUP.search(line):
            groups.append(set())
        elif match := _JOB.match(line):
            jobs.append(Job(match[3], local=bool(match[2]), grouped=bool(match[1])))
            if jobs[-1].grouped:
                groups[-1].add(match[3])
        elif (match := _WILDCARDS.match(line)) and jobs:
            jobs[-1].wildcards = dict(pair.split("=", 1) for pair in match[1].split(", "))
        elif (match := _OUTPUT.match(line)) and jobs:
            jobs[-1].outputs = match[1].split(", ")
    return jobs, groups


def split_sizes(workdir: Path, config: dict[str, Any], full: bool = False) -> tuple[dict[str, int], str]:
    """Images per split: measured (the splits table), else estimated from ISIC 2019's class counts (or the
    synthetic data set's, which follow them); `full`: ISIC 2019's, whatever the config's data are."""
    from dermcompress.data.synth_plan import REAL_CLASS_COUNTS, class_counts

    table = workdir / "results/data/splits.parquet"
    if table.is_file() and not full:
        measured = pd.read_parquet(table, columns=["split"])["split"].value_counts()
        return measured.to_dict(), f"measured ({table})"
    synthetic = config["data"].get("isic_root") is None and not full
    per_class = class_counts(config["data"]["synthetic"]["n"]) if synthetic else REAL_CLASS_COUNTS
    counts = [per_class.get(c, 0) for c in config["data"]["classes"]]
    total = min(counts) * len(counts) if config["data"].get("balance") == "undersample" else sum(counts)
    test = round(total * config["split"]["test_fraction"])
    val = round((total - test) * config["split"]["val_fraction"])
    source = "the synthetic data set's" if synthetic else "ISIC 2019's"
    return {"train": total - test - val, "val": val, "test": test}, f"estimate ({source} class counts)"


def model_sizes(config: dict[str, Any], jobs: list[Job]) -> dict[tuple[str, int], dict[str, float]]:
    """(model, res) -> gmacs, params_m, feature_dim of the GPU jobs' models, built without weights."""
    from dermcompress.learn.flops import model_cost

    sizes = {}
    used = {j.model_res() for j in jobs if j.kind in GPU_RULES}
    registry = plan_registry(config)
    for model, res in sorted(used):
        try:
            sizes[model, res] = model_cost(model, resolution=res, registry=registry)
        except Exception as err:  # e.g. a hub config that is not cached here
            fallback = FALLBACK_SIZES.get(registry[model]["source"], {}).get(res)
            if fallback:
                sizes[model, res] = fallback
            else:
                log.warning("plan: cannot build %s at %d px (%s); its sizes are unknown", model, res, err)
    return sizes


def plan_registry(config: dict[str, Any]) -> dict[str, dict]:
    """The registry the plan sizes models with: `pretrain:` models and each pretraining (`pretrain:<name>`) as
    their architecture, built without weights (the backbone files do not exist yet)."""
    models, pretraining = config["models"], config.get("pretraining") or {}
    registry = {}
    for name, entry in models.items():
        registry[name] = entry
        if (pretrained := pretrain_spec.pretrained_from(entry)) is not None:
            arch = pretrain_spec.init_arch(pretrained, pretraining[pretrained], models)
            registry[name] = {"source": arch, "pretrained": False}
    for name, spec in pretraining.items():
        arch = pretrain_spec.init_arch(name, spec, models)
        registry[f"pretrain:{name}"] = {"source": arch, "pretrained": False}
    return registry


def pretrain_views(spec: dict[str, Any], res: int) -> tuple[float, float]:
    """Backbone image-passes per pretraining image: (forward + backward, forward only). The student's global
    and local views train, a local view counted by its area over a global's (its share of the tokens); the
    teacher's global views are forward only."""
    s = pretrain_spec.resolve_spec(pretrain_spec.spec_of(spec))
    g = s["global_crops"]["size"] or res
    local = s["local_crops"]["size"] or g * 3 / 7
    n_global, n_local = s["global_crops"]["n"], s["local_crops"]["n"]
    return n_global + n_local * (local / g) ** 2, float(n_global)


def pretrain_images(spec: dict[str, Any], train_images: int) -> float:
    """Images one pretraining passes through: its steps' global batches, or its epochs over the train split less
    the kNN monitor's held-out groups."""
    s = pretrain_spec.resolve_spec(pretrain_spec.spec_of(spec))
    if s["steps"]:
        return float(s["steps"] * s["batch_size"])
    return s["epochs"] * train_images * (1 - s["knn_holdout"])


def read_throughput(path: str | None) -> pd.DataFrame | None:
    """benchmarks/gpu.py's CSV (model, res, phase, img_per_s, ...), or None."""
    return pd.read_csv(path) if path else None


def rate(
    model: str, res: int, phase: str, gmacs: float | None, measured: pd.DataFrame | None
) -> float | None:
    """Images/s of one model at one resolution in a phase (train or eval): measured, else scaled by GMACs."""
    if measured is not None:
        # What the training code runs on a GPU: bf16 autocast, eager.
        hit = measured.query("model == @model and res == @res and phase == @phase and precision == 'bf16'")
        hit = hit[~hit["compile"].astype(bool)]
        if len(hit):
            return float(hit["img_per_s"].max())
    return REFERENCE[phase] * REFERENCE["gmacs"] / gmacs if gmacs else None


def passes(
    jobs: list[Job],
    sizes: dict[str, int],
    settings: dict[str, Any],
    pretraining: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Per GPU job (`job`: its index in `jobs`): model, res, phase, the images it passes through the backbone
    and `key`, the output they are for (job_keys): a training's run folder; an evaluation job's eval folder of
    each variant (val + test each); a features job's file of each split; a pretraining's folder."""
    rows = []
    every = max(1, int(settings.get("eval_every_epochs", 1)))
    for i, job in enumerate(jobs):
        if job.kind not in GPU_RULES:
            continue
        model, res = job.model_res()
        if job.kind == "pretrain":
            spec = pretraining[job.wildcards["name"]]
            images = pretrain_images(spec, sizes["train"])
            trained, forward = pretrain_views(spec, res)
            key = pretrain_spec.PRETRAIN_DIR.format(name=job.wildcards["name"])
            rows += [
                (i, model, res, "train", images * trained, key),
                (i, model, res, "eval", images * forward, key),
            ]
        elif job.kind == "train":
            run = job.run()
            images = sizes["train"] * float(run.label_fraction)
            rows.append((i, model, res, "train", run.epochs * images, run.run_dir))
            validations = math.ceil(run.epochs / every) * sizes["val"]
            rows.append((i, model, res, "eval", validations, run.run_dir))
        elif job.kind == "evaluate":
            run = job.run()
            for variant in job.writes:
                key = Evaluation(run, variant).eval_dir
                rows.append((i, model, res, "eval", sizes["val"] + sizes["test"], key))
        else:
            for split in job.writes:
                key = f"{job.features_folder()}/{split}.parquet"
                rows.append((i, model, res, "eval", sizes[split], key))
    return pd.DataFrame(rows, columns=["job", "model", "res", "phase", "images", "key"])


def job_keys(config: dict[str, Any]) -> dict[str, set[str]]:
    """Experiment -> the jobs it needs and the outputs it reads, as job_key and passes' `key` name them.

    Jobs: a run folder (train, linear: the experiments that evaluate the run); a run's `eval` folder (its one
    evaluation job, evaluate or evaluate_probe), owned by every experiment with any evaluation of that run, so
    the job two experiments share is neither's addition, even where one asks for eval variants the other does
    not; a features folder (FEATURES_DIR: its one features job), owned by every experiment whose probes read any
    split of it. Outputs, which the compute is counted by: each evaluation's folder (one eval variant), owned by
    the experiments that ask for that evaluation; each features file (one split) by those whose probes read it.
    """
    from .experiments import expand

    keys: dict[str, set[str]] = {}
    for name, evaluations in expand(config)[1].items():
        owned = keys.setdefault(name, set())
        for e in evaluations:
            owned |= {e.run.run_dir, f"{e.run.run_dir}/eval", e.eval_dir}
            if (pretrained := pretrain_spec.pretrained_from(config["models"][e.run.model])) is not None:
                owned.add(pretrain_spec.PRETRAIN_DIR.format(name=pretrained))
            if e.run.mode in PROBE_MODES:
                pretrained = is_pretrained(config["models"][e.run.model])
                for path in e.run.probe_features(e.eval_variant, pretrained=pretrained).values():
                    owned |= {path, path.rsplit("/", 1)[0]}
    return keys


def job_key(job: Job) -> str | None:
    """The job as job_keys names it: a run folder (train, linear), a run's eval folder (its evaluation job), a
    features folder (its features job); None for the other rules."""
    if job.kind in ("train", "linear"):
        return job.run().run_dir
    if job.kind in EVALUATION_RULES:
        return f"{job.run().run_dir}/eval"
    if job.kind == "features":
        return FEATURES_DIR.format(**parse_features_dir(job.features_folder()))
    if job.kind == "pretrain":
        return pretrain_spec.PRETRAIN_DIR.format(name=job.wildcards["name"])
    return None


def compute_share(compute_hours: float, fixed_hours: float) -> float | None:
    """The share of GPU allocation time that computes: compute / (compute + fixed); None when unknown."""
    total = compute_hours + fixed_hours
    return compute_hours / total if math.isfinite(total) and total > 0 else None


def experiment_costs(
    jobs: list[Job], image_passes: pd.DataFrame, fixed_seconds: dict[str, float], config: dict[str, Any]
) -> dict[str, dict[str, float | None]]:
    """Per experiment: its trainings, GPU jobs (train, evaluate, features), evaluations (one per eval variant),
    GPU-hours of compute and fixed GPU-hours (start-up and set-up of its GPU jobs, `fixed_seconds` per kind),
    and the part of each that no other selected experiment needs (`*_added`: what the experiment adds to the
    study); then the share of its GPU time that computes. Jobs (and so fixed hours) are owned as job_keys says;
    compute by the outputs it is for (`image_passes`' key: an evaluation job's passes over one eval variant
    belong to the experiments that ask for that evaluation)."""
    keys = job_keys(config)
    counted = ("trainings", "gpu_jobs", "evaluations", "gpu_hours", "fixed_gpu_hours")
    costs: dict[str, dict[str, Any]] = {
        name: {f"{c}{suffix}": 0 for c in counted for suffix in ("", "_added")} for name in keys
    }

    def add(key: str | None, **amounts: float) -> None:
        owners = [name for name, owned in keys.items() if key in owned] if key else []
        for name in owners:
            for suffix in ["", "_added"] if len(owners) == 1 else [""]:
                for what, amount in amounts.items():
                    costs[name][f"{what}{suffix}"] += amount

    for job in jobs:
        gpu = job.kind in GPU_RULES
        add(
            job_key(job),
            trainings=job.kind == "train",
            gpu_jobs=gpu,
            fixed_gpu_hours=fixed_seconds.get(job.kind, 0.0) / 3600 if gpu else 0.0,
        )
        if job.kind in EVALUATION_RULES:
            run = job.run()
            for variant in job.writes:
                add(Evaluation(run, variant).eval_dir, evaluations=1)
    for key, hours in image_passes.groupby("key")["hours"].sum(min_count=1).items():
        add(key, gpu_hours=float(hours))
    for cost in costs.values():
        cost["compute_share"] = compute_share(cost["gpu_hours"], cost["fixed_gpu_hours"])
    return costs


class _Wildcards:
    def __init__(self, values: dict[str, str]) -> None:
        self.__dict__.update(values)


def log_kind(path: Path, logs: Path) -> str | None:
    """The kind of job that wrote a log under results/logs, by its place there: runs/<run>/train.log (train, or
    linear.log), runs/<run>/evaluate.log (evaluate, or evaluate_probe for a probe run), features/<folder>.log;
    None for any other file (the data stages', an older layout's)."""
    rel = path.relative_to(logs)
    try:
        if rel.parts[0] == "pretrain":
            return "pretrain"
        if rel.parts[0] == "features":
            parse_features_dir(f"results/{rel.with_suffix('').as_posix()}")
            return "features"
        if rel.parts[0] == "runs":
            run = parse_run_dir(f"results/{rel.parent.as_posix()}")
            if rel.name == "evaluate.log":
                return "evaluate" if run.mode in TRAINED_MODES else "evaluate_probe"
            return {"train.log": "train", "linear.log": "linear"}.get(rel.name)
    except ValueError:
        return None
    return None


def fixed_seconds_of(text: str) -> float | None:
    """Start-up + set-up seconds of a job's log: its last `wall time` line (learn/phases.py), or None."""
    lines = [m for line in text.splitlines() if (m := _WALL_TIME.search(line))]
    if not lines:
        return None
    phases = {name: float(s) for name, s in _PHASE.findall(lines[-1][2])}
    return phases.get("start-up", 0.0) + phases.get("setup", 0.0)


def fixed_costs(workdir: Path) -> dict[str, dict[str, Any]]:
    """Per kind of GPU job: the seconds one job spends starting up and setting up (`seconds`), the median over
    the logs that the workflow's jobs wrote in `workdir`'s results/logs (`logs`: how many), else the assumed
    figure (ASSUMED_FIXED_SECONDS, `logs` 0); `source` says which."""
    logs = Path(workdir) / "results/logs"
    found: dict[str, list[float]] = {kind: [] for kind in GPU_RULES}
    for path in sorted(logs.rglob("*.log")) if logs.is_dir() else []:
        kind = log_kind(path, logs)
        if kind in found and (seconds := fixed_seconds_of(path.read_text(errors="replace"))) is not None:
            found[kind].append(seconds)
    fixed = {}
    for kind, seconds in found.items():
        if seconds:
            source = f"measured: median of {len(seconds)} logs' start-up + setup under results/logs"
            fixed[kind] = {
                "seconds": round(statistics.median(seconds), 3),
                "logs": len(seconds),
                "source": source,
            }
        else:
            fixed[kind] = {"seconds": ASSUMED_FIXED_SECONDS[kind], "logs": 0, "source": ASSUMED_SOURCE}
    return fixed


def disk(jobs, sizes, model_size, config, profile_jobs: int) -> dict[str, float | None]:
    """GB of weights and checkpoints (in flight, and at the end), caches and features."""
    trainings = [j for j in jobs if j.kind == "train"]

    def known(job):
        return model_size.get(job.model_res())

    weights = sorted(
        ((k["params_m"] * 1e6 if (k := known(j)) else math.nan) * BYTES_PER_PARAM for j in trainings),
        reverse=True,
    )
    in_flight = weights[:profile_jobs]
    keep = config["training"].get("keep_weights", False)
    n_images = sum(sizes.values())
    caches = {
        (j.wildcards["res"], j.wildcards["variant"]) for j in jobs if {"res", "variant"} <= j.wildcards.keys()
    }
    caches |= {(j.wildcards["res"], "clean") for j in jobs if j.rule == "resize"}
    cache_bytes = sum(n_images * int(res) ** 2 * 3 for res, _ in caches)
    feature_bytes = 0.0
    for job in (j for j in jobs if j.kind == "features"):
        dim = k["feature_dim"] if (k := known(job)) else math.nan
        feature_bytes += sum(sizes[split] for split in job.writes) * dim * 2  # float16
    gb = 1e9
    return {
        "weights_peak_gb": sum(in_flight) / gb,
        "checkpoints_peak_gb": 3 * sum(in_flight) / gb,
        "weights_end_gb": (sum(weights) if keep else 0.0) / gb,
        "checkpoints_end_gb": 0.0,
        "caches_gb": cache_bytes / gb,
        "features_gb": feature_bytes / gb,
    }


def make_plan(
    workdir: str | Path = ".",
    configfiles: list[str] | None = None,
    profile: str | None = "profiles/slurm-h100",
    throughput: str | None = None,
    full_isic2019: bool = False,
) -> dict[str, Any]:
    """The plan of a workflow folder's config (plus `configfiles`), as a dict; see the module docstring.
    `full_isic2019`: size it for the whole ISIC 2019 training set (a config on the synthetic data still plans
    the study's DAG)."""
    workdir = Path(workdir).resolve()
    config = _config(workdir, configfiles or [])
    jobs, groups = parse_jobs(dry_run(workdir, configfiles or [], profile))
    pretraining = config.get("pretraining") or {}
    for job in jobs:  # a pretraining's resolution is its spec's, not a wildcard
        if job.kind == "pretrain":
            job.wildcards["res"] = str(pretraining[job.wildcards["name"]]["resolution"])
    counts = Counter(j.rule for j in jobs)
    kinds = Counter(j.kind for j in jobs)
    sizes, sizes_source = split_sizes(workdir, config, full=full_isic2019)
    model_size = model_sizes(config, jobs)
    image_passes = passes(jobs, sizes, config["training"], pretraining)
    measured = read_throughput(throughput)
    per_s = {
        key: rate(*key, size["gmacs"] if (size := model_size.get(key[:2])) else None, measured)
        for key in image_passes[["model", "res", "phase"]]
        .drop_duplicates()
        .itertuples(index=False, name=None)
    }
    image_passes["hours"] = [
        images / per_s[key] / 3600 if per_s[key] else math.nan
        for key, images in zip(
            image_passes[["model", "res", "phase"]].itertuples(index=False, name=None),
            image_passes["images"],
            strict=True,
        )
    ]
    hours = float(image_passes["hours"].sum(min_count=1)) if len(image_passes) else 0.0
    pretrained = image_passes["key"].str.startswith("results/pretrain/") if len(image_passes) else []
    fixed = fixed_costs(workdir)
    for kind, entry in fixed.items():
        entry["jobs"] = kinds[kind]
        entry["gpu_hours"] = kinds[kind] * entry["seconds"] / 3600
    fixed_hours = sum(entry["gpu_hours"] for entry in fixed.values())
    submitted = [j for j in jobs if not j.local and not j.grouped]
    gpu_submissions = sum(1 for j in submitted if j.kind in GPU_RULES) + sum(
        1 for g in groups if {rule_kind(r) for r in g} & set(GPU_RULES)
    )
    profile_jobs = _profile_jobs(workdir, profile)
    evaluation_jobs = [j for j in jobs if j.kind in EVALUATION_RULES]
    feature_jobs = [j for j in jobs if j.kind == "features"]
    return {
        "jobs": dict(sorted(counts.items())),
        "jobs_by_kind": dict(sorted(kinds.items())),
        "trainings": kinds["train"],
        "evaluations": sum(len(j.writes) for j in evaluation_jobs),
        "evaluation_jobs": len(evaluation_jobs),
        "gpu_evaluations": sum(len(j.writes) for j in evaluation_jobs if j.kind in GPU_RULES),
        "feature_extractions": sum(len(j.writes) for j in feature_jobs),
        "feature_jobs": len(feature_jobs),
        "linear_probes": kinds["linear"],
        "pretrainings": kinds["pretrain"],
        "pretrain_image_passes": float(image_passes.loc[pretrained, "images"].sum()),
        "pretrain_gpu_hours": float(image_passes.loc[pretrained, "hours"].sum()),
        "gpu_jobs": sum(kinds[r] for r in GPU_RULES),
        "cluster_submissions": len(submitted) + len(groups),
        "gpu_submissions": gpu_submissions if profile else None,
        "split_sizes": sizes,
        "split_sizes_source": sizes_source,
        "image_passes_forward_backward": float(image_passes.query("phase == 'train'")["images"].sum()),
        "image_passes_forward": float(image_passes.query("phase == 'eval'")["images"].sum()),
        "disk": disk(jobs, sizes, model_size, config, profile_jobs),
        "gpu_hours": hours,
        "gpu_hours_source": f"measured ({throughput})"
        if throughput
        else "estimate (ViT-B/16 reference, scaled by GMACs)",
        "fixed": fixed,
        "fixed_gpu_hours": fixed_hours,
        "compute_share": compute_share(hours, fixed_hours),
        "experiments": experiment_costs(
            jobs, image_passes, {kind: entry["seconds"] for kind, entry in fixed.items()}, config
        ),
    }


def _config(workdir: Path, configfiles: list[str]) -> dict[str, Any]:
    """config.yaml with the overlays merged in, as Snakemake merges them (nested mappings key by key)."""
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    for path in configfiles:
        _merge(config, yaml.safe_load((workdir / path).read_text()) or {})
    return config


def _merge(base: dict, overlay: dict) -> None:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _profile_jobs(workdir: Path, profile: str | None) -> int:
    """The profile's `jobs` (submissions at once), which bounds how many runs are in flight."""
    path = workdir / profile / "config.yaml" if profile else None
    if path and path.is_file():
        return int((yaml.safe_load(path.read_text()) or {}).get("jobs", 1))
    return 1


def _share(share: float | None) -> str:
    return f"{share:.0%}" if share is not None else "an unknown share"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a few lines of text."""
    d = plan["disk"]
    kinds = plan["jobs_by_kind"]
    fixed = plan["fixed"]
    per_kind = ", ".join(
        f"{kind} {entry['seconds']:.1f} s ("
        + (f"median of {entry['logs']} logs" if entry["logs"] else "assumed")
        + ")"
        for kind, entry in fixed.items()
    )
    assumed = {entry["source"] for entry in fixed.values() if not entry["logs"]}
    lines = [
        f"trainings {plan['trainings']}, evaluations {plan['evaluations']} in {plan['evaluation_jobs']} jobs"
        f" (one per run; {plan['gpu_evaluations']} in {kinds.get('evaluate', 0)} on GPUs), feature extractions"
        f" {plan['feature_extractions']} in {plan['feature_jobs']} jobs, linear probes {plan['linear_probes']}",
        f"pretrainings {plan['pretrainings']}: {plan['pretrain_image_passes']:,.0f} image-passes (views, locals by"
        f" area), GPU-hours {plan['pretrain_gpu_hours']:.3g} computing",
        f"GPU jobs {plan['gpu_jobs']} ("
        + ", ".join(f"{kind} {kinds.get(kind, 0)}" for kind in GPU_RULES)
        + f"); cluster submissions {plan['cluster_submissions']}"
        + (f" ({plan['gpu_submissions']} on GPUs)" if plan["gpu_submissions"] is not None else ""),
        f"images per split {plan['split_sizes']} ({plan['split_sizes_source']})",
        f"backbone image-passes: {plan['image_passes_forward_backward']:,.0f} forward+backward,"
        f" {plan['image_passes_forward']:,.0f} forward only",
        f"disk: weights {d['weights_peak_gb']:.1f} GB and checkpoints {d['checkpoints_peak_gb']:.1f} GB at peak,"
        f" {d['weights_end_gb'] + d['checkpoints_end_gb']:.1f} GB at the end; caches {d['caches_gb']:.1f} GB"
        f" (raw pixels), features {d['features_gb']:.2f} GB",
        f"GPU-hours {plan['gpu_hours']:.3g} computing ({plan['gpu_hours_source']}) + {plan['fixed_gpu_hours']:.3g}"
        f" fixed: {_share(plan['compute_share'])} of the GPU allocation time computes",
        f"fixed: start-up + set-up per GPU job: {per_kind}" + "".join(f" ({s})" for s in sorted(assumed)),
        "jobs per kind of rule: " + ", ".join(f"{kind} {n}" for kind, n in kinds.items()),
        "per experiment (added: what no other experiment needs):",
        *(
            f"  {name}: trainings {c['trainings']} (added {c['trainings_added']}), GPU jobs {c['gpu_jobs']}"
            f" (added {c['gpu_jobs_added']}), evaluations {c['evaluations']} (added {c['evaluations_added']}),"
            f" GPU-hours {c['gpu_hours']:.3g} computing + {c['fixed_gpu_hours']:.3g} fixed (added"
            f" {c['gpu_hours_added']:.3g} + {c['fixed_gpu_hours_added']:.3g}), {_share(c['compute_share'])}"
            " computing"
            for name, c in plan.get("experiments", {}).items()
        ),
    ]
    return "\n".join(lines)
