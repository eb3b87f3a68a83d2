"""Run identity: what a run computes, where its files go, and the evaluations of it.

A run is what it computes: model, resolution, train variant, mode, hyperparameters, label fraction and seed.
Experiments only select runs (experiments.py), so two experiments that ask for the same training share one run
and it trains once. Its folder spells the identity out, and parses back (parse_run_dir):

    results/runs/<model>/<res>px/<train variant>/<mode>/<hparams>/labels<fraction>/seed<seed>/
        config.json  history.csv  train.json       what the training used, its curve, its cost
        weights.safetensors                        finetune, freeze_blocks, lora (temporary by default)
        head.safetensors  probe.csv                linear: the chosen head, and every head's validation score
        eval/<eval variant>/metrics.json           one evaluation of the run: val and test scores, costs
        eval/<eval variant>/predictions.parquet    ... and the predictions they are computed from

`hparams` is `lr<lr>_<schedule>_<epochs>ep` for the modes that train through the backbone, `probe` for a linear
probe (it sweeps its own learning rates, training.probe) and `knn`; with a suffix `_<8 hex digits>` when the
run's identity settings (IDENTITY) differ from the `training:` section, a hash of the difference. Settings that
change no weight (logging, evaluation cadence, checkpoints, bootstrap resamples) are not part of a run's
identity: an experiment that logs more often shares the run of one that does not.

Frozen features are keyed by what they depend on (FEATURES): model, resolution, variant, split and, for a
backbone that is not pretrained (its random weights depend on the seed), the seed.

Jobs: one process per run evaluates it on all its eval variants (evaluation_jobs), and one per backbone input
(model, resolution, variant, init: FEATURES_DIR) writes the features of every split the probes read
(feature_jobs). Their outputs are the per-variant and per-split files above; a Snakemake rule's outputs are
fixed, so the workflow has one rule per set of variants (or splits), each naming its jobs (jobs_by_set).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RUN_DIR = "results/runs/{model}/{res}px/{train_variant}/{mode}/{hparams}/labels{label_fraction}/seed{seed}"
EVAL_DIR = RUN_DIR + "/eval/{eval_variant}"
CHECKPOINT_DIR = RUN_DIR.replace("results/runs/", "results/checkpoints/", 1)
FEATURES_DIR = "results/features/{model}/{res}px/{variant}/{init}"
FEATURES = FEATURES_DIR + "/{split}.parquet"
PRETRAINED_INIT = "pretrained"
# The files a run or an evaluation writes (lineage maps them to their folder).
RUN_FILES = (
    "config.json",
    "history.csv",
    "train.json",
    "weights.safetensors",
    "head.safetensors",
    "probe.csv",
    "metrics.json",
    "predictions.parquet",
)

# history.csv: a row per logging step (train_loss, grad_norm) and per validation (eval_loss, eval_accuracy).
HISTORY_COLUMNS = ("step", "epoch", "lr", "train_loss", "grad_norm", "eval_loss", "eval_accuracy")

# Outputs deleted once read (Snakemake temp), unless training.keep_weights: their records outlive them.
TEMPORARY_FILES = ("weights.safetensors",)

TRAINED_MODES = ("finetune", "freeze_blocks", "lora")  # through the backbone, from pixels
PROBE_MODES = ("linear", "knn")  # on frozen features
MODES = (*TRAINED_MODES, *PROBE_MODES)

# The settings of `training:` that change what a run of each mode computes (lr, schedule, epochs, label
# fraction and seed are in the path itself).
_THROUGH_BACKBONE = (
    "batch_size",
    "micro_batch_size",
    "weight_decay",
    "max_grad_norm",
    "augment",
    "warmup_ratio",
    "min_lr_ratio",
    "precision",
    "device",
)
IDENTITY = {
    "finetune": _THROUGH_BACKBONE,
    "freeze_blocks": (*_THROUGH_BACKBONE, "freeze_blocks"),
    "lora": (*_THROUGH_BACKBONE, "lora"),
    "linear": ("probe", "precision", "device"),
    "knn": ("knn", "precision", "device"),
}

_HPARAMS_RE = re.compile(
    r"^(?:lr(?P<lr>[0-9.e+-]+)_(?P<schedule>linear|cosine)_(?P<epochs>\d+)ep|probe|knn)(?:_(?P<tag>[0-9a-f]{8}))?$"
)


@dataclass(frozen=True)
class Run:
    """One training (or, for kNN, one feature bank). lr, schedule and epochs are empty for the probe modes."""

    model: str
    res: int
    train_variant: str
    mode: str
    lr: str = ""
    schedule: str = ""
    epochs: int = 0
    tag: str = ""
    label_fraction: str = "1"
    seed: int = 0

    @property
    def hparams(self) -> str:
        trained = self.mode in TRAINED_MODES
        base = f"lr{self.lr}_{self.schedule}_{self.epochs}ep" if trained else _probe(self.mode)
        return f"{base}_{self.tag}" if self.tag else base

    @property
    def run_dir(self) -> str:
        return RUN_DIR.format(**self.wildcards())

    def wildcards(self) -> dict[str, Any]:
        """The values of RUN_DIR's wildcards."""
        return {
            "model": self.model,
            "res": self.res,
            "train_variant": self.train_variant,
            "mode": self.mode,
            "hparams": self.hparams,
            "label_fraction": self.label_fraction,
            "seed": self.seed,
        }

    @classmethod
    def from_wildcards(cls, wildcards: Any) -> Run:
        """The run a rule's wildcards (strings: RUN_DIR's) name."""
        mode, hparams = str(wildcards.mode), str(wildcards.hparams)
        match = _HPARAMS_RE.match(hparams)
        trained = mode in TRAINED_MODES
        if (
            match is None
            or trained != bool(match["lr"])
            or not hparams.startswith("lr" if trained else _probe(mode))
        ):
            raise ValueError(f"{hparams!r} does not name the hyperparameters of a {mode} run")
        return cls(
            model=str(wildcards.model),
            res=int(wildcards.res),
            train_variant=str(wildcards.train_variant),
            mode=mode,
            lr=match["lr"] or "",
            schedule=match["schedule"] or "",
            epochs=int(match["epochs"] or 0),
            tag=match["tag"] or "",
            label_fraction=str(wildcards.label_fraction),
            seed=int(wildcards.seed),
        )

    def features(self, variant: str, split: str, *, pretrained: bool) -> str:
        """The frozen features of this run's backbone on one split of a variant."""
        return FEATURES.format(**self.features_key(variant, pretrained=pretrained), split=split)

    def features_key(self, variant: str, *, pretrained: bool) -> dict[str, Any]:
        """FEATURES_DIR's values for this run's backbone on a variant: what a features job computes."""
        init = PRETRAINED_INIT if pretrained else f"seed{self.seed}"
        return {"model": self.model, "res": self.res, "variant": variant, "init": init}

    def probe_features(self, eval_variant: str, *, pretrained: bool) -> dict[str, str]:
        """The features a probe run reads, by role: its training variant's train and val splits (a linear head's
        training and learning-rate choice; kNN's bank and choice of k) and the eval variant's val and test."""
        own = {
            split: self.features(self.train_variant, split, pretrained=pretrained)
            for split in ("train", "val")
        }
        scored = {f"eval_{s}": self.features(eval_variant, s, pretrained=pretrained) for s in ("val", "test")}
        return own | scored


def is_pretrained(entry: dict[str, Any]) -> bool:
    """Whether a model's registry entry loads pretrained weights (the default) or starts from random ones, whose
    draw depends on the seed (so its features are keyed by seed)."""
    return bool(entry.get("pretrained", True))


def init_seed(init: str) -> int:
    """The seed a backbone is built from, from the {init} part of a features path (Run.features): 0 for a
    pretrained one, its own for a random-init one."""
    return 0 if init == PRETRAINED_INIT else int(init.removeprefix("seed"))


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of a run: its final model scored on the val and test splits of one variant."""

    run: Run
    eval_variant: str

    @property
    def eval_dir(self) -> str:
        return f"{self.run.run_dir}/eval/{self.eval_variant}"

    def point(self) -> dict[str, Any]:
        """The grid point as table columns: the run's fields and the eval variant."""
        return {**asdict(self.run), "eval_variant": self.eval_variant}


def evaluation_jobs(evaluations: Iterable[Evaluation], variants: Sequence[str]) -> dict[Run, tuple[str, ...]]:
    """Each run once, with the eval variants its one evaluation job scores (in `variants`' order: the config's)."""
    wanted: dict[Run, set[str]] = {}
    for e in evaluations:
        wanted.setdefault(e.run, set()).add(e.eval_variant)
    return {run: tuple(v for v in variants if v in evs) for run, evs in wanted.items()}


def feature_jobs(
    evaluations: Iterable[Evaluation],
    registry: dict[str, Any],
    splits: Sequence[str] = ("train", "val", "test"),
) -> dict[str, tuple[str, ...]]:
    """Each backbone input (FEATURES_DIR) the probe runs read once, with the splits its one features job writes."""
    wanted: dict[str, set[str]] = {}
    for e in evaluations:
        if e.run.mode not in PROBE_MODES:
            continue
        for path in e.run.probe_features(
            e.eval_variant, pretrained=is_pretrained(registry[e.run.model])
        ).values():
            folder, split = path.rsplit("/", 1)
            wanted.setdefault(folder, set()).add(split.removesuffix(".parquet"))
    return {folder: tuple(s for s in splits if s in found) for folder, found in wanted.items()}


def jobs_by_set(jobs: dict[Any, tuple[str, ...]]) -> dict[tuple[str, ...], list[Any]]:
    """The jobs of evaluation_jobs or feature_jobs grouped by what they write (a set of variants or splits)."""
    grouped: dict[tuple[str, ...], list[Any]] = {}
    for job, written in jobs.items():
        grouped.setdefault(written, []).append(job)
    return grouped


def _probe(mode: str) -> str:
    """The hparams stem of a probe mode: a linear probe sweeps its learning rates itself."""
    return "probe" if mode == "linear" else mode


def _pattern(template: str) -> re.Pattern:
    """A path template as a regular expression, each {field} a named group of one path component (or less)."""
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "/?$")


_RUN_DIR_RE, _EVAL_DIR_RE, _FEATURES_DIR_RE = _pattern(RUN_DIR), _pattern(EVAL_DIR), _pattern(FEATURES_DIR)


class _Wildcards:
    def __init__(self, values: dict[str, str]) -> None:
        self.__dict__.update(values)


def parse_run_dir(path: str | Path) -> Run:
    """The run a folder (relative or absolute, ending in RUN_DIR's layout) holds, read from its path."""
    match = _RUN_DIR_RE.search(Path(path).as_posix())
    if match is None:
        raise ValueError(f"{path} is not a run folder ({RUN_DIR})")
    return Run.from_wildcards(_Wildcards(match.groupdict()))


def parse_eval_dir(path: str | Path) -> Evaluation:
    """The evaluation a folder (ending in EVAL_DIR's layout) holds, read from its path."""
    match = _EVAL_DIR_RE.search(Path(path).as_posix())
    if match is None:
        raise ValueError(f"{path} is not an evaluation folder ({EVAL_DIR})")
    values = match.groupdict()
    return Evaluation(Run.from_wildcards(_Wildcards(values)), values["eval_variant"])


def parse_features_dir(path: str | Path) -> dict[str, Any]:
    """FEATURES_DIR's values (model, res, variant, init) read from a features folder's path."""
    match = _FEATURES_DIR_RE.search(Path(path).as_posix())
    if match is None:
        raise ValueError(f"{path} is not a features folder ({FEATURES_DIR})")
    return {**match.groupdict(), "res": int(match["res"])}


def identity_tag(settings: dict[str, Any], defaults: dict[str, Any], mode: str) -> str:
    """'' when the run's identity settings are the training section's; else 8 hex digits of their difference."""
    differ = {k: settings.get(k) for k in IDENTITY[mode] if settings.get(k) != defaults.get(k)}
    if not differ:
        return ""
    return hashlib.sha256(json.dumps(differ, sort_keys=True, default=str).encode()).hexdigest()[:8]
