"""Optional training augmentation: flips and quarter turns of the uint8 batch, on the device.

The study trained without augmentation (`training.augment: []`, the default). With `[hflip, vflip, rot90]` or a
subset, each training image gets, per epoch, a horizontal flip (p = 1/2), a vertical flip (p = 1/2) and a turn
by 0, 90, 180 or 270 degrees (p = 1/4 each): dermoscopy has no canonical orientation, so these change no label.

The draws depend only on (seed, epoch, image row) (loader.epoch_generator's AUGMENTATION stream, one table per
epoch): not on the batch an image lands in, the micro batch size or the rank that gets it, so a run is
reproducible and one GPU and two give the same result. Every operation is drawn whether enabled or not, so
enabling one leaves the others' draws unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dermcompress.data.loader import AUGMENTATION, epoch_generator

AUGMENTATIONS = ("hflip", "vflip", "rot90")


def check(ops: Sequence[str]) -> list[str]:
    """The augmentations, checked: known names, none twice."""
    ops = list(ops)
    unknown = sorted(set(ops) - set(AUGMENTATIONS))
    if unknown or len(set(ops)) != len(ops):
        raise ValueError(f"augment must list distinct operations of {AUGMENTATIONS}, got {ops}")
    return ops


def epoch_draws(n_images: int, seed: int, epoch: int, ops: Sequence[str]) -> torch.Tensor:
    """(n_images, 3) int64 per dataset row: hflip (0/1), vflip (0/1), quarter turns (0-3); 0 where disabled."""
    draws = torch.randint(0, 4, (n_images, 3), generator=epoch_generator(seed, epoch, stream=AUGMENTATION))
    draws[:, :2] %= 2
    enabled = torch.tensor([op in ops for op in AUGMENTATIONS])
    return draws * enabled


def apply(pixels: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """The (B, 3, H, W) batch with each image's draws (B, 3) applied, on the batch's device."""
    if pixels.shape[-1] != pixels.shape[-2] and bool(draws[:, 2].any()):
        raise ValueError(f"rot90 needs square images, got {tuple(pixels.shape[-2:])}")
    draws = draws.to(pixels.device)
    hflip, vflip, turns = (draws[:, i].view(-1, 1, 1, 1) for i in range(3))
    out = torch.where(hflip == 1, pixels.flip(-1), pixels)
    out = torch.where(vflip == 1, out.flip(-2), out)
    for k in (1, 2, 3):
        chosen = turns.view(-1) == k
        if chosen.any():
            out[chosen] = torch.rot90(out[chosen], k, dims=(-2, -1))
    return out
