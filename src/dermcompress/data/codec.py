"""What an image costs on the wire: the transmission codecs (JPEG, WebP, AVIF) and the lossless reference (PNG).

A data variant may declare a codec (`degrade.variants.NAME.codec`): every image of its chosen splits is encoded
with it after resizing, as an app would send it, and the cache stores the decoded pixels and the encoded size.
Every other cached image records the size of a lossless PNG of its pixels, the reference a codec is compared
with. Pillow encodes all three codecs (and releases the GIL while it does, so a thread pool pays).

The PNG is OpenCV's at zlib level 1 with the RLE strategy, both pinned (PNG_SETTINGS): every "x PNG" saving is
a ratio to it, so it must be a tight lossless baseline, and a library's default may move (OpenCV 5's default
PNG is not its old level 1 RLE). `benchmarks/png.py` (60 images of each kind, one core) measured it 1-7%
smaller than Pillow's default (level 6) at 224, 112 and 56 px: on the synthetic set 0.93-0.98x, on
photo-like images 0.98-0.99x, on 1/f "natural" images 0.98-0.99x; within 0.5% of the smallest option tried
(Pillow level 9 with `optimize`, 3-30x slower); and it takes ~3-5 ms an image at 224 px where Pillow's level 6
takes ~30 ms. OpenCV's default PNG (5.0) is 3-9% larger than Pillow level 6 at 224 and 112 px and up to 21%
at 56 px on photo-like images, which would overstate every saving by that much.
"""

from __future__ import annotations

import io
from typing import Any

import cv2
import numpy as np
from PIL import Image

FORMATS = ("jpeg", "webp", "avif")
REFERENCE = "png"
# JPEG chroma subsampling -> Pillow's code for it.
SUBSAMPLING = {"4:2:0": 2, "4:4:4": 0}
DEFAULT_SUBSAMPLING = "4:2:0"
# The lossless reference's encoder settings, pinned (module docstring): zlib level 1, RLE strategy.
PNG_SETTINGS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]


def codec_settings(codec: dict[str, Any]) -> dict[str, Any]:
    """A variant's `codec:` with its defaults filled in (JPEG's subsampling), as it is recorded."""
    fmt = str(codec["format"])
    if fmt not in FORMATS:
        raise ValueError(f"unknown codec format {fmt!r}; expected one of {', '.join(FORMATS)}")
    settings = {"format": fmt, "quality": int(codec["quality"])}
    if fmt == "jpeg":
        settings["subsampling"] = str(codec.get("subsampling", DEFAULT_SUBSAMPLING))
    elif "subsampling" in codec:
        raise ValueError(f"subsampling is a JPEG setting; {fmt} takes none")
    return settings


def describe(codec: dict[str, Any] | None) -> str:
    """'JPEG q75 4:2:0', 'AVIF q40', or 'PNG' (no codec)."""
    if not codec:
        return REFERENCE.upper()
    sub = f" {codec['subsampling']}" if codec.get("subsampling") else ""
    return f"{codec['format'].upper()} q{codec['quality']}{sub}"


def encode(pixels: np.ndarray, codec: dict[str, Any]) -> bytes:
    """(H, W, 3) uint8 RGB -> the bytes `codec` (codec_settings) sends."""
    settings = codec_settings(codec)
    options: dict[str, Any] = {"quality": settings["quality"]}
    if settings["format"] == "jpeg":
        options["subsampling"] = SUBSAMPLING[settings["subsampling"]]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=settings["format"].upper(), **options)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def transmit(pixels: np.ndarray, codec: dict[str, Any]) -> tuple[np.ndarray, int]:
    """The pixels a receiver decodes after `codec`, and the bytes it was sent."""
    data = encode(pixels, codec)
    return decode(data), len(data)


def png_size(pixels: np.ndarray) -> int:
    """Bytes of a lossless PNG of (H, W, 3) uint8 RGB pixels (OpenCV, PNG_SETTINGS: the module docstring)."""
    ok, data = cv2.imencode(".png", np.ascontiguousarray(pixels[..., ::-1]), PNG_SETTINGS)
    if not ok:
        raise ValueError(f"OpenCV could not encode {pixels.shape} pixels as PNG")
    return int(data.size)
