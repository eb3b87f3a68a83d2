"""Batches for training and evaluation, straight from the in-memory cache.

A split fits in memory as one uint8 tensor (224 px: 150 kB an image), so a batch is one fancy-index copy of it:
no decode, no per-item collate, no worker processes. Pixels stay uint8 until `normalize` converts them on the
target device, so a quarter of the bytes cross to the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .cache import read_split


class CacheDataset(Dataset):
    """One split of a cache as a map-style Dataset: item i -> (uint8 (3, H, W) tensor, label, i)."""

    def __init__(self, cache_dir: str | Path, split: str, *, verify: bool = True) -> None:
        data = read_split(cache_dir, split, verify=verify)
        # Channels first once, here, so every batch afterwards is a single contiguous gather.
        self.pixels = torch.from_numpy(data.pixels).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(data.labels)
        self.image_ids = data.image_ids
        self.degradations = data.degradations
        self.classes = data.classes
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.pixels[i], int(self.labels[i]), i


class BatchLoader:
    """Iterable of {"pixels", "labels", "index"} batches over a CacheDataset.

    The order of an epoch depends only on (seed, epoch): call `set_epoch(e)` before each epoch, as with
    DistributedSampler. With world_size > 1 each rank takes a disjoint, equal-sized share of the permutation,
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
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
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

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.indices()
        stop = len(self) * self.batch_size
        for start in range(0, min(stop, len(order)), self.batch_size):
            index = order[start : start + self.batch_size]
            yield {
                "pixels": self.dataset.pixels.index_select(0, index),
                "labels": self.dataset.labels.index_select(0, index),
                "index": index,
            }


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
) -> BatchLoader:
    """Read (and verify) one split of the cache into memory and batch it; see BatchLoader."""
    return BatchLoader(
        CacheDataset(cache_dir, split, verify=verify),
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
