"""Data-parallel training for real: torchrun with 2 CPU processes (gloo) against 1 process, same global batch.

Each optimizer step of 2 ranks sums, over the ranks, the gradients of the same micro batches that 1 process
accumulates one after the other; with two addends the sum is the same floating-point number either way
(a + b == b + a), so with one thread per process the two runs are expected to agree exactly. The model is a
ViT (LayerNorm, no dropout): BatchNorm batch statistics and dropout draws are per rank, the one documented
difference from one process (distributed.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import learnable_cache
from safetensors.torch import load_file

from dermcompress.data.loader import make_loader, step_batches
from dermcompress.learn.checkpoints import CHECKPOINT
from dermcompress.learn.distributed import torchrun_command

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["MEL", "NV"]
RES = 32
# 48 train images in global batches of 20 (20, 20, 8), micro batches of 10: two per step, one per rank; the
# short last step has one micro batch, so rank 1 contributes nothing to it.
SETTINGS = {
    "mode": "finetune",
    "lr": 2e-3,
    "epochs": 2,
    "batch_size": 20,
    "micro_batch_size": 10,
    "schedule": "cosine",
    "min_lr_ratio": 0.1,
    "seed": 0,
    "n_bootstrap": 20,
    # Clipping the summed gradient and augmenting each image as drawn for it: neither may depend on the ranks.
    "max_grad_norm": 0.5,
    "augment": ["hflip", "vflip", "rot90"],
    "log_every": 1,
}
STEPS = 6

# One rank's (or the only process's) program. STOP="rank:step": that rank sends itself SIGTERM after that step.
WORKER = """
import json, logging, os, signal, sys, torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from dermcompress.learn.train import run_training
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
run_training(**json.loads(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A 32 px cache (48 train / 16 val / 16 test, balanced, NV brighter) beside its splits table (conftest)."""
    return learnable_cache(tmp_path_factory.mktemp("ddp_cache"), res=RES, seed=1)[0]


def train(cache_dir: Path, out: Path, *, nproc: int, stop: str | None = None) -> subprocess.CompletedProcess:
    """One run in fresh processes: `nproc` ranks under the real torchrun, or plain python for one."""
    args = {
        "model_name": "test_vit",
        "model_entry": {"source": "timm:test_vit", "pretrained": False},
        "train_cache": str(cache_dir),
        "run_dir": str(out / "run"),
        "checkpoint_dir": str(out / "ckpt"),
        "settings": SETTINGS,
        "resolution": RES,
        "splits": str(cache_dir.parent / "splits.parquet"),
        "weights_path": str(out / "run" / "weights.safetensors"),
    }
    script = out / "worker.py"
    out.mkdir(parents=True, exist_ok=True)
    script.write_text(WORKER)
    cmd = (
        torchrun_command(nproc, str(script), [json.dumps(args)])
        if nproc > 1
        else [sys.executable, str(script), json.dumps(args)]
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        **({"STOP": stop} if stop else {}),
    }
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def outputs(out: Path) -> tuple[dict[str, torch.Tensor], pd.DataFrame, dict]:
    """The trained weights, history.csv and train.json of a run."""
    run = out / "run"
    return (
        load_file(str(run / "weights.safetensors")),
        pd.read_csv(run / "history.csv"),
        json.loads((run / "train.json").read_text()),
    )


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def one_process(cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    proc = train(cache_dir, out, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_ranks_equal_one_process(cache_dir, one_process, tmp_path):
    proc = train(cache_dir, tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "rank 1 of 2 on cpu" in proc.stderr  # really two processes in one gloo group
    weights, history, summary = outputs(tmp_path)
    ref_weights, ref_history, ref_summary = outputs(one_process)
    assert summary["world_size"] == 2 and ref_summary["world_size"] == 1
    assert summary["steps"] == ref_summary["steps"] == STEPS
    assert_same_weights(weights, ref_weights)
    pd.testing.assert_frame_equal(history, ref_history, check_exact=True)
    # The run learned something, so the equality is not that of two untrained models; and clipping was at work.
    assert history["eval_accuracy"].dropna().iloc[-1] >= 0.75
    assert (history["grad_norm"] > SETTINGS["max_grad_norm"]).any()


def test_signal_on_one_rank_stops_both_and_resumes_on_one_process(cache_dir, one_process, tmp_path):
    """SIGTERM to rank 1 alone after step 2: both ranks stop after that step, rank 0 checkpoints, torchrun
    fails; the run then resumes on a single process and ends exactly where the uninterrupted run ends."""
    proc = train(cache_dir, tmp_path, nproc=2, stop="1:2")
    assert proc.returncode != 0
    assert "Preempted: a signal to another rank at step 2" in proc.stderr, proc.stderr[-5000:]
    assert "Preempted: SIGTERM at step 2" in proc.stderr
    checkpoint = torch.load(tmp_path / "ckpt" / CHECKPOINT, weights_only=True)
    assert checkpoint["state"]["step"] == 2 and len(checkpoint["rank_rng"]) == 2
    assert not (tmp_path / "run" / "train.json").exists()

    proc = train(cache_dir, tmp_path, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "step 2, epoch 0, 2 steps into it" in proc.stderr
    weights, history, summary = outputs(tmp_path)
    ref_weights, ref_history, _ = outputs(one_process)
    assert summary["steps"] == STEPS
    assert_same_weights(weights, ref_weights)
    pd.testing.assert_frame_equal(history, ref_history, check_exact=True)


def test_step_batches_deal_the_micro_batches_of_one_process(cache_dir):
    """Ranks together get exactly the micro batches one process makes, step by step; a rank may get none."""
    loader = make_loader(cache_dir, "train", batch_size=10, shuffle=True, seed=3)
    loader.set_epoch(1)
    one = [(size, [b["index"].tolist() for b in micro]) for size, micro in step_batches(loader, 20)]
    assert [size for size, _ in one] == [20, 20, 8]
    assert [len(micro) for _, micro in one] == [2, 2, 1]
    ranks = [list(step_batches(loader, 20, rank=r, world_size=2)) for r in range(2)]
    for step, (size, micro) in enumerate(one):
        dealt = [[b["index"].tolist() for b in ranks[r][step][1]] for r in range(2)]
        assert ranks[0][step][0] == ranks[1][step][0] == size
        assert dealt[0] == micro[0::2] and dealt[1] == micro[1::2]
    assert sorted(i for _, micro in one for b in micro for i in b) == list(range(48))
