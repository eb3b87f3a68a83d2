"""The plan of a synthetic ISIC 2019 stand-in, from (n, seed) alone: its lesions (class, source, size, metadata,
in the real proportions), image ids, and the rows of the ground-truth and metadata CSVs. Drawing the images:
synth_draw.py; writing them in a source's layout: synth.py, synth_layouts.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dermcompress import ISIC_CLASSES

# Images per class in the real ISIC 2019 training set (25331 in all); UNK is a column but never set.
REAL_CLASS_COUNTS = {
    "MEL": 4522,
    "NV": 12875,
    "BCC": 3323,
    "AK": 867,
    "BKL": 2624,
    "DF": 239,
    "VASC": 253,
    "SCC": 628,
}
GT_COLUMNS = ["image", *ISIC_CLASSES, "UNK"]
METADATA_COLUMNS = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]

# Share of images per source, in order along the shuffled lesions: MSK downsampled, MSK full, HAM, BCN.
SOURCE_SHARES = (("MSK", True, 0.10), ("MSK", False, 0.015), ("HAM", False, 0.395), ("BCN", False, 0.49))
HAM_SIZE, BCN_SIZE = (600, 450), (1024, 1024)
MSK_SIZES = ((640, 480), (722, 542), (768, 576), (800, 600), (1024, 683), (1024, 768), (1200, 900))
MISSING_LESION_ID = 0.08
SITES = {  # real frequencies of anatom_site_general; None = empty cell
    "anterior torso": 6915,
    "lower extremity": 4990,
    "head/neck": 4587,
    "upper extremity": 2910,
    "posterior torso": 2787,
    "palms/soles": 398,
    "oral/genital": 59,
    "lateral torso": 54,
    None: 2631,
}
MEAN_AGE = {"MEL": 60, "NV": 45, "BCC": 67, "AK": 70, "BKL": 62, "DF": 48, "VASC": 50, "SCC": 70}


@dataclass
class Lesion:
    index: int
    label: str
    size: int  # number of images
    lesion_id: str | None
    source: str = "HAM"
    downsampled: bool = False
    image_size: tuple[int, int] = HAM_SIZE
    sex: str | None = None
    site: str | None = None
    age: float | None = None


def class_counts(n: int) -> dict[str, int]:
    """Images per class: the real proportions (largest remainder), every class at least once if n >= 40."""
    total = sum(REAL_CLASS_COUNTS.values())
    exact = {c: n * k / total for c, k in REAL_CLASS_COUNTS.items()}
    counts = {c: int(v) for c, v in exact.items()}
    for c in sorted(exact, key=lambda c: counts[c] - exact[c])[: n - sum(counts.values())]:
        counts[c] += 1
    floor = 1 if n >= 40 else 0
    for c in counts:
        while counts[c] < floor:  # take from the largest class (NV)
            counts[c] += 1
            counts[max(counts, key=counts.get)] -= 1
    return counts


def _plan_lesions(n: int, rng: np.random.Generator) -> list[Lesion]:
    """Group images into lesions (same lesion: same class, source, look) and give each its metadata."""
    lesions: list[Lesion] = []
    for label, count in class_counts(n).items():
        # Images without a lesion id are single-image lesions, so no group is hidden from the grouped split.
        n_missing = round(MISSING_LESION_ID * count)
        sizes = [1] * n_missing
        left = count - n_missing
        while left > 0:
            size = min(left, 1 + min(int(rng.poisson(0.8)), 4))
            sizes.append(size)
            left -= size
        for i, size in enumerate(sizes):
            lesions.append(Lesion(len(lesions), label, size, None if i < n_missing else ""))
    order = rng.permutation(len(lesions))
    lesions = [lesions[i] for i in order]
    lesion_numbers = iter(sorted(rng.choice(10_000_000, size=len(lesions), replace=False).tolist()))
    sites, site_weights = list(SITES), np.array(list(SITES.values()), float)
    done = 0
    for lesion in lesions:
        # Sources take consecutive runs of the shuffled lesions, so their shares hold even for small n.
        position, cumulative = done / max(n, 1), 0.0
        for source, downsampled, share in SOURCE_SHARES:
            cumulative += share
            if position < cumulative or source == SOURCE_SHARES[-1][0]:
                lesion.source, lesion.downsampled = source, downsampled
                break
        done += lesion.size
        if lesion.source == "BCN":
            lesion.image_size = BCN_SIZE
        elif lesion.source == "MSK":
            lesion.image_size = MSK_SIZES[int(rng.integers(len(MSK_SIZES)))]
        if lesion.lesion_id is not None:
            lesion.lesion_id = f"IL_{next(lesion_numbers):07d}"
        u = rng.random()
        lesion.sex = "male" if u < 0.52 else "female" if u < 0.985 else None
        lesion.site = sites[int(rng.choice(len(sites), p=site_weights / site_weights.sum()))]
        age = rng.normal(MEAN_AGE[lesion.label], 15)
        lesion.age = float(np.clip(5 * round(age / 5), 0, 85))
    return lesions


@dataclass
class Plan:
    """The images of a synthetic set: (image id, its lesion, its slot) in draw order, and each image's row of
    the ISIC 2019 ground truth and metadata (the other layouts derive theirs from the same)."""

    lesions: list[Lesion]
    slots: list[tuple[str, Lesion, int]]
    gt_rows: list[dict]
    meta_rows: list[dict]


def plan_images(n: int, seed: int) -> Plan:
    """Lesions, image ids and the rows of both CSVs, from (n, seed) alone."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    lesions = _plan_lesions(n, rng)
    numbers = rng.choice(73_255, size=n, replace=False)  # real ids run ISIC_0000000..ISIC_0073254
    gt_rows, meta_rows, slots = [], [], []
    slot = 0
    for lesion in lesions:
        for _ in range(lesion.size):
            image_id = f"ISIC_{numbers[slot]:07d}" + ("_downsampled" if lesion.downsampled else "")
            slots.append((image_id, lesion, slot))
            gt_rows.append({"image": image_id, **{c: float(c == lesion.label) for c in GT_COLUMNS[1:]}})
            age = lesion.age if rng.random() > 0.017 else None  # ~1.7% of real rows have no age
            meta_rows.append(
                {
                    "image": image_id,
                    "age_approx": age,
                    "anatom_site_general": lesion.site,
                    "lesion_id": lesion.lesion_id,
                    "sex": lesion.sex,
                }
            )
            slot += 1
    return Plan(lesions, slots, gt_rows, meta_rows)
