"""Evaluation: a run's final model scored on the val and test splits of each of its eval variants.

An evaluation job (rules `evaluate__<variants>`: one job per run) rebuilds the run's architecture, loads its
trained weights (weights.safetensors, written by rule `train`) once, predicts every image of each variant's val
and test splits from its pixels, and writes `eval/<variant>/predictions.parquet` and `metrics.json` per variant,
as one job per variant would (the same bytes: tests/test_train.py): the test scores under the plain keys, the
validation ones as `val_*` (metrics.py), with the run's training costs (train.json) and this evaluation's own
(images/s, peak GPU memory) beside them. The probes' evaluations read frozen features instead
(probes.py); both end in `metrics.write_evaluation`.
"""

from __future__ import annotations

import logging

import pandas as pd
import safetensors.torch

from dermcompress.data import cache, integrity
from dermcompress.data.loader import make_loader

from . import devices, metrics, models
from .inference import predict
from .modes import prepare_mode
from .phases import Phases
from .settings import resolve_settings

log = logging.getLogger(__name__)


def load_trained(model_name: str, model_entry: dict, settings: dict, *, weights: str, classes, resolution):
    """The run's model as trained: its architecture, the mode's structure (LoRA adapters), its weights."""
    spec = models.parse_spec(model_name, model_entry)
    model = prepare_mode(
        models.build_architecture(spec, num_classes=len(classes), resolution=resolution), settings
    )
    model.load_state_dict(safetensors.torch.load(integrity.read_bytes(weights)))
    return model


def run_evaluations(
    *,
    model_name: str,
    model_entry: dict,
    weights: str,
    train_summary: str,
    evaluations: dict[str, tuple[str, str]],
    settings: dict,
    resolution: int,
    splits: str,
) -> dict[str, dict]:
    """Score a trained run on the val and test splits of each eval variant ({variant: (cache, out_dir)}), the
    model loaded once; write predictions.parquet and metrics.json into each out_dir; return the metrics by
    variant.

    Each variant's `wall_seconds` counts the job's start-up and set-up (shared) and its own scoring and writing."""
    phases = Phases.from_process_start()
    s = resolve_settings(settings)
    device = devices.resolve_device(s["device"])
    precision = devices.resolve_precision(s["precision"], device)
    autocast = devices.autocast_for(device, precision)
    classes = _shared_classes(evaluations)
    with phases("setup"):
        model = load_trained(
            model_name, model_entry, s, weights=weights, classes=classes, resolution=resolution
        ).to(device)
        train = integrity.read_json(train_summary)
    payloads = {}
    for variant, (eval_cache, out_dir) in evaluations.items():
        # This variant's record: the shared start-up and set-up, then its own scoring and writing.
        own = phases.fork()
        log.info("eval variant %s: %s", variant, eval_cache)
        with phases("evaluate"), own("evaluate"):
            predictions = _predict_cache(
                model, eval_cache, classes, s, splits=splits, device=device, autocast=autocast
            )
        seconds = own.seconds["evaluate"]
        cost = {
            "peak_eval_mem_mb": devices.peak_mb(device),
            "eval_img_per_s": len(predictions) / seconds if seconds else None,
            "device": str(device),
            "precision": precision,
        }
        with phases("writing"), own("writing"):
            payloads[variant] = metrics.write_evaluation(
                out_dir, predictions, classes, s, train=train, cost=cost, phases=own
            )
    log.info(
        "%d eval variant(s) scored with one load of the model: %s", len(evaluations), ", ".join(evaluations)
    )
    phases.log()
    return payloads


def _shared_classes(evaluations: dict[str, tuple[str, str]]) -> list[str]:
    """The classes every eval variant's cache holds (one task: they must agree)."""
    found = {variant: list(cache.load_info(c)["classes"]) for variant, (c, _) in evaluations.items()}
    first = next(iter(found.values()))
    if differ := [v for v, classes in found.items() if classes != first]:
        raise ValueError(f"eval variants {differ} have other classes than {next(iter(found))}: {first}")
    return first


def _predict_cache(
    model, eval_cache: str, classes: list[str], s: dict, *, splits: str, device, autocast
) -> pd.DataFrame:
    """Predictions of every image of a cache's val and test splits, with their lesion groups."""
    devices.reset_peak(device)
    devices.sync(device)
    frames = []
    rows = cache.load_info(eval_cache)["rows"]
    for split in [x for x in metrics.SPLITS if x in rows]:
        loader = make_loader(
            eval_cache, split, batch_size=s["micro_batch_size"] or s["batch_size"], shuffle=False, seed=0
        )
        result = predict(model, loader, device=device, autocast=autocast)
        ids = loader.dataset.image_ids
        groups = metrics.group_ids(splits, ids, f"{eval_cache}/{split}")
        frames.append(
            metrics.predictions_frame(
                ids, result["labels"], result["probs"], classes, group_ids=groups, split=split
            )
        )
    devices.sync(device)
    return pd.concat(frames, ignore_index=True)
