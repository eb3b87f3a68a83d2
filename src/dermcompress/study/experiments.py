"""Experiment grids: which runs and evaluations each named experiment selects, and with which settings.

An experiment is a grid over models x resolutions x train variants x eval variants x modes x learning rates x
schedules x epochs x label fractions x seeds. Each point is an evaluation (runs.Evaluation) of a run
(runs.Run): experiments select runs, they do not own them, so a training that two experiments ask for (a
`vit_lr_sweep` point and `frozen_vs_finetuned`'s ViT finetune; a robustness model evaluated on four variants)
trains once and is evaluated once per variant.

`matched_variants` adds a second arm to the grid: for each variant named, runs trained on it and evaluated on
it alone (an archive stored compressed), over the grid's other dimensions; the main arm stays train_variants x
eval_variants. `reference` names the grid values of the rows its table compares the others with, each row within its own
model unless the reference names one (aggregate.py): `model: X` compares every row with X's, and a mapping
`model: {B: A, D: C}` pairs models by name (B's rows with A's, D's with C's; every other model, A and C
included, with its own). `interaction` asks for a difference of contrasts: each row's contrast (row - its
reference) minus the same contrast of the row with the interaction's values, e.g. `{model: A}`: what a codec costs
B beyond what it costs A.

The grid keys `schedules`, `epochs` and `label_fractions` may be left out: they then hold the one value the
training section (or the experiment's `training:` overrides) gives, and 1 (all labels). The probe modes (linear,
knn) take no learning rate, schedule or epochs from the grid: a linear probe sweeps `training.probe`'s learning
rates itself, kNN trains nothing. kNN on all labels of a pretrained backbone cannot depend on the seed: it runs
once, under the grid's smallest seed.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from dermcompress.learn.runs import PROBE_MODES, TRAINED_MODES, Evaluation, Run, identity_tag, is_pretrained

# Grid key in config.yaml -> field. Seeds last: repeats of one setting sit together.
GRID_KEYS = {
    "models": "model",
    "resolutions": "res",
    "train_variants": "train_variant",
    "eval_variants": "eval_variant",
    "modes": "mode",
    "lr": "lr",
    "schedules": "schedule",
    "epochs": "epochs",
    "label_fractions": "label_fraction",
    "seeds": "seed",
}
# Grid dimensions that the grid itself sets; an experiment's `training:` overrides must leave them alone.
GRID_SETTINGS = {"mode", "lr", "schedule", "epochs", "label_fraction", "seed"}
# Settings of the whole workflow, not of a run: an experiment may not override them.
WORKFLOW_SETTINGS = {"keep_weights"}
# Grid dimensions shown as table columns, in order (the fields of an evaluation but the seed and the tag).
DIMENSIONS = (
    "model",
    "res",
    "train_variant",
    "eval_variant",
    "mode",
    "lr",
    "schedule",
    "epochs",
    "label_fraction",
)


def format_number(value: float | str) -> str:
    """One spelling per number, used in paths: 1e-05, 5e-06, 0.0001, 0.25, 1."""
    return f"{float(value):g}"


def spelt(value: Any) -> str:
    """A grid value as one string, whatever type it was read as: numbers as paths spell them (format_number:
    1e-05, 0.25, 224), names as they are."""
    try:
        return format_number(value)
    except (TypeError, ValueError):
        return str(value)


def selected_experiments(config: dict[str, Any]) -> list[str]:
    chosen = config.get("run_experiments", "all")
    names = list(config["experiments"]) if chosen == "all" else list(chosen)
    unknown = [n for n in names if n not in config["experiments"]]
    if unknown:
        raise ValueError(f"config key 'run_experiments': unknown experiments {unknown}")
    return names


def experiment_training(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The training section with the experiment's `training:` overrides (nested ones merged)."""
    settings = copy.deepcopy(config["training"])
    for key, value in config["experiments"][name].get("training", {}).items():
        if isinstance(value, dict):
            settings[key] = {**settings.get(key, {}), **value}
        else:
            settings[key] = value
    return settings


def grid_values(config: dict[str, Any], name: str) -> dict[str, Any]:
    """Field -> the values the experiment's grid takes, the optional keys filled in from its training.

    `lr` stays as written: a list, or a mapping mode (or mode:model) -> list.
    """
    grid = config["experiments"][name]
    training = experiment_training(config, name)
    defaults = {
        "lr": [],
        "schedules": [training.get("schedule", "linear")],
        "epochs": [training.get("epochs", 1)],
        "label_fractions": [1.0],
    }
    return {field: grid.get(key, defaults.get(key)) for key, field in GRID_KEYS.items()}


def learning_rates(lr: list | dict, mode: str, model: str) -> list[str]:
    """The learning rates of one trained mode and model, spelt as in paths.

    `lr` is a list, or a mapping whose keys are a mode (`finetune`) or a mode and a model (`finetune:resnet18`);
    the most specific key wins, so a model trained from random weights can get a rate of its own.
    """
    if isinstance(lr, dict):
        lr = lr.get(f"{mode}:{model}", lr.get(mode, []))
    return [format_number(x) for x in lr]


def _grid_runs(config: dict[str, Any], name: str) -> list[tuple[Run, list[str], dict[str, Any]]]:
    """(run, its eval variants, its settings) for every run of one experiment's grid, in grid order."""
    values = grid_values(config, name)
    lr, eval_variants, seeds = values.pop("lr"), values.pop("eval_variant"), values.pop("seed")
    matched = list(config["experiments"][name].get("matched_variants", []))
    values["train_variant"] = list(dict.fromkeys([*values["train_variant"], *matched]))
    training = experiment_training(config, name)
    found: dict[Run, tuple[list[str], dict[str, Any]]] = {}
    for point in itertools.product(*values.values(), seeds):
        v = dict(zip([*values, "seed"], point, strict=True))
        evals = _evaluated_on(
            v["train_variant"], config["experiments"][name]["train_variants"], eval_variants, matched
        )
        fraction = format_number(v["label_fraction"])
        if v["mode"] in TRAINED_MODES:
            hparams = [
                {"lr": rate, "schedule": v["schedule"], "epochs": int(v["epochs"])}
                for rate in learning_rates(lr, v["mode"], v["model"])
            ]
        else:
            hparams = [{}]
        seed = int(v["seed"])
        pretrained = is_pretrained(config["models"][v["model"]])
        if v["mode"] == "knn" and pretrained and float(fraction) == 1:
            seed = min(int(s) for s in seeds)  # nothing in it depends on the seed: once
        for h in hparams:
            settings = {
                **training,
                "mode": v["mode"],
                "label_fraction": float(fraction),
                "seed": seed,
                **({**h, "lr": float(h["lr"])} if h else {}),
            }
            run = Run(
                model=v["model"],
                res=int(v["res"]),
                train_variant=v["train_variant"],
                mode=v["mode"],
                **h,
                tag=identity_tag(settings, config["training"], v["mode"]),
                label_fraction=fraction,
                seed=seed,
            )
            found.setdefault(run, (evals, settings))
    return [(run, evs, settings) for run, (evs, settings) in found.items()]


def _evaluated_on(
    train_variant: str, main: list[str], eval_variants: list[str], matched: list[str]
) -> list[str]:
    """A run's eval variants: every eval variant for the grid's own train variants (`main`), and its own
    variant for the matched arm's (an archive stored and sent with one codec)."""
    variants = list(eval_variants) if train_variant in main else []
    if train_variant in matched and train_variant not in variants:
        variants.append(train_variant)
    return variants


def _evaluations(grid: list[tuple[Run, list[str], dict[str, Any]]]) -> list[Evaluation]:
    """The evaluations of an experiment's grid (_grid_runs), each once, in grid order."""
    return list(dict.fromkeys(Evaluation(run, ev) for run, evs, _ in grid for ev in evs))


def expand(config: dict[str, Any]) -> tuple[dict[Run, dict[str, Any]], dict[str, list[Evaluation]]]:
    """The runs of the selected experiments, each once with its settings (those of the first experiment that
    asks for it: experiments that share a run agree on everything that changes it, see runs.IDENTITY), and
    each experiment's evaluations, in grid order."""
    runs: dict[Run, dict[str, Any]] = {}
    evaluations: dict[str, list[Evaluation]] = {}
    for name in selected_experiments(config):
        grid = _grid_runs(config, name)
        for run, _, settings in grid:
            runs.setdefault(run, settings)
        evaluations[name] = _evaluations(grid)
    return runs, evaluations


def varying_fields(evaluations: list[Evaluation]) -> list[str]:
    """The grid dimensions (DIMENSIONS) with more than one value among the evaluations."""
    points = [e.point() for e in evaluations]
    return [name for name in DIMENSIONS if len({p[name] for p in points}) > 1]


def figure_kinds(evaluations: list[Evaluation]) -> list[str]:
    """The figures an experiment's evaluations call for: training curves always; the cost trade-off when
    resolution varies; a robustness heat map when the evaluation data vary; learning curves when the label
    fraction does; accuracy against bytes per image when the images evaluated on differ (resolution or
    variant); the paired differences against each row's reference row when the table has more than one row;
    the reliability diagram (calibration) and the Δ AUC by subgroup (subgroup_figure.py) always."""
    vary = set(varying_fields(evaluations))
    wanted = {"cost": "res", "robustness": "eval_variant", "label_efficiency": "label_fraction"}
    kinds = ["curves", *(kind for kind, field in wanted.items() if field in vary)]
    if vary & {"res", "eval_variant"}:
        kinds.append("rate_accuracy")
    if vary:
        kinds.append("forest")
    kinds += ["reliability", "subgroups"]
    return kinds


def check_experiments(config: dict[str, Any]) -> list[str]:
    """Problems with the experiment grids (unknown models, resolutions or variants; learning rates missing or
    given to a probe; a reference or interaction the grid does not take; grid or workflow settings in
    `training:`), as 'key: problem' lines."""
    known = {
        "models": set(config["models"]),
        "resolutions": {int(r) for r in config["resize"]["resolutions"]},
        "train_variants": set(config["degrade"]["variants"]),
        "eval_variants": set(config["degrade"]["variants"]),
        "matched_variants": set(config["degrade"]["variants"]),
    }
    where = {"models": "models", "resolutions": "resize.resolutions"}
    problems = []
    for name in selected_experiments(config):
        grid = config["experiments"][name]
        for key, allowed in known.items():
            values = {int(v) for v in grid[key]} if key == "resolutions" else set(grid.get(key, []))
            if missing := sorted(values - allowed, key=str):
                source = where.get(key, "degrade.variants")
                problems.append(f"experiments.{name}.{key}: {missing} not in {source}")
        problems += _check_lr(name, grid, config["models"])
        problems += _check_reference(config, name)
        problems += _check_interaction(config, name)
        for key in sorted(GRID_SETTINGS & set(grid.get("training", {}))):
            problems.append(
                f"experiments.{name}.training.{key}: set by the grid (experiments.{name}.{_grid_key(key)})"
            )
        for key in sorted(WORKFLOW_SETTINGS & set(grid.get("training", {}))):
            problems.append(
                f"experiments.{name}.training.{key}: a setting of the whole workflow (training.{key})"
            )
    return problems


def _check_lr(name: str, grid: dict[str, Any], registry: dict[str, Any]) -> list[str]:
    """Every trained mode and model of the grid has learning rates; a probe mode has none (it sweeps its own);
    a `mode:model` key names a registered model (a typo is an error; a model this grid does not run is not, so
    that an overlay can narrow a grid)."""
    lr = grid.get("lr", [])
    keys = list(lr) if isinstance(lr, dict) else []
    problems = [
        f"experiments.{name}.lr.{key}: {key.partition(':')[0]} takes no learning rate (linear probes sweep"
        " training.probe.learning_rates; kNN trains nothing): remove it"
        for key in keys
        if key.partition(":")[0] in PROBE_MODES
    ]
    problems += [
        f"experiments.{name}.lr.{key}: no model {key.partition(':')[2]!r} in models"
        for key in keys
        if ":" in key and key.partition(":")[2] not in registry
    ]
    trained = [(mode, model) for mode in grid["modes"] if mode in TRAINED_MODES for model in grid["models"]]
    if missing := [f"{m}:{n}" for m, n in trained if not learning_rates(lr, m, n)]:
        problems.append(f"experiments.{name}.lr: no learning rates for {missing}")
    return problems


def reference_model(reference: dict[str, Any], model: str) -> str:
    """The model whose rows the rows of `model` are compared with: the reference's `model` (one name for every
    row, or a mapping compared model -> its reference model, a model it does not list being its own), else
    `model` itself."""
    named = reference.get("model")
    if isinstance(named, dict):
        return str(named.get(model, model))
    return model if named is None else str(named)


def _check_reference(config: dict[str, Any], name: str) -> list[str]:
    """A `reference` names grid fields, each with a value the experiment's evaluations take, and together with
    the values every model's reference model (its own unless the reference names one) has somewhere in the
    grid, so no table row lacks a reference for want of a config value."""
    reference = config["experiments"][name].get("reference") or {}
    if not reference:
        return [f"experiments.{name}.reference: missing: name the grid values every row is compared with"]
    points = [e.point() for e in expand_one(config, name)]
    problems = []
    for field, value in reference.items():
        if field == "model" and isinstance(value, dict):
            problems += _check_model_pairs(name, value, config["models"], [p["model"] for p in points])
            continue
        problems += _check_grid_value(name, "reference", field, value, points)
    if problems:
        return problems
    wanted = {field: spelt(value) for field, value in reference.items() if field != "model"}
    has = {p["model"] for p in points if all(spelt(p[f]) == v for f, v in wanted.items())}
    models = dict.fromkeys(p["model"] for p in points)
    if lacking := sorted({reference_model(reference, m) for m in models} - has):
        problems.append(
            f"experiments.{name}.reference: no evaluation of {lacking} has all of {reference} (each model is"
            " compared with its own reference row, or with the rows of the model the reference names for it)"
        )
    return problems


def _check_grid_value(name: str, key: str, field: str, value: Any, points: list[dict[str, Any]]) -> list[str]:
    """`field` is a grid dimension and `value` one of the values the experiment's evaluations take on it."""
    if field not in DIMENSIONS:
        return [f"experiments.{name}.{key}.{field}: not a grid field ({', '.join(DIMENSIONS)})"]
    taken = sorted({spelt(p[field]) for p in points})
    if spelt(value) not in taken:
        return [f"experiments.{name}.{key}.{field}: {value!r} is not among the grid's {taken}"]
    return []


def _check_model_pairs(
    name: str, pairs: dict[str, str], registry: dict[str, Any], models: list[str]
) -> list[str]:
    """`reference.model` as a mapping compared model -> reference model: registered names, no chain (a reference
    model is compared with none), each compared model of the grid paired with a model of the grid. A pair whose
    compared model the grid does not run is left unused, not an error, so that an overlay can narrow the grid
    (Snakemake merges an overlay's mapping into config.yaml's); but at least one pair must be used."""
    key = f"experiments.{name}.reference.model"
    grid = sorted(set(models))
    if unknown := sorted({*pairs, *map(str, pairs.values())} - set(registry)):
        return [f"{key}: {unknown} not in models"]
    problems = [
        f"{key}.{model}: {model} is compared with {pairs[model]} and is itself the reference of"
        f" {sorted(k for k, v in pairs.items() if v == model)}: a chain; pair each model with its final reference"
        if model != pairs[model]
        else f"{key}.{model}: {model} is paired with itself: leave it out (an unlisted model is its own reference)"
        for model in pairs
        if model in pairs.values()
    ]
    used = [model for model in pairs if model in grid]
    problems += [
        f"{key}.{model}: {pairs[model]!r} is not among the experiment's models {grid}: {model}'s rows would have"
        " no reference; add it to the experiment's models or pair the model with one of them"
        for model in used
        if pairs[model] not in grid
    ]
    if not used:
        problems.append(
            f"{key}: none of the compared models {sorted(pairs)} is among the experiment's models {grid}"
        )
    return problems


def _check_interaction(config: dict[str, Any], name: str) -> list[str]:
    """An `interaction` names grid fields, each with a value the experiment's evaluations take, and none the
    reference names (the row it pairs with would share the row's reference row: a plain difference, not a
    difference of contrasts)."""
    interaction = config["experiments"][name].get("interaction") or {}
    if not interaction:
        return []
    points = [e.point() for e in expand_one(config, name)]
    reference = config["experiments"][name].get("reference") or {}
    problems = []
    for field, value in interaction.items():
        problems += _check_grid_value(name, "interaction", field, value, points)
        if field in reference:
            problems.append(
                f"experiments.{name}.interaction.{field}: the reference names {field} too, so the paired row"
                " would share the row's reference (a plain difference); name a dimension the reference leaves"
                f" to each row, e.g. model when the reference is {{eval_variant: clean}}"
            )
    return problems


def expand_one(config: dict[str, Any], name: str) -> list[Evaluation]:
    """The evaluations of one experiment, in grid order."""
    return _evaluations(_grid_runs(config, name))


def _grid_key(field: str) -> str:
    return next(key for key, f in GRID_KEYS.items() if f == field)
