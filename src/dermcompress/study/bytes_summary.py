"""What the images cost to send or store: bytes per image per resolution x variant x split, from the caches.

Each cache's _info.json records, per split, the mean and median encoded bytes of its images (cache.bytes_stats:
the codec's bytes where the variant encodes, else a lossless PNG's). This table puts them side by side, with
bits per pixel and the ratio to the lossless PNG of the same split at the highest resolution: the "what do we
save" of the study, in bytes. It reads only the caches' _info.json files, so it is cheap; the data summary
(tables.data_summary) reads the manifest and split alone and does not rerun when a codec changes.
"""

from __future__ import annotations

import logging
from html import escape
from pathlib import Path

import pandas as pd

from dermcompress.data.cache import SPLITS, load_info

log = logging.getLogger(__name__)

COLUMNS = (
    "res",
    "variant",
    "split",
    "codec",
    "quality",
    "images",
    "mean_kb",
    "median_kb",
    "bpp",
    "png_ratio",
)
REFERENCE_VARIANT = "clean"  # every image of it is a PNG of the resized pixels
HEADERS = {
    "res": "Resolution (px)",
    "variant": "Variant",
    "split": "Split",
    "codec": "Codec",
    "quality": "Quality",
    "images": "Images",
    "mean_kb": "Mean kB/image",
    "median_kb": "Median kB/image",
    "bpp": "Bits/pixel",
    "png_ratio": "× PNG at top res.",
}


def bytes_table(caches: list[str | Path]) -> pd.DataFrame:
    """One row per cache (`.../{res}px/{variant}`) and split: COLUMNS. `png_ratio` divides the mean bytes by
    the clean variant's at the highest resolution (its PNGs), split by split; NaN without that cache."""
    rows = []
    for cache in caches:
        info = load_info(cache)
        res, variant = int(info["height"]), info.get("variant") or Path(cache).name
        if "bytes" not in info:
            raise ValueError(
                f"{cache}/_info.json has no bytes per image: a cache from before they were recorded"
            )
        for split in SPLITS:
            if split in info["bytes"]:
                stats = info["bytes"][split]
                rows.append({"res": res, "variant": variant, "split": split, **stats})
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "png_ratio"])
    top = table[(table["variant"] == REFERENCE_VARIANT) & (table["res"] == table["res"].max())]
    reference = top.set_index("split")["mean_kb"]
    table["png_ratio"] = table["mean_kb"] / table["split"].map(reference)
    return table.astype({"quality": "Int64"})


def split_bytes(table: pd.DataFrame) -> pd.DataFrame:
    """(res, variant) -> kB per image, bits per pixel, codec and quality of the test split, which tables report
    beside the metrics (evaluations score the test split)."""
    test = table[table["split"] == "test"]
    return test.set_index(["res", "variant"])[["mean_kb", "bpp", "codec", "quality"]]


def display(table: pd.DataFrame) -> pd.DataFrame:
    shown = table.copy()
    for column, digits in (("mean_kb", 2), ("median_kb", 2), ("bpp", 3), ("png_ratio", 3)):
        shown[column] = shown[column].map(lambda v, d=digits: f"{v:.{d}f}" if pd.notna(v) else "—")
    shown["quality"] = shown["quality"].map(lambda q: "—" if pd.isna(q) else str(q))
    return shown.rename(columns=HEADERS)


NOTE = (
    "kB = 1000 bytes. An image's bytes: its codec's where the variant encodes it (or, for the jpeg degradation, "
    "its JPEG's), else a lossless PNG of the cached pixels (OpenCV's defaults). × PNG at top res.: the mean "
    "against the clean variant's PNGs of the same split at the highest resolution."
)


def run_bytes_summary(*, caches: list[str], csv: str, md: str, html: str) -> pd.DataFrame:
    table = bytes_table(caches)
    table.to_csv(csv, index=False)
    shown = display(table)
    Path(md).write_text(f"**Bytes per image**\n\n{shown.to_markdown(index=False)}\n\n{NOTE}\n")
    styled = shown.style.hide(axis="index").set_caption("Bytes per image")
    Path(html).write_text(
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Bytes per image</title></head><body>\n"
        + styled.to_html()
        + f"<p>{escape(NOTE)}</p>\n</body></html>\n"
    )
    log.info("%s: %d rows from %d caches", csv, len(table), len(caches))
    return table
