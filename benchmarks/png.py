"""The lossless reference: which PNG encoder, at which setting, is a tight baseline for "x PNG" savings.

Every cached image without a transmission codec records the bytes of a lossless PNG of its pixels (codec.py),
and every saving a table or figure shows is a ratio to it: a loose PNG overstates them all. This measures, per
resolution (224/112/56 px), the mean bytes and the milliseconds per image on one core of OpenCV's PNG at its
zlib levels, strategies and row filters (libpng's adaptive choice when none is named; OpenCV 5's default is
level 1, RLE, the `sub` filter alone) and Pillow's at its levels (and `optimize`), on three kinds of image:

- synthetic: the workflow's own synthetic set (data/synth.py, 60 images of the real sizes), resized as the
  resize stage does (resize.resize_image, squash);
- photo-like: benchmarks/prep.py's images (a skin-coloured field, lesion-like blobs, blurred-noise texture;
  JPEG q90 of the real sizes), resized likewise;
- natural: colour images with a 1/f amplitude spectrum (the power law natural photographs follow), drawn at
  1024 px and resized likewise.

    .venv/bin/python benchmarks/png.py [--n 60] [--repeats 3]

Every encode is checked to decode to the same pixels (lossless). Sizes are the mean over the images, times the
best of `--repeats` passes over them (per image).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from prep import noise_tiles, photo_like

from dermcompress.data.resize import resize_image
from dermcompress.data.synth import make_synthetic

RESOLUTIONS = (224, 112, 56)


def cv2_png(level: int, strategy: int, png_filter: int | None = None):
    def encode(rgb: np.ndarray) -> bytes:
        params = [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_STRATEGY, strategy]
        if png_filter is not None:
            params += [cv2.IMWRITE_PNG_FILTER, png_filter]
        ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]), params)
        assert ok
        return data.tobytes()

    return encode


def pil_png(level: int, optimize: bool = False):
    def encode(rgb: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=level, optimize=optimize)
        return buf.getvalue()

    return encode


def cv2_default(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    return data.tobytes()


ENCODERS = {
    "opencv default": cv2_default,
    "opencv 1 RLE": cv2_png(1, cv2.IMWRITE_PNG_STRATEGY_RLE),
    "opencv 1 RLE sub": cv2_png(1, cv2.IMWRITE_PNG_STRATEGY_RLE, cv2.IMWRITE_PNG_FILTER_SUB),
    "opencv 1 RLE avg": cv2_png(1, cv2.IMWRITE_PNG_STRATEGY_RLE, cv2.IMWRITE_PNG_FILTER_AVG),
    "opencv 1 RLE paeth": cv2_png(1, cv2.IMWRITE_PNG_STRATEGY_RLE, cv2.IMWRITE_PNG_FILTER_PAETH),
    "opencv 1": cv2_png(1, cv2.IMWRITE_PNG_STRATEGY_DEFAULT),
    "opencv 3": cv2_png(3, cv2.IMWRITE_PNG_STRATEGY_DEFAULT),
    "opencv 6": cv2_png(6, cv2.IMWRITE_PNG_STRATEGY_DEFAULT),
    "opencv 9": cv2_png(9, cv2.IMWRITE_PNG_STRATEGY_DEFAULT),
    "opencv 6 filtered": cv2_png(6, cv2.IMWRITE_PNG_STRATEGY_FILTERED),
    "pillow 1": pil_png(1),
    "pillow 3": pil_png(3),
    "pillow 6": pil_png(6),
    "pillow 9": pil_png(9),
    "pillow 9 optimize": pil_png(9, optimize=True),
}


def sources(n: int, tmp: Path) -> dict[str, list[Image.Image]]:
    """Full-size images of each kind, as PIL images."""
    root = make_synthetic(tmp / "synth", n=n, seed=0)
    synthetic = [Image.open(p).convert("RGB") for p in sorted(root.glob("ISIC_2019_Training_Input/*.jpg"))]
    tiles = noise_tiles(np.random.default_rng(12345))
    photo = [Image.open(io.BytesIO(photo_like(i, tiles))).convert("RGB") for i in range(n)]
    rng = np.random.default_rng(7)
    natural = [Image.fromarray(pink_noise(rng, 1024)) for _ in range(n)]
    return {"synthetic": synthetic, "photo-like": photo, "natural (1/f)": natural}


def pink_noise(rng: np.random.Generator, side: int) -> np.ndarray:
    """An RGB image whose amplitude spectrum falls as 1/f (channels correlated, as in photographs)."""
    fy, fx = np.meshgrid(np.fft.fftfreq(side), np.fft.rfftfreq(side), indexing="ij")
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    base = np.fft.irfft2(np.fft.rfft2(rng.normal(size=(side, side))) / f, s=(side, side))
    channels = []
    for weight in (1.0, 0.85, 0.7):
        own = np.fft.irfft2(np.fft.rfft2(rng.normal(size=(side, side))) / f, s=(side, side))
        channels.append(weight * base + 0.3 * own)
    img = np.stack(channels, -1)
    img = (img - img.mean()) / img.std() * 40 + 128
    return np.clip(img, 0, 255).astype(np.uint8)


def measure(images: list[np.ndarray], encode, repeats: int) -> tuple[float, float]:
    """(mean bytes, ms per image: best of `repeats` passes)."""
    sizes = []
    for image in images:
        data = encode(image)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), image), "not lossless"
        sizes.append(len(data))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for image in images:
            encode(image)
        best = min(best, (time.perf_counter() - start) / len(images))
    return float(np.mean(sizes)), best * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        kinds = sources(args.n, Path(tmp))
    print(
        f"PNG encoders, {args.n} images of each kind, one core: mean kB (kB = 1000 bytes), ms per image, and"
    )
    print("the size relative to Pillow level 6 (Pillow's default)")
    for kind, full in kinds.items():
        print(f"\n{kind}")
        print(f"  {'encoder':<19}" + "".join(f"{f'{r} px: kB  ms  vs pil6':>29}" for r in RESOLUTIONS))
        resized = {r: [np.asarray(resize_image(img, r, "squash")) for img in full] for r in RESOLUTIONS}
        results = {
            name: {r: measure(resized[r], enc, args.repeats) for r in RESOLUTIONS}
            for name, enc in ENCODERS.items()
        }
        for name, by_res in results.items():
            cells = [
                f"{size / 1000:8.2f} {ms:6.2f} {size / results['pillow 6'][r][0]:7.3f}"
                for r, (size, ms) in by_res.items()
            ]
            print(f"  {name:<19}" + "".join(f"{c:>29}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
