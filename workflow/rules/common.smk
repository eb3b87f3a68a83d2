# Helpers shared by every rule: where the raw data are, what the final targets are, code fingerprints.
# (setup.smk, included by the Snakefile before validation, has made the package importable.)
import hashlib
import os
import re
from pathlib import Path

from dermcompress import config as dc_config
from dermcompress.data import datasets, resize, sources, sourcestamp
from dermcompress.errors import ConfigError
from dermcompress.study import experiments, figure_jobs
from dermcompress.provenance import fingerprint, lineage
from dermcompress.learn import pretrain_spec, runs
from dermcompress.provenance.fingerprint import code_fingerprint
from snakemake_interface_executor_plugins.settings import DeploymentMethod

# What the schema cannot say, and each experiment's `training:` overrides against the training section's.
SCHEMA = Path(workflow.basedir) / "workflow/schemas/config.schema.yaml"
dc_config.check(config, schema=SCHEMA)

SOURCE = config["data"]["source"]
SYNTHETIC = config["data"]["isic_root"] is None
# The synthetic stand-in of ISIC 2019 sits in results/data/synthetic/, of another source in a folder of its own.
SYNTHETIC_ROOT = str(
    Path("results/data/synthetic", "" if SOURCE == "isic2019" else SOURCE)
)
ISIC_ROOT = SYNTHETIC_ROOT if SYNTHETIC else config["data"]["isic_root"]
# A `dermcompress synth` set that data.isic_root names by hand is synthetic too: its marker file says so.
SYNTHETIC_MARKER = None if SYNTHETIC else datasets.find_synthetic_marker(ISIC_ROOT)
SYNTHETIC_DATA = SYNTHETIC or SYNTHETIC_MARKER is not None
RESOLUTIONS = [int(r) for r in config["resize"]["resolutions"]]

# How many jobs ingest and each resolution's resize are scattered over (the Snakefile's scattergather).
INGEST_PARTS = len(scatter.ingest("{scatteritem}"))
RESIZE_PARTS = len(scatter.resize("{scatteritem}"))
VARIANTS = list(config["degrade"]["variants"])
# The variants the degrade rule makes (clean is the resize rule's output); a pattern that matches nothing if none.
DEGRADED_VARIANTS = "|".join(v for v in VARIANTS if v != "clean") or "(?!)"
EXPERIMENTS = experiments.selected_experiments(config)
# Every run once (with its settings), and each experiment's evaluations of them (experiments.py).
RUNS, EVALUATIONS = experiments.expand(config)
RUN_DIR, CHECKPOINT_DIR = runs.RUN_DIR, runs.CHECKPOINT_DIR
# The run's path below results/runs/, reused for its logs and benchmarks.
RUN_ID = RUN_DIR.removeprefix("results/runs/")
# One job per run scores it on all its eval variants, one per backbone input writes every split its probes read
# (runs.evaluation_jobs, feature_jobs); grouped by what they write, a rule per group (train.smk).
_ALL_EVALUATIONS = [e for evals in EVALUATIONS.values() for e in evals]
_EVALUATION_JOBS = runs.evaluation_jobs(_ALL_EVALUATIONS, VARIANTS)
TRAINED_EVALUATIONS = runs.jobs_by_set(
    {r: v for r, v in _EVALUATION_JOBS.items() if r.mode in runs.TRAINED_MODES}
)
PROBE_EVALUATIONS = runs.jobs_by_set(
    {r: v for r, v in _EVALUATION_JOBS.items() if r.mode in runs.PROBE_MODES}
)
FEATURE_JOBS = runs.jobs_by_set(runs.feature_jobs(_ALL_EVALUATIONS, config["models"]))
# One job per experiment draws its figures; a rule per set of figure kinds (aggregate.smk).
FIGURE_JOBS = runs.jobs_by_set(
    {name: tuple(experiments.figure_kinds(EVALUATIONS[name])) for name in EXPERIMENTS}
)
# Domain pretrainings (pretrain.smk): name -> entry; each writes results/pretrain/<name>/.
PRETRAINING = config.get("pretraining") or {}
PRETRAIN_DIR = pretrain_spec.PRETRAIN_DIR
PRETRAIN_CHECKPOINT_DIR = pretrain_spec.PRETRAIN_CHECKPOINT_DIR


wildcard_constraints:
    res="|".join(str(r) for r in RESOLUTIONS),
    variant="|".join(VARIANTS),
    train_variant="|".join(VARIANTS),
    eval_variant="|".join(VARIANTS),
    experiment="|".join(config["experiments"]) or "^$",
    model="|".join(config["models"]) or "^$",
    mode="|".join(runs.MODES),
    hparams=r"[^/]+",
    label_fraction=r"[0-9.e+-]+",
    seed=r"\d+",
    split="train|val|test",
    init=r"pretrained|seed\d+",


onstart:
    if SYNTHETIC:
        logger.warning(sources.SYNTHETIC_BANNER)
    elif SYNTHETIC_MARKER:
        logger.warning(sources.synthetic_banner(SYNTHETIC_MARKER))


# Where the package remembers what it works out about its code and the installed packages (fingerprint.MEMO):
# made now, so that this process, not the first job, fills it.
Path(fingerprint.MEMO.parent).mkdir(parents=True, exist_ok=True)


def get_code(module):
    """What a job depends on besides its inputs: the fingerprint of a package module and everything it imports from
    the package, and the installed versions of the third-party packages those modules import.

    Passed as a param, so that editing e.g. dermcompress/data/degrade.py, or installing another Pillow, reruns
    degradation and what follows, which Snakemake cannot see on its own (it only tracks the script file). Jobs
    in conda envs leave the versions out: Snakemake tracks those envs itself, and this interpreter's packages
    are not theirs.
    """
    in_conda = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    return code_fingerprint(f"dermcompress.{module}", packages=not in_conda)


def get_data_threads(wildcards, input):
    """Threads of a resize or degrade job: one per 1000 images (resize.job_threads). Snakemake asks again once
    the job's input (the split, or the clean cache) exists; until then, one."""
    images = resize.images_in(input.get("splits") or input.get("clean"))
    return resize.job_threads(images) if images is not None else 1


def get_synth_root(wildcards, output):
    """The folder synth writes into: the one that holds every output (the ISIC Archive's: the one output)."""
    return os.path.commonpath(list(output))


def get_part(wildcards):
    """The 0-based part of a scattered job, from its {scatteritem} ('2-of-8' -> 1)."""
    return int(wildcards.scatteritem.split("-of-")[0]) - 1


def get_resize_parts(wildcards):
    """The clean cache's parts at one resolution, which the resize gather job merges."""
    return gather.resize(
        "results/cache/{res}px/clean.parts/{scatteritem}", res=wildcards.res
    )


def get_raw_inputs():
    """The data source's files (datasets.source_paths: label file, metadata, duplicates list, image folders or
    zips), or the synthetic ones; and data.extra_metadata when it names a CSV. A missing one stops the run
    naming it: as an input with no rule to make it, Snakemake would drop ingest and keep the old manifest.
    """
    inputs = datasets.source_paths(SOURCE, ISIC_ROOT, synthetic=SYNTHETIC)
    if extra := config["data"].get("extra_metadata"):
        if not Path(extra).is_file():
            raise ConfigError("data.extra_metadata", f"{extra!r} is not a file")
        inputs["extra_metadata"] = extra
    return inputs


def get_data_source(wildcards):
    """Where the data are and what is there, a param of ingest: data.isic_root, data.extra_metadata and the
    stamp of the user's files (sourcestamp.py: the CSVs' contents, the zips' sizes and times, the folders'
    listings), so that what mtimes miss (a file replaced by an older one) reruns it too. The synthetic files
    are synth's outputs, which Snakemake tracks itself."""
    paths = get_raw_inputs()
    if SYNTHETIC:
        paths = {k: v for k, v in paths.items() if k == "extra_metadata"}
    return {
        "root": ISIC_ROOT,
        "extra_metadata": config["data"].get("extra_metadata"),
        "stamp": sourcestamp.source_stamp(paths),
    }


def get_synth_outputs():
    """The outputs of synth: the source's files in its layout, image folders as directories."""
    paths = datasets.source_paths(SOURCE, SYNTHETIC_ROOT, synthetic=True)
    images = paths.pop("images")
    folders = [images] if isinstance(images, str) else images
    return paths | {f"images_{i}": directory(f) for i, f in enumerate(folders)}


def get_degrade_input(wildcards):
    """A variant is made from the clean cache of its resolution; degrading before resizing also reads the raw
    images (and the manifest's sha256 of each)."""
    inputs = {"clean": f"results/cache/{wildcards.res}px/clean"}
    if config["degrade"]["order"] == "before_resize":
        inputs["manifest"] = "results/data/manifest.parquet"
        inputs["images"] = get_raw_inputs()["images"]
    return inputs


def get_variant(wildcards):
    """The settings of one data variant, with the shared degradation parameters."""
    return dc_config.variant_settings(config, wildcards.variant)


def rule_name(kind, written, noun="variants"):
    """The name given to the rules made per set of jobs, from their kind and what each of their jobs writes
    (`evaluate__clean__jpeg_q75`, `features__val__test`), or, past 60 characters (a name lands in cluster job
    names and log paths), how many of what and a hash of which (`evaluate__17_variants_0c1d2e3f`).
    """
    name = "__".join([kind, *written])
    if len(name) <= 60:
        return name
    digest = hashlib.sha256("\n".join(written).encode()).hexdigest()[:8]
    return f"{kind}__{len(written)}_{noun}_{digest}"


def inherit_profile_settings(kind, names):
    """Give the rules made per set of variants or splits (`evaluate__clean__jpeg_q75`) what a profile's
    set-resources and set-threads say for their kind (`evaluate`): Snakemake matches those by exact rule name,
    and a profile cannot know the names a config makes. Called before the rules are defined (Snakemake applies
    them then); each job step of a cluster job parses the workflow again, and so inherits the same.
    """
    settings = workflow.resource_settings
    for parsed in (
        settings._parsed_overwrite_resources,
        settings._parsed_overwrite_threads,
    ):
        if kind in parsed:
            parsed.update({name: parsed[kind] for name in names})


def one_of(values):
    """A wildcard constraint that matches exactly these values."""
    return "|".join(re.escape(str(v)) for v in values)


def run_ids(selected):
    """The runs' folders below results/runs/: the values of an evaluation rule's {run} wildcard."""
    return [run.run_dir.removeprefix("results/runs/") for run in selected]


def get_model_name(wildcards):
    """The model a job's wildcards name: its own {model}, or its run's, or its features folder's."""
    if hasattr(wildcards, "features"):
        return get_features_key(wildcards)["model"]
    return get_run(wildcards).model


def get_model_entry(wildcards):
    """The registry entry of the run's model (config `models:`); a `pretrain:<name>` model's is the local file
    of that pretraining's backbone with its init model's architecture (pretrain_spec.pretrained_entry).
    """
    return pretrain_spec.pretrained_entry(
        get_model_name(wildcards), config["models"], PRETRAINING
    )


def get_pretrained_backbone(wildcards):
    """The backbone a `pretrain:<name>` model loads, as an input of every job that builds the model: a real DAG
    edge, so a changed pretraining reruns it; none for other models."""
    name = pretrain_spec.pretrained_from(config["models"][get_model_name(wildcards)])
    return [] if name is None else [pretrain_spec.backbone_file(name)]


def get_local_weights(wildcards):
    """A local weights file or folder of the run's model, as an input: replacing it reruns the run; a
    pretraining's backbone always (its rule makes it).

    A missing one is left to the job, whose error says how to get and convert the weights.
    """
    if backbone := get_pretrained_backbone(wildcards):
        return backbone
    source = get_model_entry(wildcards)["source"]
    path = source.removeprefix("local:")
    return [path] if source.startswith("local:") and Path(path).exists() else []


def get_run(wildcards):
    """The run a job's wildcards name (runs.Run): RUN_DIR's, or an evaluation's {run} folder."""
    if hasattr(wildcards, "run"):
        return runs.parse_run_dir(f"results/runs/{wildcards.run}")
    return runs.Run.from_wildcards(wildcards)


def get_resolution(wildcards):
    """The image size a model job works at: its run's, or its features folder's."""
    if hasattr(wildcards, "features"):
        return get_features_key(wildcards)["res"]
    return get_run(wildcards).res


def get_run_settings(wildcards):
    """The run's resolved training settings: defaults, the experiment's overrides, the grid point."""
    run = get_run(wildcards)
    if run not in RUNS:
        raise ValueError(f"no selected experiment asks for {run.run_dir}")
    return RUNS[run]


def get_run_group(wildcards):
    """One cluster job per training: a run's train job and its evaluation job (and the weights between them) are
    one group (named by resolution, as the SLURM logs show it).
    """
    return f"run_{get_run(wildcards).res}px"


def evaluation_outputs(variants):
    """An evaluation job's outputs: predictions and metrics of each eval variant, in the run's eval/ folder."""
    outputs = {}
    for variant in variants:
        folder = f"results/runs/{{run}}/eval/{variant}"
        outputs[f"predictions_{variant}"] = f"{folder}/predictions.parquet"
        outputs[f"metrics_{variant}"] = f"{folder}/metrics.json"
    return outputs


def get_evaluation_inputs(variants):
    """Input function of an evaluation rule: the run's weights and training summary, and each eval variant's
    cache at the run's resolution."""

    def inputs(wildcards):
        run = get_run(wildcards)
        return {
            "weights": f"{run.run_dir}/weights.safetensors",
            "summary": f"{run.run_dir}/train.json",
            "splits": "results/data/splits.parquet",
            # The model is built from its registry entry before the run's weights load into it.
            "backbone": get_pretrained_backbone(wildcards),
            **{f"cache_{v}": f"results/cache/{run.res}px/{v}" for v in variants},
        }

    return inputs


def get_weights_output(path):
    """The trained weights: temporary (deleted once every evaluation of the run has read them) unless
    training.keep_weights."""
    return path if config["training"].get("keep_weights", False) else temp(path)


def get_probe_features(split):
    """Input function: the frozen features of a probe run's backbone on `split` of the run's training variant."""

    def features(wildcards):
        return probe_features(get_run(wildcards), wildcards.train_variant)[split]

    return features


def probe_features(run, eval_variant):
    """The features a probe run reads, by role (runs.Run.probe_features)."""
    pretrained = runs.is_pretrained(config["models"][run.model])
    return run.probe_features(eval_variant, pretrained=pretrained)


def get_probe_inputs(variants):
    """Input function of a probe evaluation rule: each eval variant's val and test features (eval_val_<variant>,
    eval_test_<variant>); a linear probe's head and summary, or kNN's bank (the training variant's train
    features) and the validation features that choose k."""

    def inputs(wildcards):
        run = get_run(wildcards)
        found = {"splits": "results/data/splits.parquet"}
        for variant in variants:
            features = probe_features(run, variant)
            found[f"eval_val_{variant}"] = features["eval_val"]
            found[f"eval_test_{variant}"] = features["eval_test"]
        if run.mode == "linear":
            return found | {
                "head": f"{run.run_dir}/head.safetensors",
                "summary": f"{run.run_dir}/train.json",
            }
        return found | {"bank": features["train"], "choose": features["val"]}

    return inputs


def feature_outputs(splits):
    """A features job's outputs: one table per split, in its features folder."""
    return {split: f"results/features/{{features}}/{split}.parquet" for split in splits}


def get_features_key(wildcards):
    """The model, resolution, variant and init of a features job (runs.FEATURES_DIR)."""
    return runs.parse_features_dir(f"results/features/{wildcards.features}")


def get_features_cache(wildcards):
    """The cache a features job reads: its variant at its resolution."""
    key = get_features_key(wildcards)
    return f"results/cache/{key['res']}px/{key['variant']}"


def get_features_seed(wildcards):
    """The seed a features job builds its backbone from (runs.init_seed)."""
    return runs.init_seed(get_features_key(wildcards)["init"])


def pretrain_outputs():
    """A pretraining's files (learn/pretrain.py): backbone, heads, history, config and the summary."""
    names = dict(
        zip(
            ("backbone", "heads", "history", "config", "summary"),
            pretrain_spec.PRETRAIN_FILES,
        )
    )
    return {role: f"{PRETRAIN_DIR}/{file}" for role, file in names.items()}


def get_pretrain_spec(wildcards):
    """The pretraining's spec, resolved (DEFAULT_SPEC overlaid by its entry, the resolution left out)."""
    spec = dc_config.pretraining_spec(config, wildcards.name)
    return pretrain_spec.resolve_spec(spec, wildcards.name)


def get_pretrain_init(wildcards):
    """The registry entry of the pretraining's init model; None from scratch."""
    init = get_pretrain_spec(wildcards)["init"]
    return None if init == "scratch" else config["models"][init]


def get_pretrain_resolution(wildcards):
    return PRETRAINING[wildcards.name]["resolution"]


def get_pretrain_caches(wildcards):
    """{variant: cache folder} of the pretraining's variants at its resolution (which cache is which variant)."""
    res = get_pretrain_resolution(wildcards)
    return {
        v: f"results/cache/{res}px/{v}"
        for v in get_pretrain_spec(wildcards)["variants"]
    }


def get_pretrain_inputs(wildcards):
    """The caches it reads (cache_<variant>), the splits (its leakage check) and a local init's weights."""
    inputs = {f"cache_{v}": c for v, c in get_pretrain_caches(wildcards).items()}
    inputs["splits"] = "results/data/splits.parquet"
    init = get_pretrain_init(wildcards)
    path = (init or {}).get("source", "").removeprefix("local:")
    if init and init["source"].startswith("local:") and Path(path).exists():
        inputs["weights"] = path
    return inputs


def get_used_pretrainings():
    """The pretrainings whose backbone a selected experiment's model loads (only those run, as only the caches
    an experiment reads are made)."""
    models = {e.run.model for evaluations in EVALUATIONS.values() for e in evaluations}
    names = [pretrain_spec.pretrained_from(config["models"][m]) for m in sorted(models)]
    return sorted({name for name in names if name is not None})


def get_all_metrics():
    """metrics.json of every evaluation of the selected experiments, each once."""
    return list(
        dict.fromkeys(
            f"{e.eval_dir}/metrics.json"
            for evals in EVALUATIONS.values()
            for e in evals
        )
    )


def get_experiment_metrics(wildcards):
    return [f"{e.eval_dir}/metrics.json" for e in EVALUATIONS[wildcards.experiment]]


def get_experiment_predictions(wildcards):
    """predictions.parquet of every evaluation of the experiment: the paired comparisons rescore them."""
    return [
        f"{e.eval_dir}/predictions.parquet" for e in EVALUATIONS[wildcards.experiment]
    ]


def get_reference(wildcards):
    """The grid values of the rows the experiment's table compares the other rows with (each within its own
    model unless they name one)."""
    return config["experiments"][wildcards.experiment]["reference"]


def get_family(wildcards):
    """The experiment's Holm families: the rows sharing a reference (default) or the whole table."""
    return config["experiments"][wildcards.experiment].get("family", "reference")


def get_interaction(wildcards):
    """The grid values of the rows whose contrasts the experiment's table subtracts from each row's (a
    difference of contrasts), or {} where it declares none."""
    return config["experiments"][wildcards.experiment].get("interaction", {})


def get_experiment_caches(wildcards):
    """The caches an experiment's evaluations score (eval variant at each resolution): its table reads their
    bytes per image, and reruns only when one of them changes."""
    return list(
        dict.fromkeys(
            f"results/cache/{e.run.res}px/{e.eval_variant}"
            for e in EVALUATIONS[wildcards.experiment]
        )
    )


def get_all_caches():
    """The caches the workflow makes: the clean one at every resolution, and each other variant at the
    resolutions the selected experiments train or evaluate on it (all of them when no runs are selected).
    """
    used = {(r, v) for r in RESOLUTIONS for v in VARIANTS if v == "clean" or not RUNS}
    for evaluations in EVALUATIONS.values():
        for e in evaluations:
            used |= {(e.run.res, e.run.train_variant), (e.run.res, e.eval_variant)}
    return [
        f"results/cache/{res}px/{variant}"
        for res in RESOLUTIONS
        for variant in VARIANTS
        if (res, variant) in used
    ]


def get_experiment_histories(wildcards):
    """history.csv of every run of the experiment that trains (kNN trains nothing)."""
    return list(
        dict.fromkeys(
            f"{e.run.run_dir}/history.csv"
            for e in EVALUATIONS[wildcards.experiment]
            if e.run.mode != "knn"
        )
    )


def get_experiment_runs(wildcards):
    """The evaluation folders behind an experiment's table and figures, which their report captions list."""
    return lineage.runs_of(get_experiment_metrics(wildcards))


def get_title(wildcards):
    """The experiment's description, the caption of its table and figures."""
    grid = config["experiments"][wildcards.experiment]
    return grid.get("description", wildcards.experiment)


def figure_outputs(kinds):
    """A figures job's outputs: one PNG per kind, each in the report with its caption and label."""
    return {
        kind: report(
            f"results/figures/{{experiment}}_{kind}.png",
            caption=f"../report/figure_{kind}.rst",
            category="figures",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": figure_jobs.KINDS[kind][1]},
        )
        for kind in kinds
    }


def get_figure_inputs(kinds):
    """Input function of a figures rule: what its kinds read (figure_jobs.INPUTS) of the experiment's."""
    functions = {
        "metrics": get_experiment_metrics,
        "histories": get_experiment_histories,
        "table": lambda wildcards: f"results/tables/{wildcards.experiment}.csv",
        "predictions": get_experiment_predictions,
        "subgroups": lambda wildcards: f"results/tables/{wildcards.experiment}_subgroups.csv",
    }

    def inputs(wildcards):
        return {
            name: functions[name](wildcards) for name in figure_jobs.inputs(list(kinds))
        }

    return inputs


def get_figures():
    """The figures each selected experiment's grid calls for (experiments.figure_kinds)."""
    return [
        f"results/figures/{name}_{kind}.png"
        for name in EXPERIMENTS
        for kind in experiments.figure_kinds(EVALUATIONS[name])
    ]


def get_final_outputs():
    """Data stages (every cache an experiment needs), the data and bytes summaries, the pretrainings they use; with runs selected, the runs, their
    index, a table and a subgroup table per experiment and its figures."""
    outputs = [
        "results/data/split_report.json",
        "results/data/summary.html",
        "results/data/bytes.html",
        *get_all_caches(),
    ]
    outputs += expand(f"{PRETRAIN_DIR}/pretrain.json", name=get_used_pretrainings())
    if RUNS:
        outputs += [
            *get_all_metrics(),
            "results/runs/index.csv",
            *expand(
                "results/tables/{experiment}.{ext}",
                experiment=EXPERIMENTS,
                ext=["csv", "md", "tex", "html"],
            ),
            *expand(
                "results/tables/{experiment}_subgroups.{ext}",
                experiment=EXPERIMENTS,
                ext=["csv", "md", "html"],
            ),
            *get_figures(),
        ]
    return outputs
