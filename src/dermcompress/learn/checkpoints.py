"""Resumable training: checkpoints that serve only the run and the code that wrote them, and preemption.

A checkpoint (`checkpoint.pt`, written to a temporary name then renamed) holds the model, optimizer, scheduler,
the loop's state (step, epoch, the position inside the epoch, the history so far) and every RNG state. Its
identity is the run's settings, model and data and the fingerprint of the training code (the module closure and
the versions of the packages it imports): a code change or a new timm that makes Snakemake rerun a run trains it
from step 0 instead of resuming someone else's weights. A finished run deletes its checkpoint.

SIGTERM or SIGUSR1 (what SLURM sends before a time limit or a preemption), and SIGINT (Ctrl-C), only set a flag
inside `preemption_flag`: the loop finishes the optimizer step it is in, saves a checkpoint and raises
`Preempted` (its message, in the job's log, names the signal), so the job fails and the retry resumes exactly
where it stopped. Nothing is ever unpickled: torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dermcompress.data import cache, integrity
from dermcompress.provenance.fingerprint import code_fingerprint

from . import distributed

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# SIGINT too: Ctrl-C in a terminal stops a training the way a preemption does, checkpoint first.
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint; rerunning resumes from it."""


def identity(code: str, **parts: Any) -> str:
    """What a checkpoint must match to be resumed: the run's parts (model, settings, data) and the fingerprint
    of the package module `code` that trains it, as canonical JSON."""
    return json.dumps({**parts, "code": code_fingerprint(code)}, sort_keys=True, default=str)


def data_fingerprint(cache_dir: str | Path) -> str:
    """The cache's content, by the checksums of its shards: a rebuilt cache invalidates old checkpoints."""
    shards = sorted(s["sha256"] for s in cache.load_info(cache_dir)["shards"])
    return hashlib.sha256("".join(shards).encode()).hexdigest()


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors, lists and numbers, so torch.load(weights_only=True) reads it back."""
    np_state = np.random.get_state()  # noqa: NPY002 - the global RNG is what third-party code draws from
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))  # noqa: NPY002
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save(path: Path, state: dict[str, Any]) -> None:
    # Atomic, under a name unique to the process and attempt, fsynced, with its checksum (integrity.py): a
    # crash or a full disk mid-save leaves the previous checkpoint intact and no partial file.
    with integrity.atomic_write(path) as out:
        torch.save(state, out)


def load(path: Path, wanted: str) -> dict[str, Any] | None:
    """The checkpoint at `path` if it exists and its identity is `wanted`, else None (saying why)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(io.BytesIO(integrity.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as err:  # an unreadable or corrupt checkpoint must not block a fresh start
        log.warning("ignoring unreadable checkpoint %s (%s); starting from scratch", path, err)
        return None
    if state.get("identity") != wanted:
        try:
            saved, expected = json.loads(state.get("identity") or "{}"), json.loads(wanted)
            differ = sorted(k for k in expected.keys() | saved.keys() if saved.get(k) != expected.get(k))
        except (TypeError, ValueError):
            differ = ["everything"]
        log.warning(
            "ignoring checkpoint %s: written for another %s; starting from scratch", path, ", ".join(differ)
        )
        return None
    return state


def write(path: Path, identity: str, model, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Checkpoint a training: weights, optimizer, schedule, the loop's state and every rank's RNG states."""
    rngs = distributed.gather_objects(rng_state())
    if distributed.is_main():  # the ranks hold identical weights and state (distributed.py)
        save(
            path,
            {
                "identity": identity,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rngs[0],
                "rank_rng": rngs,
                "state": state,
            },
        )
    distributed.barrier()  # no rank exits (or goes on) before the checkpoint is on disk


def restore(path: Path, identity: str, model, optimizer, scheduler) -> dict[str, Any] | None:
    """Load the checkpoint at `path` into the training if it is this very run's and code's; its loop state."""
    ckpt = load(path, identity)
    if ckpt is None:
        return None
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    # Each rank's own RNG; a run resumed on another number of GPUs uses rank 0's.
    rank_rng = ckpt.get("rank_rng", [])
    own = len(rank_rng) == distributed.world_size()
    restore_rng_state(rank_rng[distributed.rank()] if own else ckpt["rng"])
    state = ckpt["state"]
    log.info(
        "resuming from %s: step %d, epoch %d, %d steps into it",
        path,
        state["step"],
        state["epoch"],
        state["batches_done"],
    )
    return state


def remove(path: Path) -> None:
    """Delete a finished run's checkpoint, and its folders up the tree as long as they are empty."""
    path.unlink(missing_ok=True)
    integrity.checksum_path(path).unlink(missing_ok=True)
    with suppress(OSError):  # a parent holds other runs' checkpoints (or the folder is gone)
        os.removedirs(path.parent)


@contextmanager
def preemption_flag() -> Iterator[dict[str, str | None]]:
    """While inside, SIGTERM/SIGINT/SIGUSR1 only record their name in the yielded dict (module docstring)."""
    flag: dict[str, str | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():  # signals can only be caught there
        yield flag
        return

    def handler(signum, frame):
        flag["signal"] = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in PREEMPT_SIGNALS}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
