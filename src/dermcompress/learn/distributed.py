"""Data-parallel training on N processes (one per GPU, or CPU processes with gloo), launched by torchrun.

A Snakemake job that asks for N > 1 GPUs (resource `gpu`) re-executes its script under torchrun
(`relaunch_under_torchrun`), so every rank runs the same script and the same `run_training`; with one process
nothing here does anything and the code path is the single-GPU (or CPU) one.

What N processes compute is what one process computes (loop.py): each optimizer step takes the same global
batch of the seeded permutation, cut into the same micro batches, dealt round-robin to the ranks
(`loader.step_batches`); the gradients are summed over the ranks (`all_reduce_gradients`), and since every
micro batch's loss is already divided by the size of the whole global batch, that sum is the mean over the
global batch, as in one process. It is one explicit (bucketed) all-reduce per step rather than torch's
DistributedDataParallel wrapper: the short last step of an epoch can leave ranks with unequal numbers of micro
batches (or none), which the wrapper's all-reduce in every backward pass copes with only under its Join
context; with two ranks the sum is bit for bit what one process accumulates (tests/test_ddp.py); and the model
stays the plain model, so a checkpoint resumes on any number of GPUs. The price: no overlap of communication
with the backward pass. Floating-point buffers (BatchNorm running statistics) are averaged over the ranks after
every step, so all ranks always hold identical weights; per-rank BatchNorm batch statistics and dropout draws
are the only differences from one process with the same micro batches.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

# torchrun forwards these to the workers; TERM is what SLURM sends before a time limit (see the profiles).
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# How long torchrun lets workers finish their step and write the checkpoint after a signal (its default: 30 s).
SHUTDOWN_TIMEOUT_S = 300
BUCKET_NUMEL = 2**24  # gradients are all-reduced in flat buckets of at most this many elements


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True on the process that writes files (rank 0, or the only process)."""
    return rank() == 0


def torchrun_command(nproc: int, script: str, args: Iterable[str] = ()) -> list[str]:
    """`torchrun` (as `python -m torch.distributed.run`, so the same interpreter) for `nproc` local ranks."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # one node, a free rendezvous port: concurrent jobs on one node do not collide
        f"--nproc-per-node={nproc}",
        f"--signals-to-handle={FORWARDED_SIGNALS}",
        f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
        script,
        *args,
    ]


def relaunch_under_torchrun(nproc: int) -> None:
    """With nproc > 1, replace this process by torchrun running this very script on `nproc` ranks.

    Called first thing in a Snakemake script: the process keeps its PID (Snakemake waits on it as before) and
    the script file, with Snakemake's preamble, is still there for the ranks to run. Does nothing for one
    process or when already under torchrun.
    """
    if nproc <= 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        return
    # The job's threads (Snakemake sets OMP_NUM_THREADS to them) are shared by the ranks, not given to each.
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, threads // nproc))
    command = torchrun_command(nproc, sys.argv[0], sys.argv[1:])
    print(f"launching {nproc} ranks: {' '.join(command)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(command[0], command)


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, rank r of a node uses GPU LOCAL_RANK; CPU stays CPU."""
    if device.type == "cuda" and device.index is None and world_size() > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init(device: torch.device) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPU) when there is more than one rank; idempotent."""
    if world_size() == 1 or dist.is_initialized():
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=_device_id(device))
    atexit.register(_destroy)
    log.info("rank %d of %d on %s", rank(), world_size(), device)


def _device_id(device: torch.device) -> torch.device | None:
    return device if device.type == "cuda" else None


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_model(model: nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere (seeded builds agree already; this makes sure)."""
    if world_size() == 1:
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def _buckets(tensors: list[torch.Tensor], numel: int) -> Iterator[list[torch.Tensor]]:
    bucket, size = [], 0
    for t in tensors:
        if bucket and size + t.numel() > numel:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def all_reduce_gradients(params: Iterable[nn.Parameter]) -> None:
    """Sum the gradients of `params` over the ranks, in place (a rank without micro batches adds zeros)."""
    if world_size() == 1:
        return
    grads = []
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    for bucket in _buckets(grads, BUCKET_NUMEL):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
            g.copy_(part.view_as(g))


def sync_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the ranks; others from rank 0."""
    if world_size() == 1:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world_size())
        else:
            dist.broadcast(buffer, src=0)


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of small per-rank numbers (the step's loss, whether a rank was signalled).

    In float32, as one process accumulates the step's loss, so two ranks log the very same number.
    """
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float32, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] for one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
