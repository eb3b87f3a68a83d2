"""Experiment grids, label-fraction subsampling, tables and figures, on small hand-made inputs."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO

from dermcompress.data.loader import CacheDataset
from dermcompress.data.subsample import grouped_subsample
from dermcompress.learn import runs as runs_module
from dermcompress.learn.runs import Evaluation, Run
from dermcompress.study import aggregate, experiments, figure_jobs, figures, tables


def study_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


# ------------------------------------------------------------------------------------------- experiments


def evaluations_of(config: dict) -> dict[str, list[Evaluation]]:
    return experiments.expand(config)[1]


def test_study_grids_are_the_papers():
    by = {name: [e.point() for e in evals] for name, evals in evaluations_of(study_config()).items()}
    table1 = by["resolution_sweep"]
    assert {(p["model"], p["res"]) for p in table1} == {
        (m, res) for m in ("vit_b16", "dinov2_b14", "simclr_r50") for res in (224, 112, 56)
    }
    assert {(p["lr"], p["schedule"], p["epochs"], p["mode"]) for p in table1} == {
        ("1e-05", "linear", 3, "finetune")
    }
    assert {(p["res"], p["lr"]) for p in by["vit_lr_sweep"]} == {
        (res, lr) for res in (224, 112, 56) for lr in ("0.0001", "5e-05", "1e-05")
    }
    assert {(p["schedule"], p["epochs"]) for p in by["vit_lr_sweep"] + by["dinov2_lr_sweep"]} == {
        ("cosine", 6)
    }
    assert {(p["model"], p["res"], p["lr"]) for p in by["dinov2_lr_sweep"]} == {
        ("dinov2_b14", 224, lr) for lr in ("1e-05", "5e-06", "1e-06")
    }
    assert {p["label_fraction"] for p in by["label_efficiency"]} == {"0.01", "0.1", "0.25", "0.5", "1"}
    assert {(p["train_variant"], p["eval_variant"]) for p in by["robustness"]} == {
        (t, e) for t in ("clean", "degraded") for e in ("clean", "jpeg_only", "blur_only", "quantize_only")
    }
    assert {p["mode"] for p in by["frozen_vs_finetuned"]} == {"linear", "knn", "finetune"}
    for name, points in by.items():
        seeds = {p["seed"] for p in points if p["mode"] != "knn"}
        assert seeds == {0, 1, 2, 3, 4}, name


def test_one_domain_pretraining_experiment_runs_what_the_two_per_backbone_did():
    """domain_pretraining pairs both backbones by name in one grid (reference.model a mapping; DINOv2's
    finetuning lr by its most specific key): the same runs and evaluations as the two experiments it replaced,
    one per backbone pair, each with its own lr; none added, none dropped."""
    config = study_config()
    merged = config["experiments"]["domain_pretraining"]
    split = copy.deepcopy(config)
    common = {k: v for k, v in merged.items() if k not in ("models", "lr", "reference", "description")}
    split["experiments"]["domain_pretraining"] = {
        **common,
        "models": ["vit_b16", "vit_b16_derm"],
        "lr": {"finetune": [1.0e-5]},
        "reference": {"model": "vit_b16"},
    }
    split["experiments"]["domain_pretraining_dinov2"] = {
        **common,
        "models": ["dinov2_b14_timm", "dinov2_b14_derm"],
        "lr": {"finetune": [5.0e-6]},
        "reference": {"model": "dinov2_b14_timm"},
    }
    runs, evaluations = experiments.expand(config)
    split_runs, split_evaluations = experiments.expand(split)
    assert set(runs) == set(split_runs) and len(runs) == len(split_runs)
    both = split_evaluations["domain_pretraining"] + split_evaluations["domain_pretraining_dinov2"]
    assert set(evaluations["domain_pretraining"]) == set(both) and len(
        evaluations["domain_pretraining"]
    ) == len(both)
    assert {(e.run.model, e.run.lr) for e in both if e.run.mode == "finetune"} == {
        ("vit_b16", "1e-05"),
        ("vit_b16_derm", "1e-05"),
        ("dinov2_b14_timm", "5e-06"),
        ("dinov2_b14_derm", "5e-06"),
    }


def test_each_distinct_training_runs_once_however_many_experiments_ask():
    """The study: 340 distinct finetunes (235 before the domain pretraining experiments, 125 before
    compression_sweep, not 205 jobs): the robustness grid trains each model once and evaluates it four times; a
    frozen_vs_finetuned finetune is a vit_lr_sweep or dinov2_lr_sweep point; domain_pretraining's ViT-B/16 at
    100% of the labels is frozen_vs_finetuned's."""
    config = study_config()
    runs, evaluations = experiments.expand(config)
    finetunes = [r for r in runs if r.mode == "finetune"]
    assert len(finetunes) == 340 and len(set(finetunes)) == 340
    # The domain pretraining experiments add 105, 5 seeds each at 224 px: domain_pretraining 95 (vit_b16 at 4
    # label fractions below 1, vit_b16_derm, dinov2_b14_timm and dinov2_b14_derm at 5), compression_aware 10
    # (vit_b16_derm and vit_b16_derm_codecs trained clean).
    new = {"domain_pretraining": 95, "compression_aware": 10}
    before = {e.run for name, evs in evaluations.items() if name not in new for e in evs}
    for name, count in new.items():
        added = {e.run for e in evaluations[name] if e.run.mode == "finetune"} - before
        assert len(added) == count, name
        before |= added
    # compression_sweep adds 110: 2 models x 3 resolutions x 5 seeds trained clean (the ViT's 224 and 56 px
    # ones are robustness's), and 2 x 3 x 5 for each of 3 codecs trained and evaluated on alone.
    sweep_runs = {e.run for e in evaluations["compression_sweep"]}
    assert len(sweep_runs) == 30 + 90
    shared = sweep_runs & {e.run for e in evaluations["robustness"]}
    assert len(shared) == 2 * 5 and {r.train_variant for r in shared} == {"clean"}
    for e in evaluations["compression_sweep"]:
        assert e.run.train_variant == "clean" or e.eval_variant == e.run.train_variant
    assert len(evaluations["compression_sweep"]) == 30 * 14 + 90
    robust = evaluations["robustness"]
    assert len(robust) == 2 * 2 * 4 * 5 and len({e.run for e in robust}) == 2 * 2 * 5
    frozen = {
        e.run
        for e in evaluations["frozen_vs_finetuned"]
        if e.run.model == "vit_b16" and e.run.mode == "finetune"
    }
    sweep = {e.run for e in evaluations["vit_lr_sweep"]}
    assert frozen and frozen <= sweep
    # kNN on all labels of a pretrained backbone cannot depend on the seed: one run; on random weights, five.
    knn = {(e.run.model, e.run.seed) for e in evaluations["frozen_vs_finetuned"] if e.run.mode == "knn"}
    assert knn == {
        ("vit_b16", 0),
        ("dinov2_b14", 0),
        ("simclr_r50", 0),
        *(("resnet18_scratch", s) for s in range(5)),
    }
    # label_efficiency's 100% probes are frozen_vs_finetuned's.
    full = {e.run for e in evaluations["label_efficiency"] if e.run.label_fraction == "1"}
    assert full <= {e.run for e in evaluations["frozen_vs_finetuned"]}


def test_distinct_runs_get_distinct_folders_and_paths_parse_back():
    runs, evaluations = experiments.expand(study_config())
    assert len({r.run_dir for r in runs}) == len(runs)
    for run in runs:
        assert runs_module.parse_run_dir(run.run_dir) == run
        assert runs_module.parse_run_dir(f"/somewhere/else/{run.run_dir}/") == run
    for evaluation in {e for evals in evaluations.values() for e in evals}:
        assert runs_module.parse_eval_dir(evaluation.eval_dir) == evaluation
    with pytest.raises(ValueError, match="not a run folder"):
        runs_module.parse_run_dir("results/runs/x/y")
    with pytest.raises(ValueError, match="hyperparameters"):
        runs_module.parse_run_dir("results/runs/m/56px/clean/finetune/probe/labels1/seed0")


def test_identity_leaves_out_what_does_not_change_the_weights():
    """An experiment that only logs or validates more often shares its runs; one that changes the weight
    decay gets runs of its own (a tag in the path); a probe ignores settings of the modes that train."""
    config = study_config()
    grid = {
        "models": ["vit_b16"],
        "resolutions": [224],
        "train_variants": ["clean"],
        "eval_variants": ["clean"],
        "modes": ["finetune", "linear"],
        "lr": {"finetune": [1e-4]},
        "seeds": [0],
    }
    config["experiments"] = {
        "plain": grid,
        "chatty": {**grid, "training": {"log_every": 5, "eval_every_epochs": 2}},
        "decayed": {**grid, "training": {"weight_decay": 0.1}},
    }
    config["run_experiments"] = "all"
    runs, evaluations = experiments.expand(config)
    plain, chatty, decayed = ({e.run for e in evaluations[n]} for n in ("plain", "chatty", "decayed"))
    assert plain == chatty and len(runs) == 3
    (tagged,) = {r for r in decayed if r.mode == "finetune"}
    assert re.fullmatch(r"[0-9a-f]{8}", tagged.tag) and tagged.hparams == f"lr0.0001_linear_3ep_{tagged.tag}"
    assert {r for r in decayed if r.mode == "linear"} <= plain  # weight decay: not a probe's
    assert (
        runs[next(r for r in plain if r.mode == "finetune")]["log_every"] == config["training"]["log_every"]
    )


def test_epochs_schedules_and_label_fractions_are_grid_dimensions_with_defaults():
    config = study_config()
    grid = {
        "models": ["vit_b16"],
        "resolutions": [224],
        "train_variants": ["clean"],
        "eval_variants": ["clean"],
        "modes": ["finetune", "knn"],
        "lr": [1e-4, 1e-5],
        "seeds": [0],
    }
    config["experiments"] = {
        "plain": grid,
        "wide": {**grid, "epochs": [2, 4], "schedules": ["linear", "cosine"], "label_fractions": [0.5, 1]},
    }
    config["run_experiments"] = "all"
    runs, evaluations = experiments.expand(config)
    plain = [e.run for e in evaluations["plain"]]
    # Defaults from the training section; kNN takes no learning rate, schedule or epochs.
    assert sorted((r.mode, r.lr, r.schedule, r.epochs, r.label_fraction) for r in plain) == [
        ("finetune", "0.0001", "linear", 3, "1"),
        ("finetune", "1e-05", "linear", 3, "1"),
        ("knn", "", "", 0, "1"),
    ]
    wide = [e.run for e in evaluations["wide"]]
    assert len(wide) == 2 * 2 * 2 * 2 + 2  # finetune: lr x epochs x schedules x fractions; kNN: fractions
    settings = runs[wide[0]]
    assert {k: settings[k] for k in ("epochs", "schedule", "label_fraction", "lr", "seed")} == {
        "epochs": 2,
        "schedule": "linear",
        "label_fraction": 0.5,
        "lr": 1e-4,
        "seed": 0,
    }
    assert experiments.figure_kinds(evaluations["plain"]) == ["curves", "forest", "reliability", "subgroups"]
    assert experiments.figure_kinds(evaluations["wide"]) == [
        "curves",
        "label_efficiency",
        "forest",
        "reliability",
        "subgroups",
    ]


def test_lr_per_mode_and_model_and_conflicting_overrides_are_reported():
    """lr keyed by mode, or by mode:model (the most specific key wins): the from-scratch ResNet-18 finetunes at
    a rate that suits random weights, the pretrained models at the study's."""
    config = study_config()
    grid = copy.deepcopy(config["experiments"]["frozen_vs_finetuned"])
    runs = [e.run for e in evaluations_of(config)["frozen_vs_finetuned"]]
    rates = {(r.mode, r.model, r.lr) for r in runs}
    assert {(mode, lr) for mode, _, lr in rates} == {
        ("linear", ""),
        ("finetune", "1e-05"),
        ("finetune", "0.001"),
        ("knn", ""),
    }
    assert {model for mode, model, lr in rates if (mode, lr) == ("finetune", "0.001")} == {"resnet18_scratch"}
    assert {lr for mode, model, lr in rates if model == "resnet18_scratch"} == {"0.001", ""}
    assert experiments.check_experiments(config) == []
    config["experiments"]["frozen_vs_finetuned"] = {
        **grid,
        "lr": {
            "freeze_blocks": [1e-5],
            "finetune:vit_b16": [1e-3],
            "finetune:nope": [1e-3],
            "linear": [1e-3],
        },
        "modes": ["finetune", "freeze_blocks", "linear"],
        "training": {"epochs": 2},
    }
    problems = experiments.check_experiments(config)
    missing = next(p for p in problems if "no learning rates for" in p)
    assert (
        "'finetune:dinov2_b14'" in missing and "finetune:vit_b16" not in missing and "freeze" not in missing
    )
    assert any(
        p.startswith("experiments.frozen_vs_finetuned.lr.linear: linear takes no learning rate")
        for p in problems
    )
    assert "experiments.frozen_vs_finetuned.lr.finetune:nope: no model 'nope' in models" in problems
    # A key for a model the grid does not run is no error: an overlay may narrow the grid.
    config["experiments"]["frozen_vs_finetuned"] = {**grid, "models": ["vit_b16"]}
    assert experiments.check_experiments(config) == []
    assert any(
        p.startswith("experiments.frozen_vs_finetuned.training.epochs: set by the grid") for p in problems
    )


# ---------------------------------------------------------------------------------------- label fraction


def _train_rows(n_groups: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        label = "MEL" if g % 3 == 0 else "NV"  # imbalanced on purpose
        for i in range(int(rng.integers(1, 4))):
            rows.append({"image_id": f"img_{g}_{i}", "group_id": f"g{g:03d}", "label": label})
    return pd.DataFrame(rows)


def test_grouped_subsample_takes_whole_groups_per_class_nested_and_seeded():
    rows = _train_rows()
    sizes = rows.groupby("group_id").size()
    previous: set[str] = set()
    for fraction in (0.01, 0.1, 0.25, 0.5):
        chosen = grouped_subsample(rows, fraction, seed=7)
        # Whole groups only.
        assert (chosen.groupby("group_id").size() == sizes[chosen["group_id"].unique()]).all()
        # Every class present, each close to the fraction (a group at most over).
        for label, part in rows.groupby("label"):
            taken = (chosen["label"] == label).sum()
            assert max(1, round(fraction * len(part))) <= taken < max(1, round(fraction * len(part))) + 3
        # Nested: a larger fraction keeps everything a smaller one took.
        assert previous <= set(chosen["image_id"])
        previous = set(chosen["image_id"])
    shuffled = rows.sample(frac=1, random_state=1)
    assert set(grouped_subsample(shuffled, 0.25, seed=7)["image_id"]) == set(
        grouped_subsample(rows, 0.25, seed=7)["image_id"]
    )
    assert set(grouped_subsample(rows, 0.25, seed=8)["image_id"]) != previous
    assert grouped_subsample(rows, 1.0, seed=0) is rows
    with pytest.raises(ValueError, match="label fraction"):
        grouped_subsample(rows, 0.0, seed=0)


def test_cache_dataset_keeps_only_requested_images(tmp_path):
    from dermcompress.data.cache_write import run_cache
    from dermcompress.data.pixeltable import write_pixel_table

    ids = [f"ISIC_{i:07d}" for i in range(12)]
    meta = pd.DataFrame(
        {
            "image_id": ids,
            "label": ["MEL", "NV"] * 6,
            "split": ["train"] * 12,
            "degradation": ["none"] * 12,
            "degradation_params": ["{}"] * 12,
        }
    )
    pixels = np.arange(12, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), dtype=np.uint8)
    table = tmp_path / "degraded.parquet"
    write_pixel_table(table, meta, pixels)
    run_cache(
        degraded=table, out_dir=tmp_path / "cache", classes=["MEL", "NV"], rows_per_shard=5, row_group_size=2
    )
    subset = CacheDataset(tmp_path / "cache", "train", image_ids=[ids[3], ids[0], ids[7]])
    assert subset.image_ids == [ids[0], ids[3], ids[7]]
    assert subset.pixels[:, 0, 0, 0].tolist() == [0, 3, 7]
    assert subset.labels.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="not in"):
        CacheDataset(tmp_path / "cache", "train", image_ids=["ISIC_missing"])


# ------------------------------------------------------------------------------------- tables, figures


def fake_runs(root: Path, points: list[dict], seeds=(0, 1), val_auc=None) -> list[str]:
    """Evaluation folders with a metrics.json each, their runs' folders with a history.csv (kNN: none);
    accuracy from the grid point, so rows differ; validation AUC too, or `val_auc[i]` for point i."""
    base = {
        "model": "m",
        "res": 64,
        "train_variant": "clean",
        "mode": "finetune",
        "lr": "0.001",
        "schedule": "cosine",
        "epochs": 2,
        "label_fraction": "1",
    }
    dirs = []
    for i, point in enumerate(points):
        for seed in seeds:
            fields = {**base, **point, "seed": seed}
            if fields["mode"] == "knn":
                fields.update(lr="", schedule="", epochs=0)
            eval_variant = fields.pop("eval_variant", "clean")
            evaluation = Evaluation(Run(**fields), eval_variant)
            folder = root / evaluation.eval_dir
            folder.mkdir(parents=True)
            accuracy = 0.6 + 0.05 * i + 0.01 * seed
            metrics = {
                "accuracy": accuracy,
                "f1_macro": accuracy - 0.01,
                "auc": accuracy + 0.1,
                "balanced_accuracy": accuracy,
                "val_accuracy": accuracy - 0.02,
                "val_auc": (accuracy + 0.05) if val_auc is None else val_auc[i] + 0.01 * seed,
                "val_balanced_accuracy": accuracy - 0.02,
                "gmacs": 0.1 * evaluation.run.res / 64,
                "params_m": 5.0,
                "peak_train_mem_mb": None,
                "peak_eval_mem_mb": None,
            }
            (folder / "metrics.json").write_text(json.dumps(metrics))
            history = pd.DataFrame(
                {
                    "step": [1, 2, 2, 3, 4, 4],
                    "epoch": [0.5, 1.0, 1.0, 1.5, 2.0, 2.0],
                    "lr": [1e-3, 1e-3, None, 5e-4, 5e-4, None],
                    "train_loss": [0.7, 0.6, None, 0.5, 0.45, None],
                    "eval_loss": [None, None, 0.65, None, None, 0.55],
                    "eval_accuracy": [None, None, 0.6, None, None, accuracy],
                }
            )
            if evaluation.run.mode != "knn":
                history.to_csv(root / evaluation.run.run_dir / "history.csv", index=False)
            dirs.append(str(folder))
    return dirs


def test_table_rows_are_means_and_stds_over_seeds_with_their_runs(tmp_path):
    dirs = fake_runs(
        tmp_path, [{"res": 64}, {"res": 32}, {"model": "n", "res": 64}, {"model": "n", "res": 32}]
    )
    out = {ext: str(tmp_path / f"t.{ext}") for ext in ("csv", "md", "tex", "html")}
    table = tables.run_table(metrics=[f"{d}/metrics.json" for d in dirs], title="A sweep", label="exp", **out)
    assert list(table[["model", "res"]].itertuples(index=False, name=None)) == [
        ("m", 64),
        ("m", 32),
        ("n", 64),
        ("n", 32),
    ]
    csv = pd.read_csv(out["csv"])
    for row in csv.itertuples():
        runs = row.runs.split(aggregate.RUNS_SEPARATOR)
        assert len(runs) == row.n_runs == 2
        values = [json.loads((Path(r) / "metrics.json").read_text())["accuracy"] for r in runs]
        assert row.accuracy_mean == pytest.approx(np.mean(values))
        assert row.accuracy_std == pytest.approx(np.std(values, ddof=1))
        assert {runs_module.parse_eval_dir(r).run.res for r in runs} == {row.res}
    md = Path(out["md"]).read_text()
    assert "A sweep" in md and "0.605 ± 0.007" in md and aggregate.CPU_NOTE in md
    header = md.splitlines()[2]
    assert "|   n |" in header and "Val AUC" in header and "| AUC " in header and "Val-selected" not in header
    assert not csv[aggregate.SELECTED].any()  # nothing swept: nothing to choose
    assert r"\caption{A sweep." in Path(out["tex"]).read_text()
    assert "<table" in Path(out["html"]).read_text()


def test_a_sweep_marks_the_setting_best_on_validation_never_on_test(tmp_path):
    """Among rows that differ only in lr, the one with the best mean validation AUC is marked, per resolution,
    although another lr has the best test AUC; a tie on validation AUC goes to validation balanced accuracy."""
    points = [{"res": 64, "lr": lr} for lr in ("0.01", "0.001", "0.0001")]
    points += [{"res": 32, "lr": lr} for lr in ("0.01", "0.001", "0.0001")]
    # Test accuracy (and AUC) rise with the point's index: the last lr of each resolution is best on test.
    dirs = fake_runs(tmp_path, points, val_auc=[0.70, 0.90, 0.80, 0.85, 0.85, 0.60])
    out = {ext: str(tmp_path / f"t.{ext}") for ext in ("csv", "md", "tex", "html")}
    table = tables.run_table(metrics=[f"{d}/metrics.json" for d in dirs], title="lr", label="lr", **out)
    chosen = table.loc[table[aggregate.SELECTED], ["res", "lr"]]
    # 64 px: best val AUC at 0.001. 32 px: 0.01 and 0.001 tie on val AUC; 0.001 has the higher val bal. acc.
    assert list(chosen.itertuples(index=False, name=None)) == [(64, "0.001"), (32, "0.001")]
    best_on_test = table.loc[table.groupby("res")["auc_mean"].idxmax(), "lr"]
    assert set(best_on_test) == {"0.0001"}
    md = Path(out["md"]).read_text()
    assert "Val-selected" in md and md.count(tables.SELECTED_MARK) == 3  # two rows and the note
    assert pd.read_csv(out["csv"])[aggregate.SELECTED].sum() == 2


@pytest.mark.parametrize(
    ("kind", "points"),
    [
        (
            "curves",
            [{"res": 64}, {"res": 32}, {"model": "n", "res": 64}, {"model": "n", "mode": "knn"}],
        ),
        ("cost", [{"res": 64}, {"res": 32}, {"model": "n", "res": 64}]),
        (
            "robustness",
            [{"eval_variant": "clean"}, {"eval_variant": "jpeg_only"}, {"train_variant": "degraded"}],
        ),
        ("label_efficiency", [{"label_fraction": "0.1"}, {"label_fraction": "0.5"}, {"label_fraction": "1"}]),
    ],
)
@pytest.mark.parametrize("seeds", [(0, 1), (0,)])
def test_every_figure_kind_draws_a_png(tmp_path, kind, points, seeds):
    dirs = fake_runs(tmp_path, points, seeds=seeds)
    out = tmp_path / f"{kind}.png"
    figures.run_figure(kind=kind, metrics=[f"{d}/metrics.json" for d in dirs], title="t", out=str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_figures_job_draws_each_kind_it_is_given_and_refuses_an_unknown_one(tmp_path):
    """An experiment's figures come from one job (figure_jobs.draw_figures): each kind to its own PNG, from the
    inputs that kind reads; an unknown kind is named before anything is drawn."""
    dirs = fake_runs(tmp_path, [{"res": 64}, {"res": 32}, {"model": "n", "res": 64}], seeds=(0, 1))
    kinds = ["curves", "cost"]
    outputs = {kind: str(tmp_path / f"{kind}.png") for kind in kinds}
    figure_jobs.draw_figures(
        kinds=kinds,
        outputs=outputs,
        title="t",
        classes=["MEL", "NV"],
        metrics=[f"{d}/metrics.json" for d in dirs],
    )
    for kind in kinds:
        assert Path(outputs[kind]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", kind
    assert figure_jobs.inputs(["forest", "curves", "reliability"]) == [
        "metrics",
        "histories",
        "table",
        "predictions",
    ]
    with pytest.raises(ValueError, match=r"unknown figure kinds \['heat'\]"):
        figure_jobs.draw_figures(
            kinds=["curves", "heat"], outputs={"curves": str(tmp_path / "x.png")}, title="t", classes=[]
        )
    assert not (tmp_path / "x.png").exists()
