"""Experiment grids: which training runs the config asks for, where their outputs go, and their settings.

A run is one model x resolution x train variant x eval variant x mode x learning rate x seed of a named
experiment; its folder under results/runs/ spells those out, so a path says what produced it.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import asdict, dataclass
from typing import Any

RUN_DIR = "results/runs/{experiment}/{model}/{res}px/{train_variant}__{eval_variant}/{mode}/lr{lr}/seed{seed}"
CHECKPOINT_DIR = RUN_DIR.replace("results/runs/", "results/checkpoints/", 1)
RUN_FILES = ("metrics.json", "predictions.parquet", "history.csv", "config.json")
GRID_KEYS = ("models", "resolutions", "train_variants", "eval_variants", "modes", "lr", "seeds")


@dataclass(frozen=True)
class Run:
    experiment: str
    model: str
    res: int
    train_variant: str
    eval_variant: str
    mode: str
    lr: str
    seed: int

    @property
    def run_dir(self) -> str:
        return RUN_DIR.format(**asdict(self))


def format_lr(lr: float | str) -> str:
    """One spelling per learning rate, used in paths: 1e-05, 5e-06, 0.0001."""
    return f"{float(lr):g}"


def selected_experiments(config: dict[str, Any]) -> list[str]:
    chosen = config.get("run_experiments", "all")
    names = list(config["experiments"]) if chosen == "all" else list(chosen)
    unknown = [n for n in names if n not in config["experiments"]]
    if unknown:
        raise ValueError(f"config key 'run_experiments': unknown experiments {unknown}")
    return names


def expand_runs(config: dict[str, Any]) -> list[Run]:
    """Every run of the selected experiments, in a stable order."""
    runs = []
    for name in selected_experiments(config):
        grid = config["experiments"][name]
        for model, res, train_v, eval_v, mode, lr, seed in itertools.product(*(grid[k] for k in GRID_KEYS)):
            runs.append(Run(name, model, int(res), train_v, eval_v, mode, format_lr(lr), int(seed)))
    return runs


def run_settings(
    config: dict[str, Any], experiment: str, mode: str, lr: str, seed: int | str
) -> dict[str, Any]:
    """The resolved training settings of one run: defaults, the experiment's overrides, then the grid point."""
    settings = copy.deepcopy(config["training"])
    for key, value in config["experiments"][experiment].get("training", {}).items():
        if isinstance(value, dict):
            settings[key] = {**settings.get(key, {}), **value}
        else:
            settings[key] = value
    settings.update(mode=mode, lr=float(lr), seed=int(seed))
    return settings


def check_experiments(config: dict[str, Any]) -> list[str]:
    """Problems with the experiment grids (unknown models, resolutions or variants), as 'key: problem' lines."""
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
    return problems
