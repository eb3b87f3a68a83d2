"""Experiment grids: which training runs the config asks for, where their outputs go, and their settings.

A run is one point of a named experiment's grid: model x resolution x train variant x eval variant x mode x
learning rate x schedule x epochs x label fraction x seed. Its folder under results/runs/ spells every one of them
out (RUN_DIR), so two distinct runs never share a folder and a path says what produced it:

    results/runs/vit_lr_sweep/vit_b16/112px/degraded__clean/finetune/lr5e-05_cosine_6ep/labels1/seed0

The grid keys `schedules`, `epochs` and `label_fractions` may be left out: they then hold the one value the
training section (or the experiment's `training:` overrides) gives, and 1 (all labels).
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

RUN_DIR = (
    "results/runs/{experiment}/{model}/{res}px/{train_variant}__{eval_variant}/{mode}/"
    "lr{lr}_{schedule}_{epochs}ep/labels{label_fraction}/seed{seed}"
)
CHECKPOINT_DIR = RUN_DIR.replace("results/runs/", "results/checkpoints/", 1)
RUN_FILES = ("metrics.json", "predictions.parquet", "history.csv", "config.json", "weights.safetensors")
# Grid key in config.yaml -> Run field. Seeds last: repeats of one setting sit together.
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


@dataclass(frozen=True)
class Run:
    experiment: str
    model: str
    res: int
    train_variant: str
    eval_variant: str
    mode: str
    lr: str
    schedule: str
    epochs: int
    label_fraction: str
    seed: int

    @property
    def run_dir(self) -> str:
        return RUN_DIR.format(**asdict(self))

    @classmethod
    def from_wildcards(cls, wildcards: Any) -> Run:
        """The run a rule's wildcards (strings) name."""
        values = {f.name: getattr(wildcards, f.name) for f in fields(cls)}
        return cls(
            **{
                **values,
                "res": int(values["res"]),
                "epochs": int(values["epochs"]),
                "seed": int(values["seed"]),
            }
        )


# RUN_DIR as a regular expression, each {field} a named group of one path component (or less).
_RUN_DIR_RE = re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(RUN_DIR)) + "/?$")


def parse_run_dir(path: str | Path) -> Run:
    """The run a folder (relative or absolute, ending in RUN_DIR's layout) holds, read from its path."""
    match = _RUN_DIR_RE.search(Path(path).as_posix())
    if match is None:
        raise ValueError(f"{path} is not a run folder ({RUN_DIR})")
    return Run.from_wildcards(SimpleNamespace(**match.groupdict()))


def format_number(value: float | str) -> str:
    """One spelling per number, used in paths: 1e-05, 5e-06, 0.0001, 0.25, 1."""
    return f"{float(value):g}"


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
    """Run field -> the values the experiment's grid takes, the optional keys filled in from its training.

    `lr` stays as written: a list, or a mapping mode -> list.
    """
    grid = config["experiments"][name]
    training = experiment_training(config, name)
    defaults = {
        "schedules": [training.get("schedule", "linear")],
        "epochs": [training.get("epochs", 1)],
        "label_fractions": [1.0],
    }
    return {field: grid.get(key, defaults.get(key)) for key, field in GRID_KEYS.items()}


def learning_rates(lr: list | dict, mode: str, model: str) -> list[str]:
    """The learning rates of one mode and model, spelt as in paths. kNN trains nothing: its runs carry lr 0.

    `lr` is a list, or a mapping whose keys are a mode (`finetune`) or a mode and a model (`finetune:resnet18`);
    the most specific key wins, so a model trained from random weights can get a rate of its own.
    """
    if mode == "knn":
        return [format_number(0)]
    if isinstance(lr, dict):
        lr = lr.get(f"{mode}:{model}", lr.get(mode))
    return [format_number(x) for x in lr]


def expand_runs(config: dict[str, Any]) -> list[Run]:
    """Every run of the selected experiments, in a stable order (no run twice)."""
    runs: dict[Run, None] = {}
    for name in selected_experiments(config):
        values = grid_values(config, name)
        lr = values.pop("lr")
        for point in itertools.product(*values.values()):
            v = dict(zip(values, point, strict=True))
            for rate in learning_rates(lr, v["mode"], v["model"]):
                run = Run(
                    experiment=name,
                    model=v["model"],
                    res=int(v["res"]),
                    train_variant=v["train_variant"],
                    eval_variant=v["eval_variant"],
                    mode=v["mode"],
                    lr=rate,
                    schedule=v["schedule"],
                    epochs=int(v["epochs"]),
                    label_fraction=format_number(v["label_fraction"]),
                    seed=int(v["seed"]),
                )
                runs[run] = None
    return list(runs)


def varying_fields(runs: list[Run]) -> list[str]:
    """The grid dimensions (Run fields but experiment and seed) with more than one value among `runs`."""
    names = [f.name for f in fields(Run) if f.name not in ("experiment", "seed")]
    return [name for name in names if len({getattr(run, name) for run in runs}) > 1]


def figure_kinds(config: dict[str, Any], experiment: str) -> list[str]:
    """The figures an experiment's grid calls for: training curves always; the cost trade-off when resolution
    varies; a robustness heat map when the evaluation data vary; learning curves when the label fraction does."""
    vary = set(varying_fields(runs_of(config, experiment)))
    wanted = {"cost": "res", "robustness": "eval_variant", "label_efficiency": "label_fraction"}
    return ["curves", *(kind for kind, field in wanted.items() if field in vary)]


def runs_of(config: dict[str, Any], experiment: str) -> list[Run]:
    return [run for run in expand_runs(config) if run.experiment == experiment]


def run_settings(config: dict[str, Any], run: Run) -> dict[str, Any]:
    """The resolved training settings of one run: defaults, the experiment's overrides, then the grid point."""
    settings = experiment_training(config, run.experiment)
    settings.update(
        mode=run.mode,
        lr=float(run.lr),
        schedule=run.schedule,
        epochs=run.epochs,
        label_fraction=float(run.label_fraction),
        seed=run.seed,
    )
    return settings


def check_experiments(config: dict[str, Any]) -> list[str]:
    """Problems with the experiment grids (unknown models, resolutions or variants; grid settings also set in
    `training:`), as 'key: problem' lines."""
    known = {
        "models": set(config["models"]),
        "resolutions": {int(r) for r in config["resize"]["resolutions"]},
        "train_variants": set(config["degrade"]["variants"]),
        "eval_variants": set(config["degrade"]["variants"]),
    }
    where = {"models": "models", "resolutions": "resize.resolutions"}
    problems = []
    for name in selected_experiments(config):
        grid = config["experiments"][name]
        for key, allowed in known.items():
            values = {int(v) for v in grid[key]} if key == "resolutions" else set(grid[key])
            if missing := sorted(values - allowed, key=str):
                source = where.get(key, "degrade.variants")
                problems.append(f"experiments.{name}.{key}: {missing} not in {source}")
        if isinstance(grid["lr"], dict):
            problems += _check_lr_keys(name, grid, config["models"])
        for key in sorted(GRID_SETTINGS & set(grid.get("training", {}))):
            problems.append(
                f"experiments.{name}.training.{key}: set by the grid (experiments.{name}.{_grid_key(key)})"
            )
    return problems


def _check_lr_keys(name: str, grid: dict[str, Any], registry: dict[str, Any]) -> list[str]:
    """An lr mapping: a `mode:model` key names a registered model (a typo is an error; a model this grid does not
    run is not, so that an overlay can narrow a grid), and every mode and model the grid trains has rates."""
    problems = [
        f"experiments.{name}.lr.{key}: no model {key.partition(':')[2]!r} in models"
        for key in grid["lr"]
        if ":" in key and key.partition(":")[2] not in registry
    ]
    pairs = {(mode, model) for mode in grid["modes"] if mode != "knn" for model in grid["models"]}
    if missing := sorted(
        f"{m}:{n}" for m, n in pairs if f"{m}:{n}" not in grid["lr"] and m not in grid["lr"]
    ):
        problems.append(f"experiments.{name}.lr: no learning rates for {missing}")
    return problems


def _grid_key(field: str) -> str:
    return next(key for key, f in GRID_KEYS.items() if f == field)
