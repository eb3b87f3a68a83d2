"""Decoding one image safely into upright 8-bit RGB.

Every way a file can be bad ends in an ImageError with a short machine-readable reason (used as the quarantine
reason) and a human-readable detail; nothing else escapes.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

REASONS = ("empty_file", "not_an_image", "too_many_pixels", "truncated", "corrupt")


class ImageError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _to_rgb8(img: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB. 16-bit and float greyscale are scaled by their true range, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: dermoscopy backgrounds are light, and black would invent a dark rim.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode `data` into an upright (EXIF-rotated) 8-bit RGB PIL image.

    `draft_size`: let a JPEG decode at reduced scale (1/2, 1/4, 1/8) as long as both sides stay at least this
    large: the decoder skips most of the work when the target is far smaller than the source.
    The pixel limit is checked on the header, before any pixel is decoded (decompression bombs).
    """
    if not data:
        raise ImageError("empty_file", "file has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # PIL's own message carries a memory address; keep the manifest reproducible.
        raise ImageError("not_an_image", "not a recognised image format") from None
    except Image.DecompressionBombWarning as err:  # raised as error by the filter above
        raise ImageError("too_many_pixels", str(err)) from None
    except Image.DecompressionBombError as err:
        raise ImageError("too_many_pixels", str(err)) from None
    except Exception as err:  # PIL raises assorted errors on malformed headers
        raise ImageError("corrupt", f"{type(err).__name__}: {err}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError("too_many_pixels", f"{width}x{height} = {width * height} pixels > {max_pixels}")
    if width == 0 or height == 0:
        raise ImageError("corrupt", f"zero-sized image {width}x{height}")
    try:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an upright image
        return _to_rgb8(img)
    except OSError as err:
        msg = str(err)
        reason = "truncated" if "truncated" in msg.lower() or "premature" in msg.lower() else "corrupt"
        raise ImageError(reason, msg) from None
    except Exception as err:
        raise ImageError("corrupt", f"{type(err).__name__}: {err}") from None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone, after EXIF orientation."""
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    orientation = img.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
