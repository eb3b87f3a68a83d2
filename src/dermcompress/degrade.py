"""Degrade stage: the study's transmission artefacts (JPEG, Gaussian blur, colour quantization) on a share of images.

Which image gets which operation, with which drawn parameters, follows from (seed, image_id) alone: a per-image
generator seeded from a SHA-256 of both. Adding, removing or reordering other images changes nothing for an image,
and the plan is the same on every machine and Python run (unlike hash()).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from dermcompress.config import DEGRADATIONS
from dermcompress.images import ImageError, decode_image
from dermcompress.pixeltable import read_pixel_table, read_table_metadata, write_pixel_table
from dermcompress.resize import (
    ROW_GROUP_SIZE,
    PathOrFrame,
    available_threads,
    load_resized,
    map_images,
    read_member,
    resize_image,
    source_changed,
    split_members,
)

log = logging.getLogger(__name__)

NONE = "none"
ORDERS = ("after_resize", "before_resize")
QUANTIZE_METHODS = {
    "maxcoverage": Image.Quantize.MAXCOVERAGE,
    "mediancut": Image.Quantize.MEDIANCUT,
    "fastoctree": Image.Quantize.FASTOCTREE,
}


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """A generator that depends on (seed, image_id) only; all 256 bits of the digest seed it."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


def plan_degradation(image_id: str, variant: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(operation, parameters) for one image: u ~ U(0,1) falls into the cumulative fractions jpeg, blur, quantize
    (in that order) or past them (none); the operation's parameters are drawn next from the same generator."""
    fractions = variant["fractions"]
    if not any(fractions.values()):
        return NONE, {}
    rng = image_rng(variant["seed"], image_id)
    u = rng.random()
    edge = 0.0
    for op in DEGRADATIONS:
        edge += fractions.get(op, 0.0)
        if u < edge:
            return op, _draw_params(op, rng, variant)
    return NONE, {}


def _draw_params(op: str, rng: np.random.Generator, variant: dict[str, Any]) -> dict[str, Any]:
    if op == "jpeg":
        return {"quality": int(variant["jpeg_quality"])}
    if op == "blur":
        low, high = variant["blur_sigma"]
        return {
            "kernel": int(rng.choice(variant["blur_kernel_sizes"])),
            "sigma": float(rng.uniform(low, high)),
        }
    low, high = variant["quantize_colors"]
    return {"colors": int(rng.integers(low, high, endpoint=True)), "method": variant["quantize_method"]}


def apply_degradation(pixels: np.ndarray, op: str, params: dict[str, Any]) -> np.ndarray:
    """(H, W, 3) uint8 -> the same shape, degraded by `op` with `params` (as planned by plan_degradation)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    if op == NONE:
        return pixels
    if op == "jpeg":
        # An in-memory round trip through PIL's encoder: the artefacts a JPEG transmission really leaves.
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=int(params["quality"]))
        return np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8)
    if op == "blur":
        k = int(params["kernel"])
        return cv2.GaussianBlur(pixels, (k, k), float(params["sigma"]))
    if op == "quantize":
        method = QUANTIZE_METHODS[params["method"]]
        palette = Image.fromarray(pixels).quantize(colors=int(params["colors"]), method=method)
        return np.asarray(palette.convert("RGB"), dtype=np.uint8)
    raise ValueError(f"unknown degradation {op!r}; expected none or one of {', '.join(DEGRADATIONS)}")


def plan_rows(rows: pd.DataFrame, variant: dict[str, Any]) -> pd.DataFrame:
    """Add `degradation` and `degradation_params` (JSON, sorted keys); rows outside the variant's splits: none."""
    degraded_splits = set(variant.get("splits", ()))
    plans = [
        plan_degradation(image_id, variant) if split in degraded_splits else (NONE, {})
        for image_id, split in zip(rows["image_id"], rows["split"], strict=True)
    ]
    rows = rows.copy()
    rows["degradation"] = [op for op, _ in plans]
    rows["degradation_params"] = [json.dumps(params, sort_keys=True) for _, params in plans]
    return rows


def _apply_task(task: tuple[np.ndarray, str, str]) -> np.ndarray:
    pixels, op, params = task
    return apply_degradation(pixels, op, json.loads(params))


def _degrade_resized(
    rows: pd.DataFrame, resized: str | Path, resolution: int, threads: int
) -> tuple[np.ndarray, str | None]:
    """Degrade the small images of the resize stage's table, in the order of `rows`."""
    table_meta = read_table_metadata(resized)
    if int(table_meta.get("resolution", -1)) != resolution:
        raise ValueError(f"{resized} holds {table_meta.get('resolution')}px images, expected {resolution}px")
    meta, pixels = read_pixel_table(resized, columns=["image_id"])
    position = pd.Index(meta["image_id"]).get_indexer(rows["image_id"])
    if len(meta) != len(rows) or (position < 0).any():
        raise ValueError(
            f"{resized} does not hold exactly the images of the split ({len(meta)} rows vs {len(rows)}): "
            "it is stale, rerun the resize stage"
        )
    pixels = pixels[position]  # a writable copy in the split's order
    # A thread pool: jpeg and blur take < 1 ms at <= 224 px, but MAXCOVERAGE quantize ~30-45 ms (most of this
    # stage's time), and Pillow releases the GIL while it quantizes.
    todo = np.flatnonzero(rows["degradation"].to_numpy() != NONE)
    tasks = [(pixels[i], rows["degradation"].iat[i], rows["degradation_params"].iat[i]) for i in todo]
    if tasks:
        pixels[todo] = map_images(_apply_task, tasks, shape=pixels.shape[1:], threads=threads, desc="degrade")
    return pixels, table_meta.get("policy")


def _degrade_task(
    task: tuple[str, str, str, str],
    *,
    images: str,
    size: int,
    policy: str,
    reduced_decode: bool,
    max_pixels: int,
) -> np.ndarray:
    image_id, member, sha256, op, params = task
    data = read_member(images, image_id, member, sha256)
    try:
        if op == NONE:  # exactly what the resize stage makes of it (reduced decode included)
            return load_resized(
                data, [size], policy=policy, reduced_decode=reduced_decode, max_pixels=max_pixels
            )[size]
        # Degraded at the source's full resolution: a reduced decode would change what a blur kernel means.
        img = decode_image(data, max_pixels=max_pixels)
    except ImageError as err:
        raise source_changed(image_id, member, err) from None
    degraded = apply_degradation(np.asarray(img), op, json.loads(params))
    return resize_image(Image.fromarray(degraded), size, policy)


def run_degrade(
    *,
    out: str | Path,
    splits: PathOrFrame,
    manifest: PathOrFrame,
    variant: dict[str, Any],
    order: str,
    resolution: int,
    resized: str | Path | None = None,
    images: str | Path | None = None,
    policy: str | None = None,
    reduced_decode: bool | None = None,
    max_pixels: int | None = None,
    threads: int | None = None,
) -> None:
    """One resolution x one variant -> `out`: image_id, split, label, degradation, degradation_params + pixels.

    after_resize degrades the resize stage's table (`resized`); before_resize decodes the raw images (`images`),
    degrades them at source resolution and then resizes them with the resize stage's code.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown degrade order {order!r}; expected one of {', '.join(ORDERS)}")
    rows = plan_rows(split_members(splits, manifest), variant)
    counts = pd.crosstab(rows["degradation"], rows["split"], margins=True, margins_name="all")
    log.info(
        "variant %s at %dpx, %s; images per operation and split:\n%s",
        variant["name"],
        resolution,
        order,
        counts,
    )
    threads = threads or available_threads()
    if order == "after_resize":
        if resized is None:
            raise ValueError("order=after_resize needs `resized`, the resize stage's table")
        pixels, table_policy = _degrade_resized(rows, resized, resolution, threads)
        policy = table_policy or policy
    else:
        if images is None or policy is None or reduced_decode is None or max_pixels is None:
            raise ValueError(
                "order=before_resize needs `images`, `policy`, `reduced_decode` and `max_pixels`"
            )
        fn = functools.partial(
            _degrade_task,
            images=str(images),
            size=resolution,
            policy=policy,
            reduced_decode=reduced_decode,
            max_pixels=max_pixels,
        )
        tasks = list(
            zip(
                rows["image_id"],
                rows["member"],
                rows["sha256"],
                rows["degradation"],
                rows["degradation_params"],
                strict=True,
            )
        )
        pixels = map_images(
            fn, tasks, shape=(resolution, resolution, 3), threads=threads, desc=f"degrade {variant['name']}"
        )
    columns = ["image_id", "split", "label", "degradation", "degradation_params"]
    write_pixel_table(
        out,
        rows[columns],
        pixels,
        row_group_size=ROW_GROUP_SIZE,
        metadata={
            "resolution": str(resolution),
            "variant": variant["name"],
            "order": order,
            "policy": str(policy),
            "variant_settings": json.dumps(variant, sort_keys=True),
        },
    )
    log.info("wrote %s (%d images)", out, len(rows))
