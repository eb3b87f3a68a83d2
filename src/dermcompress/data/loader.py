"""Batches for training and evaluation, straight from the in-memory cache.

A split fits in memory as one uint8 tensor (224 px: 150 kB an image), so a batch is one fancy-index copy of it:
no decode, no per-item collate, no worker processes. Pixels stay uint8 until `normalize` converts them on the
target device, so a quarter of the bytes cross to the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import CacheSplit, read_split


def _subset(data: CacheSplit, image_ids: Collection[str], where: str) -> CacheSplit:
    """The rows of `data` whose image_id is in `image_ids` (all of which must be there), in cache order."""
    wanted = set(image_ids)
    if missing := wanted - set(data.image_ids):
        raise ValueError(f"{len(missing)} requested image(s) not in {where}, e.g. {min(missing)}")
    rows = np.flatnonzero([i in wanted for i in data.image_ids])
    return replace(
        data,
        pixels=data.pixels[rows],
        labels=data.labels[rows],
        image_ids=[data.image_ids[i] for i in rows],
        degradations=[data.degradations[i] for i in rows],
    )


class CacheDataset(Dataset):
    """One split of a cache as a map-style Dataset: item i -> (uint8 (3, H, W) tensor, label, i).

    `image_ids`: keep only these rows of the split (e.g. a label fraction of the train split), in cache order.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        split: str,
        *,
        verify: bool = True,
        image_ids: Collection[str] | None = None,
    ) -> None:
        data = read_split(cache_dir, split, verify=verify)
        if image_ids is not None:
            data = _subset(data, image_ids, f"{cache_dir}/{split}")
        # Channels first once, here, so every batch afterwards is a single contiguous gather.
        self.pixels = torch.from_numpy(data.pixels).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(data.labels.copy())  # read-only view of the shard; tiny
        self.image_ids = data.image_ids
        self.degradations = data.degradations
        self.classes = data.classes
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.pixels[i], int(self.labels[i]), i


# Independent random streams of one (seed, epoch): the epoch's order, and its augmentation draws (augment.py).
PERMUTATION, AUGMENTATION = 0, 1


def epoch_generator(seed: int, epoch: int, *, stream: int) -> torch.Generator:
    """A torch generator that depends on (seed, epoch, stream) jointly.

    numpy's SeedSequence hashes the three together, so no two (seed, epoch) pairs share a stream: with `seed +
    epoch`, seed 0's epoch 1 would be seed 1's epoch 0, and two "independent" seeds would see the same orders.
    """
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class BatchLoader:
    """Iterable of {"pixels", "labels", "index"} batches over a CacheDataset.

    The order of an epoch depends only on (seed, epoch), jointly (epoch_generator): call `set_epoch(e)` before
    each epoch, as with DistributedSampler. With world_size > 1 each rank takes a disjoint, equal-sized share of the permutation,
    padded by wrap-around when the split does not divide evenly (the DistributedSampler convention).
    """

    def __init__(
        self,
        dataset: CacheDataset,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if len(dataset) == 0:
            raise ValueError(f"split {dataset.split!r} is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This rank's row indices for the current epoch, in order."""
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=epoch_generator(self.seed, self.epoch, stream=PERMUTATION))
        else:
            order = torch.arange(n)
        per_rank = math.ceil(n / self.world_size)
        total = per_rank * self.world_size
        if total > n:
            order = order.repeat(math.ceil(total / n))[:total]
        return order[self.rank : total : self.world_size].contiguous()

    def __len__(self) -> int:
        per_rank = math.ceil(len(self.dataset) / self.world_size)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows `index` of the dataset as one batch."""
        return {
            "pixels": self.dataset.pixels.index_select(0, index),
            "labels": self.dataset.labels.index_select(0, index),
            "index": index,
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.indices()
        stop = len(self) * self.batch_size
        for start in range(0, min(stop, len(order)), self.batch_size):
            yield self.batch(order[start : start + self.batch_size])


def step_batches(
    loader: BatchLoader, step_size: int, *, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[int, Iterator[dict[str, torch.Tensor]]]]:
    """The optimizer steps of an epoch: (images in the whole step, this rank's micro batches of it), lazily.

    The epoch's order (of a one-rank `loader`) is cut into global batches of `step_size` images and each into
    micro batches of `loader.batch_size`, exactly as one process cuts them; micro batch j of a step goes to
    rank j mod world_size. So N processes see the same steps and micro batches as one (distributed.py); a rank
    may get no micro batch of a short last step.
    """
    if loader.world_size != 1:
        raise ValueError("step_batches deals the micro batches itself: give it a one-rank loader")
    order = loader.indices()
    for start in range(0, len(order), step_size):
        micro = order[start : start + step_size].split(loader.batch_size)
        mine = micro[rank::world_size]
        yield min(step_size, len(order) - start), (loader.batch(index) for index in mine)


def make_loader(
    cache_dir: str | Path,
    split: str,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
    verify: bool = True,
    rank: int = 0,
    world_size: int = 1,
    image_ids: Collection[str] | None = None,
) -> BatchLoader:
    """Read (and verify) one split of the cache (only `image_ids`, if given) into memory and batch it; see
    BatchLoader."""
    return BatchLoader(
        CacheDataset(cache_dir, split, verify=verify, image_ids=image_ids),
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
    )


def normalize(
    pixels: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (..., 3, H, W) in 0..255 -> (x / 255 - mean) / std as `dtype`, computed on `device`.

    `mean` and `std` are on the 0..1 scale (timm's convention). The uint8 tensor moves first (non-blocking,
    which overlaps with compute when the batch is in pinned memory); the float copy is made on the device.
    `out`: a tensor of the pixels' shape to write into (its dtype wins). On CPU, reusing one saves the page faults of a fresh
    large allocation per batch, which otherwise cost more than the arithmetic; on GPU the caching allocator
    already reuses memory.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    x = pixels.to(device if device is not None else pixels.device, non_blocking=True)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    scale, shift = 1.0 / (255.0 * std_t), mean_t / std_t
    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    elif out.shape != x.shape:  # copy_ would broadcast a single image silently
        raise ValueError(f"out has shape {tuple(out.shape)}, pixels {tuple(x.shape)}")
    if out.dtype != torch.float32:
        return out.copy_(x.to(torch.float32).mul_(scale).sub_(shift))
    # One converting copy and two in-place passes: no float temporaries.
    return out.copy_(x).mul_(scale).sub_(shift)
