"""Multi-crop views for self-supervised pretraining (DINO's global and local crops), on the device, seeded.

Each view of an image is a random resized crop (an area fraction drawn from the view's `scale` range, an aspect
ratio from 3/4..4/3, a position), an optional horizontal flip and an optional colour jitter (brightness,
contrast, saturation) and grayscale, then the model's normalisation. All the crops of a batch are cut and resized by one
`torchvision.ops.roi_align` call (bilinear, averaging several samples per output pixel when it shrinks, which
keeps a downscaled crop from aliasing): no per-image CPU transform.

The draws depend only on (seed, epoch, image row) (loader.epoch_generator, streams of their own), as augment.py's
do: not on the micro batch an image lands in, its size or the rank that gets it. So is the choice of the variant
a compression-aware student view is cut from (`variant_draws`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dermcompress.data.loader import epoch_generator

# Random streams of one (seed, epoch), beside the loader's permutation (0) and augment.py's flips (1).
CROPS, VARIANTS = 2, 3
# Per view: area, log aspect ratio, x and y position, flip, jitter on/off, brightness, contrast, saturation,
# grayscale on/off.
N_DRAWS = 10
LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def epoch_draws(n_images: int, n_views: int, seed: int, epoch: int) -> torch.Tensor:
    """(n_images, n_views, N_DRAWS) uniform [0, 1) numbers per dataset row and view, for one epoch."""
    generator = epoch_generator(seed, epoch, stream=CROPS)
    return torch.rand((n_images, n_views, N_DRAWS), generator=generator)


def variant_draws(n_images: int, n_variants: int, seed: int, epoch: int) -> torch.Tensor:
    """(n_images,) int64: which variant each dataset row's student views are cut from in this epoch."""
    generator = epoch_generator(seed, epoch, stream=VARIANTS)
    return torch.randint(0, n_variants, (n_images,), generator=generator)


def boxes(draws: torch.Tensor, scale: Sequence[float], height: int, width: int) -> torch.Tensor:
    """(B, 4) crop boxes (x1, y1, x2, y2) in pixels for one view's draws (B, N_DRAWS), torchvision's
    RandomResizedCrop geometry with the side clamped to the image instead of redrawn."""
    lo, hi = scale
    area = lo + draws[:, 0] * (hi - lo)
    ratio = torch.exp(LOG_RATIO[0] + draws[:, 1] * (LOG_RATIO[1] - LOG_RATIO[0]))
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    x0, y0 = draws[:, 2] * (1 - w), draws[:, 3] * (1 - h)
    return torch.stack([x0 * width, y0 * height, (x0 + w) * width, (y0 + h) * height], dim=1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def jitter(x: torch.Tensor, draws: torch.Tensor, strength: dict) -> torch.Tensor:
    """Brightness, contrast and saturation jitter of [0, 1] images (B, 3, H, W), each image with probability
    strength["p"] and factors drawn in 1 +- strength[...]; then grayscale with probability
    strength["grayscale"] (DINO: 0.2)."""
    on = (draws[:, 5] < strength["p"]).view(-1, 1, 1, 1)

    def factor(i: int, key: str) -> torch.Tensor:
        return (1 + (2 * draws[:, i] - 1) * strength[key]).view(-1, 1, 1, 1)

    y = x * factor(6, "brightness")
    mean = _gray(y).mean(dim=(-2, -1), keepdim=True)
    y = (y - mean) * factor(7, "contrast") + mean
    gray = _gray(y)
    y = (gray + (y - gray) * factor(8, "saturation")).clamp(0, 1)
    y = torch.where(on, y, x)
    return torch.where((draws[:, 9] < strength["grayscale"]).view(-1, 1, 1, 1), _gray(y).expand_as(y), y)


def views(
    pixels: torch.Tensor,
    draws: torch.Tensor,
    specs: Sequence[tuple[int, Sequence[float]]],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    flip: bool,
    strength: dict | None,
) -> list[torch.Tensor]:
    """The views of a uint8 batch (B, 3, H, W): one normalised float (B, 3, size, size) tensor per (size, scale)
    of `specs`, view v cut with draws[:, v] (B, n_views, N_DRAWS)."""
    from torchvision.ops import roi_align  # imported here: only a pretraining job needs torchvision

    x = pixels.float().div_(255)
    b, _, height, width = x.shape
    draws = draws.to(x.device)
    index = torch.arange(b, device=x.device, dtype=x.dtype).unsqueeze(1)
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    out = []
    for v, (size, scale) in enumerate(specs):
        d = draws[:, v]
        rois = torch.cat([index, boxes(d, scale, height, width).to(x)], dim=1)
        # sampling_ratio -1: ceil(box / size) samples per output pixel, averaged (no aliasing when shrinking)
        crop = roi_align(
            x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True
        )
        if flip:
            crop = torch.where((d[:, 4] < 0.5).view(-1, 1, 1, 1), crop.flip(-1), crop)
        if strength:
            crop = jitter(crop, d, strength)
        out.append((crop - mean_t) / std_t)
    return out
