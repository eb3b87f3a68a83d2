"""Evaluation: a run's final model scored on the val and test splits of one data variant.

Rule `evaluate` (one per run x eval variant) rebuilds the run's architecture, loads its trained weights
(weights.safetensors, written by rule `train`), predicts every image of the variant's val and test splits from
its pixels, and writes `eval/<variant>/predictions.parquet` and `metrics.json`: the test scores under the plain
keys, the validation ones as `val_*` (metrics.py), with the run's training costs (train.json) and this
evaluation's own (images/s, peak GPU memory) beside them. The probes' evaluations read frozen features instead
(probes.py); both end in `metrics.write_evaluation`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

from dermcompress.data import cache
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
    model.load_state_dict(load_file(weights))
    return model


def run_evaluation(
    *,
    model_name: str,
    model_entry: dict,
    weights: str,
    train_summary: str,
    eval_cache: str,
    out_dir: str,
    settings: dict,
    resolution: int,
    splits: str,
) -> dict:
    """Score a trained run on the val and test splits of `eval_cache`; write predictions.parquet and
    metrics.json into `out_dir`; return the metrics."""
    phases = Phases.from_process_start()
    s = resolve_settings(settings)
    device = devices.resolve_device(s["device"])
    precision = devices.resolve_precision(s["precision"], device)
    autocast = devices.autocast_for(device, precision)
    classes = list(cache.load_info(eval_cache)["classes"])
    with phases("setup"):
        model = load_trained(
            model_name, model_entry, s, weights=weights, classes=classes, resolution=resolution
        ).to(device)
    frames = []
    with phases("evaluate"):
        devices.reset_peak(device)
        devices.sync(device)
        for split in [x for x in metrics.SPLITS if x in cache.load_info(eval_cache)["rows"]]:
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
    predictions = pd.concat(frames, ignore_index=True)
    cost = {
        "peak_eval_mem_mb": devices.peak_mb(device),
        "eval_img_per_s": len(predictions) / phases.seconds["evaluate"]
        if phases.seconds["evaluate"]
        else None,
        "device": str(device),
        "precision": precision,
    }
    with phases("writing"):
        payload = metrics.write_evaluation(
            out_dir,
            predictions,
            classes,
            s,
            train=json.loads(Path(train_summary).read_text()),
            cost=cost,
            phases=phases,
        )
    phases.log()
    return payload
