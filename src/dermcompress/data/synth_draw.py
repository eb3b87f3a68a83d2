"""What a synthetic lesion looks like, and drawing, encoding and writing the images of a synthetic set
(synth_plan.py plans them, synth.py and synth_layouts.py lay them out per source).

Without planted effects, MEL and NV differ visibly even at 32 px: MEL is a large, dark, irregular,
multi-coloured blob (blue-grey, black, red); NV a small, regular, uniform brown one. With them
(synth_planted.py), MEL and NV share one look and two signs of known share tell them apart. Every image has
its own generator, seeded from (seed, its slot), so the bytes do not depend on the threads that draw them.
"""

from __future__ import annotations

import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from dermcompress.data.synth_plan import Lesion, Plan
from dermcompress.data.synth_planted import LOOK, Planted, planted_shape, texture

JPEG_QUALITY = 90
ZIP_TIME = (2019, 7, 1, 0, 0, 0)  # fixed, so the zip is byte-identical between runs
# First words of the documents a synthetic set carries: a folder that starts so may be replaced by a rerun.
MARKER = "SYNTHETIC ISIC 2019 STAND-IN"
# Longest side of the canvas the scene is drawn on before upscaling (fast, and smooth like skin).
LOW_RES = 128
PLANTED_CLASSES = ("MEL", "NV")  # the classes planted effects (synth_planted.py) redraw

# Per class: lesion radius range (fraction of half the short side), boundary irregularity, edge softness,
# opacity, base colour (RGB) and the palette its inner blotches are drawn from.
LOOKS = {
    "MEL": dict(
        radius=(0.38, 0.75),
        irregular=0.16,
        edge=0.18,
        opacity=1.0,
        base=(92, 56, 36),
        blotches=((105, 115, 140), (35, 25, 25), (165, 60, 60), (60, 35, 25), (150, 110, 90)),
        n_blotches=(4, 7),
    ),
    "NV": dict(
        radius=(0.18, 0.42),
        irregular=0.03,
        edge=0.10,
        opacity=0.95,
        base=(135, 88, 58),
        blotches=(),
        n_blotches=(0, 0),
    ),
    "BCC": dict(
        radius=(0.3, 0.5),
        irregular=0.08,
        edge=0.3,
        opacity=0.75,
        base=(205, 140, 140),
        blotches=((110, 120, 150), (190, 60, 70)),
        n_blotches=(2, 4),
    ),
    "AK": dict(
        radius=(0.35, 0.6),
        irregular=0.1,
        edge=0.4,
        opacity=0.6,
        base=(205, 120, 110),
        blotches=((235, 220, 210),),
        n_blotches=(2, 5),
    ),
    "BKL": dict(
        radius=(0.35, 0.6),
        irregular=0.09,
        edge=0.15,
        opacity=0.9,
        base=(165, 118, 80),
        blotches=((190, 150, 110), (120, 85, 60)),
        n_blotches=(2, 4),
    ),
    "DF": dict(
        radius=(0.2, 0.34),
        irregular=0.04,
        edge=0.3,
        opacity=0.85,
        base=(160, 110, 80),
        blotches=((230, 205, 195),),
        n_blotches=(1, 1),
    ),
    "VASC": dict(
        radius=(0.2, 0.38),
        irregular=0.07,
        edge=0.12,
        opacity=1.0,
        base=(150, 40, 60),
        blotches=((105, 30, 80), (185, 50, 60)),
        n_blotches=(3, 5),
    ),
    "SCC": dict(
        radius=(0.3, 0.5),
        irregular=0.09,
        edge=0.25,
        opacity=0.85,
        base=(215, 140, 130),
        blotches=((235, 220, 180), (185, 60, 60)),
        n_blotches=(2, 3),
    ),
}


def _skin_tone(rng: np.random.Generator) -> np.ndarray:
    red = rng.uniform(195, 238)
    green = red * rng.uniform(0.7, 0.82)
    return np.array([red, green, green * rng.uniform(0.8, 0.92)])


def _shape_params(look: dict, rng: np.random.Generator) -> dict:
    """What stays the same across the images of one lesion: shape, colours, blotch layout."""
    harmonics = np.arange(2, 9)
    amplitude = look["irregular"] * rng.uniform(0.5, 1.0, harmonics.size) / np.sqrt(harmonics - 1)
    base = np.clip(np.array(look["base"], float) * rng.uniform(0.85, 1.15), 0, 255)
    n_blotch = int(rng.integers(look["n_blotches"][0], look["n_blotches"][1] + 1))
    palette = look["blotches"]
    blotches = [
        (
            rng.uniform(0, 0.55),  # distance from centre, in lesion radii
            rng.uniform(0, 2 * np.pi),  # angle
            rng.uniform(0.2, 0.45),  # blotch radius, in lesion radii
            np.array(palette[int(rng.integers(len(palette)))], float),
            rng.uniform(0.6, 0.95),  # strength
        )
        for _ in range(n_blotch)
    ]
    if look is LOOKS["DF"]:  # dermatofibroma: the white patch sits in the middle
        blotches = [(0.0, 0.0, 0.45, np.array(palette[0], float), 0.9)]
    return {
        "radius": rng.uniform(*look["radius"]),
        "harmonics": harmonics,
        "amplitude": amplitude,
        "phase": rng.uniform(0, 2 * np.pi, harmonics.size),
        "base": base,
        "blotches": blotches,
        "centre": rng.uniform(-0.15, 0.15, 2),
        "skin": _skin_tone(rng),
    }


def _draw(
    look: dict,
    shape: dict,
    size: tuple[int, int],
    source: str,
    rng: np.random.Generator,
    planted: Planted | None = None,
) -> np.ndarray:
    """One RGB uint8 image of `size` (width, height): skin, lesion (with `planted`'s fine sign when its shape
    carries it), maybe hairs and a dermoscope rim."""
    width, height = size
    scale = LOW_RES / max(width, height)
    w0, h0 = max(8, round(width * scale)), max(8, round(height * scale))
    unit = min(w0, h0) / 2
    yy, xx = np.mgrid[0:h0, 0:w0].astype(np.float64)
    x, y = (xx - w0 / 2) / unit, (yy - h0 / 2) / unit

    # Skin: per-image tone, a lighting gradient and blotchy low-frequency noise.
    skin = shape["skin"] * rng.uniform(0.93, 1.07)
    tilt = rng.uniform(-0.06, 0.06, 2)
    light = 1 + tilt[0] * x + tilt[1] * y - 0.05 * (x**2 + y**2)
    img = skin[None, None, :] * light[..., None] + rng.normal(0, 3.5, (h0, w0, 3))

    # Lesion: same shape for the lesion, rotated, shifted and rescaled a little per image.
    rotation = rng.uniform(0, 2 * np.pi)
    cx, cy = shape["centre"] + rng.uniform(-0.08, 0.08, 2)
    radius = shape["radius"] * rng.uniform(0.9, 1.1)
    dx, dy = x - cx, y - cy
    dist, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    wobble = np.cos(shape["harmonics"][:, None, None] * (theta - rotation) + shape["phase"][:, None, None])
    boundary = radius * (1 + np.tensordot(shape["amplitude"], wobble, axes=1))
    d = dist / boundary
    alpha = np.clip((1 - d) / look["edge"], 0, 1) * look["opacity"]
    colour = shape["base"][None, None, :] * (0.9 + 0.12 * np.clip(d, 0, 1))[..., None]
    for b_dist, b_angle, b_radius, b_colour, strength in shape["blotches"]:
        bx = cx + radius * b_dist * np.cos(b_angle + rotation)
        by = cy + radius * b_dist * np.sin(b_angle + rotation)
        weight = strength * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * (radius * b_radius) ** 2))
        colour = colour * (1 - weight[..., None]) + b_colour[None, None, :] * weight[..., None]
    img = img * (1 - alpha[..., None]) + colour * alpha[..., None]

    if source == "BCN" and rng.random() < 0.5:  # the dark circular rim of a contact dermoscope
        rim = np.clip((np.hypot(x, y) - 0.97) / 0.06, 0, 1)
        img = img * (1 - rim[..., None]) + 15 * rim[..., None]

    img = np.clip(img, 0, 255).astype(np.uint8)
    big = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
    if shape.get("textured"):  # at full size: the low-resolution canvas could not hold its frequency
        mask = cv2.resize(alpha.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        dots = texture(width, height, planted.cycles, shape["texture_phase"])
        gain = 1 + planted.contrast * dots * mask
        big = np.clip(big * gain[..., None], 0, 255).astype(np.uint8)
    if rng.random() < 0.3:  # hairs, independent of the class
        for _ in range(int(rng.integers(1, 7))):
            # A quadratic Bezier curve: hairs bend, they do not zigzag.
            start, bend, end = rng.uniform(-0.1, 1.1, (3, 2)) * [width, height]
            t = np.linspace(0, 1, 24)[:, None]
            points = (1 - t) ** 2 * start + 2 * t * (1 - t) * bend + t**2 * end
            thickness = max(1, round(min(width, height) / 400 * rng.uniform(1, 2.5)))
            cv2.polylines(big, [points.astype(np.int32)], False, (45, 32, 25), thickness, cv2.LINE_AA)
    return big


def _encode(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return buf.tobytes()


def _workers() -> int:
    return max(
        1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


def look_of(lesion: Lesion, planted: Planted | None) -> dict:
    """The look a lesion is drawn with: its class's, or with planted effects the one MEL and NV share."""
    return LOOK if planted is not None and lesion.label in PLANTED_CLASSES else LOOKS[lesion.label]


def lesion_shapes(plan: Plan, seed: int, planted: Planted | None = None) -> dict[int, dict]:
    """Lesion index -> what its images share (_shape_params), with its planted signs (synth_planted.py)."""
    shapes = {}
    for lesion in plan.lesions:
        shape = _shape_params(look_of(lesion, planted), np.random.default_rng([seed, 1, lesion.index]))
        if planted is not None and lesion.label in PLANTED_CLASSES:
            shape = planted_shape(shape, planted.lesion_cues(lesion, seed))
        shapes[lesion.index] = shape
    return shapes


def render_images(
    plan: Plan, seed: int, writer_of, name_of=lambda image_id: image_id, planted: Planted | None = None
) -> None:
    """Draw and encode every image of `plan` into `writer_of(image_id)` as `<name_of(image_id)>.jpg`."""
    shapes = lesion_shapes(plan, seed, planted)

    def render(item: tuple[str, Lesion, int]) -> tuple[str, bytes]:
        image_id, lesion, slot = item  # each image has its own generator: threads cannot change the bytes
        image_rng = np.random.default_rng([seed, 2, slot])
        look = look_of(lesion, planted)
        rgb = _draw(look, shapes[lesion.index], lesion.image_size, lesion.source, image_rng, planted)
        return image_id, _encode(rgb)

    todo = sorted(plan.slots, key=lambda item: item[0])
    # OpenCV and numpy release the GIL, so threads draw and encode in parallel; files are written in order, a
    # chunk at a time to bound memory.
    with (
        ThreadPoolExecutor(max_workers=_workers()) as pool,
        tqdm(total=len(todo), desc="synth", unit="img", mininterval=5) as bar,
    ):
        for start in range(0, len(todo), 64):
            for image_id, data in pool.map(render, todo[start : start + 64]):
                writer_of(image_id).write(f"{name_of(image_id)}.jpg", data)
                bar.update()


class ImageWriter:
    """Writes an image container's members either as files of a folder or as entries of a zip (under
    `prefix/`, with fixed metadata so the zip is byte-identical between runs)."""

    def __init__(self, folder: Path, archive: Path | None = None, prefix: str | None = None) -> None:
        self.archive, self.prefix, self.folder = None, prefix, folder
        if archive is not None:
            self.archive = zipfile.ZipFile(archive, "w")
            if prefix:
                self._entry(f"{prefix}/", b"")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.bytes = 0

    def _entry(self, name: str, data: bytes, compress: int = zipfile.ZIP_STORED) -> None:
        info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
        info.create_system = 3  # unix, whatever the platform, for identical bytes
        info.external_attr = (0o40755 << 16 | 0x10) if name.endswith("/") else (0o644 << 16)
        info.compress_type = compress
        self.archive.writestr(info, data)

    def write(self, name: str, data: bytes) -> None:
        self.bytes += len(data)
        if self.archive is None:
            (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
            (self.folder / name).write_bytes(data)
        else:  # JPEGs do not deflate; text does
            compress = zipfile.ZIP_STORED if name.endswith(".jpg") else zipfile.ZIP_DEFLATED
            self._entry(f"{self.prefix}/{name}" if self.prefix else name, data, compress)

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()
