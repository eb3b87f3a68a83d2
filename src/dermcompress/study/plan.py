"""What a config costs before it runs, read off the real DAG: `dermcompress plan`.

Snakemake plans the whole workflow (`--dry-run --forceall`, with a cluster profile so that jobs are grouped as
they will be submitted); the plan counts what it would run:

- trainings, evaluations, frozen-feature extractions, probes, per rule;
- GPU jobs and cluster submissions after grouping (a training and its evaluations are one submission; small
  groups are packed, `group-components` in the profile);
- backbone image-passes: forward + backward (training) and forward only (validation, evaluation, features);
- disk: trained weights and resume checkpoints while runs are in flight (at most `jobs` at once) and at the end,
  caches and features;
- GPU-hours, from a throughput table: measured by benchmarks/gpu.py (`--throughput FILE`, its CSV), else an
  estimate scaled by each model's GMACs from one reference rate, and labelled as such;
- per experiment, its GPU jobs and GPU-hours, and what it adds: the jobs no other selected experiment needs
  (runs are shared across experiments, so an experiment's own cost and the cost it adds differ).

Split sizes come from results/data/splits.parquet when the data stages have run, else from ISIC 2019's class
counts with the config's classes, balancing and split fractions (an estimate, labelled so).
"""

from __future__ import annotations

import logging
import math
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from dermcompress.learn.runs import FEATURES, Evaluation, Run, is_pretrained

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
GPU_RULES = ("train", "evaluate", "features")
BYTES_PER_PARAM = 4  # float32 weights; a checkpoint adds AdamW's two moments
_JOB = re.compile(r"^(\s*)(local)?rule (\w+):$")
_GROUP = re.compile(r"Group job (\S+) \(jobs in lexicogr\. order\):")
_WILDCARDS = re.compile(r"^\s*wildcards: (.*)$")


@dataclass
class Job:
    rule: str
    wildcards: dict[str, str] = field(default_factory=dict)
    local: bool = False
    grouped: bool = False


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
    """The planned jobs (rule, wildcards, local, inside a group), and each group submission's rules."""
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
    used = {(j.wildcards["model"], int(j.wildcards["res"])) for j in jobs if j.rule in GPU_RULES}
    for model, res in sorted(used):
        try:
            sizes[model, res] = model_cost(model, resolution=res, registry=config["models"])
        except Exception as err:  # e.g. a hub config that is not cached here
            fallback = FALLBACK_SIZES.get(config["models"][model]["source"], {}).get(res)
            if fallback:
                sizes[model, res] = fallback
            else:
                log.warning("plan: cannot build %s at %d px (%s); its sizes are unknown", model, res, err)
    return sizes


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


def passes(jobs: list[Job], sizes: dict[str, int], settings: dict[str, Any]) -> pd.DataFrame:
    """Per GPU job (`job`: its index in `jobs`): model, res, phase and the images it passes through the
    backbone."""
    rows = []
    every = max(1, int(settings.get("eval_every_epochs", 1)))
    for i, job in enumerate(jobs):
        wc = job.wildcards
        if job.rule == "train":
            run = Run.from_wildcards(_Wildcards(wc))
            images = sizes["train"] * float(run.label_fraction)
            rows.append((i, wc["model"], int(wc["res"]), "train", run.epochs * images))
            rows.append(
                (i, wc["model"], int(wc["res"]), "eval", math.ceil(run.epochs / every) * sizes["val"])
            )
        elif job.rule == "evaluate":
            rows.append((i, wc["model"], int(wc["res"]), "eval", sizes["val"] + sizes["test"]))
        elif job.rule == "features":
            rows.append((i, wc["model"], int(wc["res"]), "eval", sizes[wc["split"]]))
    return pd.DataFrame(rows, columns=["job", "model", "res", "phase", "images"])


def job_keys(config: dict[str, Any]) -> dict[str, set[str]]:
    """Experiment -> the outputs its GPU jobs write: run folders (train, linear), evaluation folders (evaluate,
    evaluate_probe) and the frozen features its probes read; job_key names a planned job the same way."""
    from .experiments import expand

    keys: dict[str, set[str]] = {}
    for name, evaluations in expand(config)[1].items():
        owned = keys.setdefault(name, set())
        for e in evaluations:
            owned |= {e.run.run_dir, e.eval_dir}
            if e.run.mode in ("linear", "knn"):
                pretrained = is_pretrained(config["models"][e.run.model])
                for variant, split in (
                    (e.run.train_variant, "train"),
                    (e.run.train_variant, "val"),
                    (e.eval_variant, "val"),
                    (e.eval_variant, "test"),
                ):
                    owned.add(e.run.features(variant, split, pretrained=pretrained))
    return keys


def job_key(job: Job) -> str | None:
    """What a planned GPU job writes, as job_keys spells it (None for the other rules)."""
    wc = _Wildcards(job.wildcards)
    if job.rule in ("train", "linear"):
        return Run.from_wildcards(wc).run_dir
    if job.rule in ("evaluate", "evaluate_probe"):
        return Evaluation(Run.from_wildcards(wc), wc.eval_variant).eval_dir
    if job.rule == "features":
        return FEATURES.format(**job.wildcards)
    return None


def experiment_costs(
    jobs: list[Job], hours_per_job: pd.Series, config: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """Per experiment: its trainings, GPU jobs (train, evaluate, features) and GPU-hours, and the part of each
    that no other selected experiment needs (`*_added`: what the experiment adds to the study)."""
    keys = job_keys(config)
    costs = {
        name: dict.fromkeys(
            ("trainings", "trainings_added", "gpu_jobs", "gpu_jobs_added", "gpu_hours", "gpu_hours_added"), 0
        )
        for name in keys
    }
    for i, job in enumerate(jobs):
        key = job_key(job)
        owners = [name for name, owned in keys.items() if key in owned] if key else []
        for name in owners:
            alone = ["", "_added"] if len(owners) == 1 else [""]
            for suffix in alone:
                costs[name][f"trainings{suffix}"] += job.rule == "train"
                costs[name][f"gpu_jobs{suffix}"] += job.rule in GPU_RULES
                costs[name][f"gpu_hours{suffix}"] += float(hours_per_job.get(i, 0.0))
    return costs


class _Wildcards:
    def __init__(self, values: dict[str, str]) -> None:
        self.__dict__.update(values)


def disk(jobs, sizes, model_size, config, profile_jobs: int) -> dict[str, float | None]:
    """GB of weights and checkpoints (in flight, and at the end), caches and features."""
    trainings = [j for j in jobs if j.rule == "train"]

    def params(job):
        known = model_size.get((job.wildcards["model"], int(job.wildcards["res"])))
        return known["params_m"] * 1e6 if known else math.nan

    weights = sorted((params(j) * BYTES_PER_PARAM for j in trainings), reverse=True)
    in_flight = weights[:profile_jobs]
    keep = config["training"].get("keep_weights", False)
    n_images = sum(sizes.values())
    caches = {
        (j.wildcards["res"], j.wildcards["variant"]) for j in jobs if {"res", "variant"} <= j.wildcards.keys()
    }
    caches |= {(j.wildcards["res"], "clean") for j in jobs if j.rule == "resize"}
    cache_bytes = sum(n_images * int(res) ** 2 * 3 for res, _ in caches)
    feature_bytes = 0.0
    for job in (j for j in jobs if j.rule == "features"):
        known = model_size.get((job.wildcards["model"], int(job.wildcards["res"])))
        feature_bytes += sizes[job.wildcards["split"]] * (known["feature_dim"] if known else math.nan) * 2
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
    counts = Counter(j.rule for j in jobs)
    sizes, sizes_source = split_sizes(workdir, config, full=full_isic2019)
    model_size = model_sizes(config, jobs)
    image_passes = passes(jobs, sizes, config["training"])
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
    submitted = [j for j in jobs if not j.local and not j.grouped]
    gpu_submissions = sum(1 for j in submitted if j.rule in GPU_RULES) + sum(
        1 for g in groups if g & set(GPU_RULES)
    )
    profile_jobs = _profile_jobs(workdir, profile)
    return {
        "jobs": dict(sorted(counts.items())),
        "trainings": counts["train"],
        "evaluations": counts["evaluate"] + counts["evaluate_probe"],
        "feature_extractions": counts["features"],
        "linear_probes": counts["linear"],
        "gpu_jobs": sum(counts[r] for r in GPU_RULES),
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
        "experiments": experiment_costs(jobs, image_passes.groupby("job")["hours"].sum(min_count=1), config),
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


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a few lines of text."""
    d = plan["disk"]
    lines = [
        f"trainings {plan['trainings']}, evaluations {plan['evaluations']}, feature extractions"
        f" {plan['feature_extractions']}, linear probes {plan['linear_probes']}",
        f"GPU jobs {plan['gpu_jobs']}; cluster submissions {plan['cluster_submissions']}"
        + (f" ({plan['gpu_submissions']} on GPUs)" if plan["gpu_submissions"] is not None else ""),
        f"images per split {plan['split_sizes']} ({plan['split_sizes_source']})",
        f"backbone image-passes: {plan['image_passes_forward_backward']:,.0f} forward+backward,"
        f" {plan['image_passes_forward']:,.0f} forward only",
        f"disk: weights {d['weights_peak_gb']:.1f} GB and checkpoints {d['checkpoints_peak_gb']:.1f} GB at peak,"
        f" {d['weights_end_gb'] + d['checkpoints_end_gb']:.1f} GB at the end; caches {d['caches_gb']:.1f} GB"
        f" (raw pixels), features {d['features_gb']:.2f} GB",
        f"GPU-hours {plan['gpu_hours']:.3g} ({plan['gpu_hours_source']})",
        "jobs per rule: " + ", ".join(f"{rule} {n}" for rule, n in plan["jobs"].items()),
        "per experiment (added: what no other experiment needs):",
        *(
            f"  {name}: trainings {c['trainings']} (added {c['trainings_added']}), GPU jobs {c['gpu_jobs']}"
            f" (added {c['gpu_jobs_added']}), GPU-hours {c['gpu_hours']:.3g} (added {c['gpu_hours_added']:.3g})"
            for name, c in plan.get("experiments", {}).items()
        ),
    ]
    return "\n".join(lines)
