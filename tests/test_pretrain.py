"""Domain self-supervised pretraining (learn/pretrain.py, DINO): the centre moves once per step (not once per
micro batch, lightly's trap), one process equals two ranks, micro batching changes nothing, SIGTERM resumes to
the same weights, the leakage check, the collapse monitors, LoRA merged into a backbone the registry loads.

The data: a synthetic set whose class is a pattern (horizontal or vertical stripes, checkerboard, dots) under
nuisance colours, phase and period, written into a real cache with the package's cache writer; a second variant
of the same images (coarsely quantised, as a codec would) for compression-aware views. The learning tests use
sets whose class is the orientation of one line or bar at a random place, length and width (`oriented`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from dermcompress.learn import models
from dermcompress.learn.checkpoints import CHECKPOINT
from dermcompress.learn.distributed import torchrun_command
from dermcompress.learn.pretrain import run_pretraining

REPO = Path(__file__).resolve().parents[1]
RES = 32
CLASSES = ["HSTRIPE", "VSTRIPE", "CHECKER", "DOTS"]
ARCH = "timm:test_vit"  # timm's 0.3M-parameter ViT, patch 16
# Small heads and views: 2 global crops of 32 px and 2 local of 16 px. 40 train images in lesion groups of two,
# 2 groups held out for kNN: 36 pretraining images, global batches of 8 (8, 8, 8, 8, 4) in micro batches of
# 4: the short last step has one micro batch, so the second of two ranks gets none.
SPEC = {
    "init": "scratch",
    "arch": ARCH,
    "variants": ["clean", "coarse"],
    "epochs": 2,
    "batch_size": 8,
    "micro_batch_size": 4,
    "lr": 1e-3,
    "min_lr": 1e-5,
    "warmup_epochs": 1,
    "out_dim": 256,
    "hidden_dim": 64,
    "bottleneck_dim": 32,
    "momentum": 0.99,
    "local_crops": {"n": 2},
    "knn_holdout": 0.1,
    "knn_k": 5,
    "log_every": 1,
    "seed": 0,
}
STEPS = 10


def patterns(n: int, res: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, res, res, 3) uint8 images of the four pattern classes in turn, and their labels."""
    labels = np.arange(n) % 4
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32)
    out = np.empty((n, res, res, 3), np.uint8)
    for i, c in enumerate(labels):
        period = rng.uniform(5, 8)
        px, py = rng.uniform(0, period, 2)
        sx = np.sin(2 * np.pi * (xx + px) / period) > 0
        sy = np.sin(2 * np.pi * (yy + py) / period) > 0
        dots = np.hypot((xx + px) % period - period / 2, (yy + py) % period - period / 2) < period / 4
        shape = [sy, sx, sx ^ sy, dots][c]
        bg, fg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        while np.abs(fg - bg).sum() < 200:
            fg = rng.uniform(0, 255, 3)
        img = np.where(shape[..., None], fg, bg) + rng.normal(0, 20, (res, res, 3))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out, labels


def oriented(
    n: int, res: int, rng: np.random.Generator, *, n_classes: int, width: tuple[float, float], tint: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(n, res, res, 3) uint8 images of one line (or bar) whose orientation is the class (class c at c * 180 /
    n_classes degrees), at a random centre, length (0.3-0.6 of the side) and width (px); a grey background and
    line of random levels, or (tint) a fixed pair of levels under a random colour cast (per-channel gains
    0.5-1.2); pixel noise of sd 20."""
    labels = np.arange(n) % n_classes
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
    out = np.empty((n, res, res, 3), np.uint8)
    for i, c in enumerate(labels):
        angle = np.pi * c / n_classes
        cx, cy = rng.uniform(0.25, 0.75, 2) * res
        length, w = rng.uniform(0.3, 0.6) * res, rng.uniform(*width)
        along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        mask = (np.clip(w / 2 + 0.5 - np.abs(across), 0, 1) * (np.abs(along) < length / 2))[..., None]
        if tint:
            gains = rng.uniform(0.5, 1.2, 3)
            bg, fg = 60 * gains, 200 * gains
        else:
            bg, fg = np.full(3, rng.uniform(40, 120)), np.full(3, rng.uniform(160, 240))
        img = bg * (1 - mask) + fg * mask + rng.normal(0, 20, (res, res, 3))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out, labels


def write_caches(
    root: Path, *, n_train: int, n_other: int = 8, seed: int = 0, images=patterns, classes=CLASSES
) -> tuple[dict[str, str], Path]:
    """Caches of two variants (clean, coarse) of the same images (`images(n, RES, rng)`), and their
    splits.parquet (groups of two)."""
    from dermcompress.data.cache_write import run_cache
    from dermcompress.data.pixeltable import write_pixel_table

    rng = np.random.default_rng(seed)
    n = n_train + 2 * n_other
    pixels, labels = images(n, RES, rng)
    meta = pd.DataFrame(
        {
            "image_id": [f"ISIC_{i:07d}" for i in range(n)],
            "label": [classes[c] for c in labels],
            "split": ["train"] * n_train + ["val"] * n_other + ["test"] * n_other,
            "degradation": "none",
            "degradation_params": "{}",
        }
    )
    groups = [f"IL_{i // 2:07d}" for i in range(n)]
    splits = meta[["image_id", "label", "split"]].assign(group_id=groups)
    splits[["image_id", "group_id", "label", "split"]].to_parquet(root / "splits.parquet", index=False)
    caches = {}
    for variant, px in (("clean", pixels), ("coarse", (pixels // 32 * 32 + 16).astype(np.uint8))):
        write_pixel_table(
            root / f"{variant}.parquet", meta, px, metadata={"resolution": str(RES), "variant": variant}
        )
        run_cache(
            degraded=root / f"{variant}.parquet",
            out_dir=root / variant,
            classes=classes,
            rows_per_shard=256,
            row_group_size=64,
        )
        caches[variant] = str(root / variant)
    return caches, root / "splits.parquet"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[dict[str, str], Path]:
    return write_caches(tmp_path_factory.mktemp("pretrain_data"), n_train=40)


def args(data, out: Path, **overrides) -> dict:
    caches, splits = data
    return {
        "name": "test",
        "spec": {**SPEC, **overrides},
        "init_entry": None,
        "caches": caches,
        "splits": str(splits),
        "out_dir": str(out / "run"),
        "checkpoint_dir": str(out / "ckpt"),
        "resolution": RES,
    }


def weights(out: Path) -> dict[str, torch.Tensor]:
    """The saved teacher backbone and the heads with the centre."""
    run = out / "run"
    return {
        **load_file(str(run / "backbone.safetensors")),
        **{f"heads.{k}": v for k, v in load_file(str(run / "heads.safetensors")).items()},
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


# One process (or one rank) of a pretraining; STOP="rank:step": that rank SIGTERMs itself after that step.
WORKER = """
import json, logging, os, signal, sys, torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from dermcompress.learn.pretrain import run_pretraining
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
stop = os.environ.get("STOP")
if stop:
    stop_rank, stop_step = map(int, stop.split(":"))
    steps = []
    def hook(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == stop_step and int(os.environ.get("RANK", "0")) == stop_rank:
            os.kill(os.getpid(), signal.SIGTERM)
    register_optimizer_step_post_hook(hook)
run_pretraining(**json.loads(sys.argv[1]))
"""


def pretrain(
    data, out: Path, *, nproc: int = 1, stop: str | None = None, **overrides
) -> subprocess.CompletedProcess:
    """A pretraining in fresh processes: `nproc` ranks under the real torchrun, or plain python for one."""
    out.mkdir(parents=True, exist_ok=True)
    script = out / "worker.py"
    script.write_text(WORKER)
    payload = json.dumps(args(data, out, **overrides))
    cmd = (
        torchrun_command(nproc, str(script), [payload])
        if nproc > 1
        else [sys.executable, str(script), payload]
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        **({"STOP": stop} if stop else {}),
    }
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    proc = pretrain(data, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_pretraining_writes_everything(one_process):
    run = one_process / "run"
    summary = json.loads((run / "pretrain.json").read_text())
    assert summary["steps"] == STEPS and summary["stopped"] == "completed" and summary["monitors_fired"] == []
    assert summary["images_seen"] == 2 * 36 and summary["image_passes"] == 2 * 36 * (2 + 2 + 2)
    assert summary["peak_mem_mb"] is None and summary["img_per_s"] > 0
    assert {"start-up", "setup", "knn", "train", "writing", "total"} <= set(summary["wall_seconds"])
    history = pd.read_csv(run / "history.csv")
    steps = history.dropna(subset=["loss"])
    assert steps["step"].tolist() == list(range(1, STEPS + 1))
    assert np.isfinite(steps[["loss", "grad_norm", "teacher_entropy", "std_l2"]].to_numpy()).all()
    assert history["knn_acc"].notna().sum() == 3  # step 0 and the end of each of the two epochs
    assert steps["momentum"].is_monotonic_increasing and steps["momentum"].iloc[-1] == pytest.approx(1.0)
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["pretrain_images"] == 36 and len(config["data"]["knn_held_out_groups"]) == 2
    assert config["spec"]["teacher_temp"] == 0.04  # the defaults, resolved
    for name in ("backbone.safetensors", "heads.safetensors", "history.csv", "config.json", "pretrain.json"):
        assert (run / f".{name}.sha256").is_file(), name
    assert not (one_process / "ckpt").exists()


def test_lightly_updates_the_centre_per_call_and_ours_once_per_step():
    """lightly's DINOLoss moves the centre in every forward(): called per micro batch it ends elsewhere than one
    call on the whole batch (so the equality tests below are meaningful); StepCentredDINOLoss leaves it alone in
    forward() and moves it once, with the whole batch's mean."""
    from lightly.loss.dino_loss import DINOLoss

    from dermcompress.learn.dino import StepCentredDINOLoss

    torch.manual_seed(0)
    teacher = [torch.randn(8, 16) for _ in range(2)]
    student = [torch.randn(8, 16) for _ in range(3)]
    whole, micro = DINOLoss(16, center_momentum=0.9), DINOLoss(16, center_momentum=0.9)
    whole(teacher, student)
    for half in (slice(0, 4), slice(4, 8)):
        micro([t[half] for t in teacher], [s[half] for s in student])
    assert not torch.allclose(whole.center, micro.center, atol=1e-3)

    ours = StepCentredDINOLoss(16, center_momentum=0.9)
    loss = sum(
        ours([t[h] for t in teacher], [s[h] for s in student]) * 4 / 8 for h in (slice(0, 4), slice(4, 8))
    )
    assert torch.equal(ours.center, torch.zeros_like(ours.center))  # forward() left it alone
    torch.testing.assert_close(loss, DINOLoss(16)(teacher, student))  # the same loss as lightly's
    ours.step_center(torch.stack(teacher).mean(dim=(0, 1)))
    torch.testing.assert_close(ours.center, whole.center)


def test_two_ranks_equal_one_process(data, one_process, tmp_path):
    """torchrun, 2 gloo ranks, same global batch and micro batches: the same weights, heads, centre and history,
    bit for bit (rank 1 gets no micro batch of each epoch's short last step)."""
    proc = pretrain(data, tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "rank 1 of 2 on cpu" in proc.stderr
    assert_same(weights(tmp_path), weights(one_process))
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "run" / "history.csv"), pd.read_csv(one_process / "run" / "history.csv")
    )
    assert json.loads((tmp_path / "run" / "pretrain.json").read_text())["world_size"] == 2


def test_micro_batch_size_changes_nothing(data, one_process, tmp_path, one_thread):
    """Micro batches of 2 instead of 4: the same weights and centre up to float summation order."""
    run_pretraining(**args(data, tmp_path, micro_batch_size=2))
    assert_same(weights(tmp_path), weights(one_process), atol=1e-5)


def test_sigterm_then_resume_gives_the_uninterrupted_weights(data, one_process, tmp_path):
    """A real SIGTERM after step 7 (epoch 2): checkpoint, Preempted; the rerun resumes there and ends exactly
    where the uninterrupted run ends."""
    proc = pretrain(data, tmp_path, stop="0:7")
    assert proc.returncode != 0 and "Preempted: SIGTERM at step 7" in proc.stderr, proc.stderr[-3000:]
    state = torch.load(tmp_path / "ckpt" / CHECKPOINT, weights_only=True)["state"]
    assert (state["step"], state["epoch"], state["batches_done"]) == (7, 1, 2)
    assert not (tmp_path / "run" / "backbone.safetensors").exists()
    proc = pretrain(data, tmp_path)
    assert proc.returncode == 0 and "resuming from" in proc.stderr, proc.stderr[-3000:]
    assert_same(weights(tmp_path), weights(one_process))
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "run" / "history.csv"), pd.read_csv(one_process / "run" / "history.csv")
    )


def test_an_image_of_a_val_or_test_group_stops_the_job(data, tmp_path):
    """splits.parquet puts two of the cache's train images in a val group: the job names them and the cache
    before any step."""
    from dermcompress.learn.pretrain_data import LeakageError

    caches, splits = data
    table = pd.read_parquet(splits)
    table.loc[table["group_id"] == "IL_0000003", "split"] = "val"
    table.to_parquet(tmp_path / "splits.parquet", index=False)
    with pytest.raises(
        LeakageError, match=r"clean: 2 image\(s\).*ISIC_0000006 \(val\), ISIC_0000007 \(val\)"
    ):
        run_pretraining(**args((caches, tmp_path / "splits.parquet"), tmp_path))
    assert not (tmp_path / "run").exists() and not (tmp_path / "ckpt").exists()


def test_collapse_monitor_fires_at_teacher_temperature_one(data, tmp_path, one_thread):
    """A teacher temperature of 1.0 flattens the teacher's distribution (uniform collapse): the teacher-entropy
    monitor fires, the job stops with an error naming it, and no backbone is written."""
    from dermcompress.learn.collapse import CollapseError

    spec = {"teacher_temp": 1.0, "warmup_teacher_temp": 1.0, "collapse": {"patience": 3}}
    with pytest.raises(CollapseError, match="teacher_entropy"):
        run_pretraining(**args(data, tmp_path, **spec))
    summary = json.loads((tmp_path / "run" / "pretrain.json").read_text())
    assert summary["monitors_fired"][0]["monitor"] == "teacher_entropy" and summary["steps"] == 3
    assert not (tmp_path / "run" / "backbone.safetensors").exists()


def test_collapse_monitors_fire_on_constant_outputs():
    """A collapsed model (every image the same output): std of l2-normalised features 0, batch-mean entropy =
    per-image entropy; the monitors fire after `patience` steps, and not on varied outputs."""
    from dermcompress.learn.collapse import Monitors
    from dermcompress.learn.dino import StepCentredDINOLoss, std_l2

    settings = {"teacher_entropy_max": 0.95, "batch_entropy_min": 0.05, "std_l2_min": 0.02, "patience": 2}
    torch.manual_seed(0)
    constant = torch.randn(1, 64).expand(16, 64) * 10
    assert std_l2([constant])[0] == pytest.approx(0.0, abs=1e-6)
    assert std_l2([torch.randn(16, 64)])[0] > 0.5
    # Constant head outputs, sharpened: every image puts its mass on the same prototype.
    loss = StepCentredDINOLoss(64)
    probs = torch.softmax((constant - loss.center.view(1, -1)) / 0.04, dim=-1).mean(0)
    batch_entropy = float(-torch.special.xlogy(probs, probs).sum()) / np.log(64)
    monitors = Monitors(settings)
    values = {"teacher_entropy": batch_entropy, "batch_mean_entropy": batch_entropy, "std_l2": 0.0}
    assert monitors.update(1, values) == []
    fired = {e["monitor"] for e in monitors.update(2, values)}
    assert fired == {"batch_mean_entropy", "std_l2"}, values
    healthy = Monitors(settings)
    for step in range(5):
        assert healthy.update(step, {"teacher_entropy": 0.3, "batch_mean_entropy": 0.8, "std_l2": 0.8}) == []


def test_lora_pretraining_merges_into_a_backbone_the_registry_loads(data, tmp_path, one_thread):
    """LoRA: only the adapted projections change, by a merged update of rank <= r (the base weights were never
    trained); the merged model computes what the adapted one does; the saved backbone loads through the registry
    like any local model at two resolutions (position embeddings resampled) and computes the teacher's features."""
    from dermcompress.learn.adaptation import adapt, merged

    spec = {"adaptation": {"kind": "lora", "r": 2}, "lr": 1e-2, "variants": ["clean"]}
    summary = run_pretraining(**args(data, tmp_path, **spec))
    saved = load_file(str(tmp_path / "run" / "backbone.safetensors"))
    torch.manual_seed(0)
    init = models.build_model(
        models.parse_spec("x", {"source": ARCH, "pretrained": False}), num_classes=1, resolution=RES
    )
    before = init.backbone.state_dict()
    assert saved.keys() == before.keys()  # timm's own key names, no adapters
    changed = [k for k in saved if not torch.equal(saved[k], before[k])]
    assert changed and all(k.endswith("attn.qkv.weight") for k in changed), changed
    for key in changed:
        assert torch.linalg.matrix_rank(saved[key] - before[key]).item() <= 2, key

    entry = summary["registry_entry"]
    assert entry["source"] == f"local:{tmp_path / 'run' / 'backbone.safetensors'}" and entry["arch"] == ARCH
    x = torch.randn(3, 3, RES, RES)
    with torch.no_grad():
        at_res = models.build_model(models.parse_spec("derm", entry), num_classes=2, resolution=RES).eval()
        reference = init.eval()
        reference.backbone.load_state_dict(saved)
        torch.testing.assert_close(at_res.forward_features(x), reference.forward_features(x))
        bigger = models.build_model(models.parse_spec("derm", entry), num_classes=2, resolution=48).eval()
        assert (
            bigger.backbone.pos_embed.shape[1] == 1 + 9
            and bigger.forward_features(torch.randn(2, 3, 48, 48)).isfinite().all()
        )

    # Merging: an adapted model with non-zero adapters computes what its merged copy computes.
    torch.manual_seed(1)
    model = adapt(
        models.build_model(
            models.parse_spec("x", {"source": ARCH, "pretrained": False}), num_classes=1, resolution=RES
        ),
        {"kind": "lora", "blocks": 0, "r": 4, "alpha": 16, "dropout": 0.0, "targets": None},
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.eval()
    plain = merged(model).eval()
    assert not any("lora" in k for k in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(x), model.forward_features(x), atol=1e-5, rtol=0)


def test_knn_monitor_fires_when_accuracy_falls_below_step_zero():
    """The continued-pretraining gate (DINOv2 without its heads): a fall of more than `stop_on_knn_drop` points
    below step 0's kNN accuracy is an event that names it; a smaller fall, a rise, or no gate is not."""
    from dermcompress.learn.collapse import knn_drop

    event = knn_drop(40, 0.60, 0.80, 10.0)
    assert (
        event["monitor"] == "knn_acc"
        and "more than 10.0 points below its step-0 value 0.800" in event["message"]
    )
    assert knn_drop(40, 0.75, 0.80, 10.0) is None and knn_drop(40, 0.90, 0.80, 10.0) is None
    assert knn_drop(40, 0.10, 0.80, None) is None


@pytest.fixture
def one_thread():
    """Small in-process runs on one torch thread: on a shared 2-core machine two threads of tiny matrices spin
    against other processes (measured: 37 s instead of 5 s for the collapse test below)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_knn_gate_stops_a_pretraining_that_destroys_what_the_init_knew(tmp_path, one_thread):
    """The kNN gate's loop path: on horizontal vs vertical bars a random-init test_vit already separates the
    classes (step-0 kNN accuracy 0.80 on 20 held-out images); an lr of 0.1 wrecks the backbone within an epoch
    (0.65 at its end, 4 steps), more than `stop_on_knn_drop` = 10 points below step 0's, and the job stops with
    an error naming the monitor and both values, recorded in pretrain.json; no backbone is written. The collapse
    monitors are switched off so that the kNN gate is what stops it."""
    from dermcompress.learn.collapse import CollapseError

    def bars(n, res, rng):
        return oriented(n, res, rng, n_classes=2, width=(2.5, 4.0), tint=False)

    (tmp_path / "data").mkdir()
    data = write_caches(tmp_path / "data", n_train=80, images=bars, classes=["HBAR", "VBAR"])
    spec = {
        "variants": ["clean"],
        "epochs": 3,
        "batch_size": 16,
        "micro_batch_size": None,
        "lr": 0.1,
        "min_lr": 0.1,
        "knn_holdout": 0.25,
        "knn_every": 1,
        "stop_on_knn_drop": 10.0,
        "collapse": {"teacher_entropy_max": None, "batch_entropy_min": None, "std_l2_min": None},
    }
    with pytest.raises(
        CollapseError, match=r"kNN monitor: accuracy 0\.\d+ at step 4 is more than 10\.0 points"
    ):
        run_pretraining(**args(data, tmp_path, **spec))
    summary = json.loads((tmp_path / "run" / "pretrain.json").read_text())
    (start, end) = [k["accuracy"] for k in summary["knn"]]
    assert start >= 0.7 and end < start - 0.1, summary["knn"]
    assert summary["steps"] == 4 and summary["stopped"].startswith("kNN monitor")
    assert f"below its step-0 value {start:.3f}" in summary["stopped"]
    assert [e["monitor"] for e in summary["monitors_fired"]] == ["knn_acc"]
    assert summary["monitors_fired"][0]["value"] == end and summary["registry_entry"] is None
    assert not (tmp_path / "run" / "backbone.safetensors").exists()


def test_dino_from_scratch_on_the_orientation_set_collapses_and_the_monitor_stops_it(tmp_path, one_thread):
    """Issue 24's first criterion (DINO on a tiny ViT beats its random init by 10 kNN points on a set whose class
    is shape or orientation under nuisance tint and position) is NOT met; this is what is true instead.

    Data: one line per image whose orientation is the class (0/45/90/135 degrees), at a random centre, length
    10-19 px and width 0.8-1.6 px, under a random colour cast, 32 px, pixel noise (`oriented`, tint). A random-init
    test_vit's frozen kNN accuracy is near chance (0.20-0.34 of 4 classes, seeds 0 and 1): the data do what they
    should. Recipe: DINO's (teacher temperature 0.04, centre momentum 0.9), 2 global 32 px crops at 0.4-1 and
    local 16 px crops at 0.1-0.4 (looked at as PNGs), colour jitter with grayscale 0.5, no flips (they map 45 onto
    135 degrees), a small head (256-64-1024), AdamW 5e-4 after 1 epoch of warm-up, teacher momentum 0.99.

    Why it does not learn: the random-init ViT's pooled features of these images are nearly one vector (mean
    pairwise cosine 0.97: mostly flat background, which ImageNet normalisation leaves off-centre), so once the
    centre has caught up (about 20 steps) the teacher's distribution is uniform (0.97 of log K; it rises the same
    at lr 1e-9), the student is taught uniform outputs, and the backbone collapses (std of l2-normalised
    features 0.17 -> 0.02 in 300 steps). Also measured, 300-900 steps, frozen kNN at step 0 and at the end:
    lr 5e-5 to 1e-3, teacher momentum 0.9 to 0.996, teacher temperature 0.01 to 0.04 (sharper: one-hot, then
    uniform), out_dim 256 to 4096, head 2048-256, batch 32 and 64, 2 to 6 local crops, 2-5 lines an image,
    heavy noise, grey instead of tinted: uniform or one-hot collapse every time, kNN at chance. Normalising with
    the data's own mean and std (a registry entry's mean/std) removes the common component (cosine 0.65) and
    the collapse, but DINO then clusters by what stays constant across an image's views (cast, brightness, line
    count) and frozen kNN stays at chance or falls (0.27 -> 0.24 after 900 steps; 0.35 -> 0.26 with 2-5 lines).
    test_vit (patch 16) sees 4 tokens a view, but a patch-8 ViT (16 tokens, embed 64, depth 4; registered with
    timm for the experiment only) does the same with the data's normalisation (0.27 -> 0.22 tinted, 0.30 -> 0.25
    brightness only, 300 steps). Neither a few hundred nor 900 CPU steps make DINO learn orientation here.

    A second attempt (seed 0; 400 train images, 100 of them held out as kNN queries; test_vit at 64 px, so 16
    tokens a global view and 4 a local one; the data's own mean/std; no flips; batch 32; 200-300 steps, 35-65 s
    a run on one thread; kNN at step 0 -> end) made the nuisances something the views destroy:
    - 6-14 short segments of the class's orientation at random places (every crop holds the class, none the
      position), tint 0.5-1.2, colour jitter on every view (brightness and contrast 0.5, saturation 1.0),
      grayscale 0.5 to 1.0, 4-6 local crops: teacher entropy to 0.99 (uniform), kNN 0.31 -> 0.26; at 128 px
      (64 tokens a view, 151 s) the same, 0.24 -> 0.28. A random init reads almost nothing of orientation there
      (0.25-0.31 for 6-60 segments an image); full-field gratings (period 5-9 px, random phase) give it 0.40-0.42.
    - Tinted gratings: the DINO recipe (teacher temperature 0.04, centre momentum 0.9) goes uniform and loses kNN
      (0.40 -> 0.28, the kNN gate fires); teacher temperature 0.02 with centre momentum 0.99 fires nothing and the
      loss falls (3.5 -> 1.2), but DINO clusters by the period (0.40 -> 0.35); with the period fixed it learns
      nothing of orientation (0.28 -> 0.28 and 0.31, grayscale 0.8 and 1.0; brightness and contrast 0.8, 300
      steps: 0.28 -> 0.32, and 0.38 -> 0.40 with tint 0.7-1.0, the batch-mean entropy monitor firing: all images
      on one prototype for about 150 steps).
    - Without tint (gratings of one grey), DINO does learn orientation: 0.59 -> 0.62-0.68 in 200 steps (lr 5e-4,
      teacher temperature 0.01-0.04, centre momentum 0.9-0.99), but in every such run a monitor fires: centre
      momentum 0.9 goes uniform (teacher_entropy), 0.97-0.99 puts every image on one prototype for tens of steps
      (batch_mean_entropy), and a centre without lag (momentum 0.5 or 0) goes uniform within 40 steps; the last
      layer frozen all run changes nothing (0.65, one prototype). lr 1e-4 learns nothing (0.53-0.59); 10 epochs
      of lr warm-up: 0.62 uniform or 0.56 one-hot; DINO's head (2048-256-4096): uniform from step 1 (0.85 of
      log K), 0.62. Even two identical views (no crops, no jitter, lr 1e-4) leave the loss at log K (6.2 -> 6.7)
      and the teacher entropy at 0.85 for 100 steps: at this scale the head's self-distillation moves too slowly
      for a few hundred steps.
    - A fast teacher (momentum 0.9-0.95, lr 5e-4) does lift kNN: 0.28 -> 0.42-0.43 on tinted gratings (period 7,
      grayscale 1.0, brightness and contrast 0.8), 0.59 -> 0.78-0.80 untinted; but the head has collapsed: from
      step 20 on the teacher entropy equals the batch-mean entropy (every image gets the same distribution),
      std_l2 falls to 0.02-0.08, the loss rises to log K and teacher_entropy or batch_mean_entropy fires. kNN
      then reads the residual of a collapsed feature (so kNN alone would pass a collapsed run: the monitors are
      what tell). lr 2.5e-4: 0.28 -> 0.32. Starting the centre at the first batch's teacher mean (lightly starts
      it at 0) makes step 0 image-specific (entropy 0.66 against 0.84 for the batch mean) but it still goes
      uniform by step 60 (0.28 -> 0.29-0.31).
    So the criterion (+10 points on two seeds, no monitor firing, within a test's budget) stays unmet on the CPU.

    What this asserts: on that set and recipe the teacher-entropy monitor catches the collapse (0.57 of log K at
    step 1, above 0.95 for 10 steps: it stops at step 26) and stops the job rather than writing a useless
    backbone; the loss stays finite; the step-0 kNN (the random init) is near chance."""
    from dermcompress.learn.collapse import CollapseError

    def lines(n, res, rng):
        return oriented(n, res, rng, n_classes=4, width=(0.8, 1.6), tint=True)

    (tmp_path / "data").mkdir()
    data = write_caches(tmp_path / "data", n_train=400, images=lines, classes=["D0", "D45", "D90", "D135"])
    spec = {
        "variants": ["clean"],
        "steps": 200,
        "batch_size": 32,
        "micro_batch_size": None,
        "lr": 5e-4,
        "min_lr": 1e-6,
        "warmup_epochs": 1,
        "out_dim": 1024,
        "hidden_dim": 256,
        "bottleneck_dim": 64,
        "momentum": 0.99,
        "flip": False,
        "jitter": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.8, "grayscale": 0.5},
        "knn_holdout": 0.25,
        "knn_k": 20,
        "knn_every": 100,
        "log_every": 50,
        "collapse": {"patience": 10},
    }
    with pytest.raises(CollapseError, match="collapse monitor teacher_entropy"):
        run_pretraining(**args(data, tmp_path, **spec))
    summary = json.loads((tmp_path / "run" / "pretrain.json").read_text())
    assert summary["monitors_fired"][0]["monitor"] == "teacher_entropy" and summary["steps"] < 60
    assert abs(summary["knn"][0]["accuracy"] - 0.25) < 0.15, summary["knn"]
    history = pd.read_csv(tmp_path / "run" / "history.csv").dropna(subset=["loss"])
    assert np.isfinite(history["loss"]).all()
    entropy = history["teacher_entropy"].to_numpy()
    assert entropy[0] < 0.7 and (entropy[-10:] > 0.95).all(), entropy


def test_the_teacher_is_in_eval_mode_from_the_start():
    """The step-0 kNN monitor reads the teacher before the loop first sets modes: a BatchNorm teacher in train mode
    would move its running statistics (and so its weights' meaning) just by being measured."""
    from dermcompress.learn.dino import DINO
    from dermcompress.learn.pretrain_spec import resolve_spec

    entry = {"source": "timm:resnet10t", "pretrained": False}
    student = models.build_seeded("tiny", entry, num_classes=1, resolution=32, seed=0)
    student.head = torch.nn.Identity()
    spec = resolve_spec({"init": "tiny", "out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 4}, "t")
    model = DINO(student, spec)
    assert not [name for name, m in model.teacher.named_modules() if m.training]
    assert not model.teacher_head.training
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    with torch.no_grad():
        model.teacher.forward_features(torch.rand(4, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())
