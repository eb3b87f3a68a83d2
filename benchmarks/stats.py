"""The paired comparisons' error rates by simulation: the type-I error of every test the tables offer under
lesion clustering and seed-to-seed variance, and their power against planted differences, at ISIC 2019's test
size (about 1,800 images in about 1,300 lesion groups).

    .venv/bin/python benchmarks/stats.py [--sims 2000] [--power-sims 300] [--bootstrap 200] [--workers 2]
                                         [--only paired|interaction]

Each simulated data set scores the test images with runs whose scores share, by design, what real runs share:

    score = (d + planted + seed effect) * label + lesion + lesion x recipe + lesion x run + image + noise

The lesion effects make images of one lesion correlated (within a run, and between runs: the clustering DeLong
ignores); the seed effect moves a run's AUC by a seed SD (0.02 or 0.04) around its recipe's. Labels are per
lesion. A *same models* contrast scores one recipe's five runs under two test conditions that perturb the
scores alike (a lesion effect and noise per condition), so their AUCs are equal in expectation given the models;
a *recipe* contrast compares five runs of each of two recipes drawn alike. Under the null both sides are
distributed identically, so the null holds exactly by symmetry; a planted Δ lowers one side's discrimination so
that its AUC falls by Δ (binormal: AUC = Φ(d / √(2σ²)) for scores of two lesions). Balanced accuracy thresholds
each score at d / 2.

An *interaction* (a difference of contrasts, an experiment's `interaction:`) scores two recipes, models A and B
(five runs each), on a clean and a codec test condition; the codec lowers each run's AUC by its model's cost,
which varies over seeds (cost SD), and its lesion effect and noise are the same images' for both models. Under
the null the codec costs both models alike (0.05), so A and B are exchangeable and (B's cost - A's cost) is 0 in
expectation; a planted Δ makes the codec cost B that much less. Tested as the tables test it
(contrasts.interaction: bootstrap + both recipes' seed variance, Welch t); for comparison, the same difference
with the models held fixed (no seed variance, z), not offered.

Tests, as the tables compute them (study/compare.py, contrasts.py, clustered_roc.py): the group bootstrap
(z for same models; + seed variance and Welch t for recipes) for Δ AUC and Δ balanced accuracy, and Obuchowski's
clustered ROC test (+ seed variance for recipes) for Δ AUC. For comparison, the tests the tables offered before
(not offered now): image-level DeLong and the bootstrap p read off the resample distribution, both holding the
models fixed. A valid test rejects a null at α = 0.05 about 5% of the time: the target is ≤ 6.5% (a valid test's
Monte Carlo SE over 2,000 nulls is 0.5%). The bootstrap here resamples 200 times (the tables' default is
`training.n_bootstrap` = 1000): a noisier standard error can only raise the type-I error, so a pass here holds
for the tables. Exits 1 if an offered test misses the target.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one process per core, each single-threaded
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from scipy.stats import norm

from dermcompress.learn import bootstrap
from dermcompress.study.clustered_roc import auc_difference
from dermcompress.study.compare import row_scores
from dermcompress.study.contrasts import RowScores, difference, interaction

ALPHA = 0.05
TARGET = 0.065
SEEDS = 5
BASE_AUC = 0.85
# SDs of the score components (within a class): lesion (shared by every run), lesion x recipe, lesion x run,
# image (shared by every run) and run noise; a test condition adds a lesion effect and noise of its own.
SD = {"lesion": 0.6, "lesion_recipe": 0.4, "lesion_run": 0.3, "image": 0.3, "noise": 0.5}
CONDITION_SD = {"lesion": 0.3, "noise": 0.3}
# Images per lesion: ISIC 2019-like (1-3, mean 1.36), or all 1, or all 3; about 1,800 images each.
LESIONS = {"1-3": (1300, [0.74, 0.16, 0.10]), "1": (1800, [1.0]), "3": (600, [0.0, 0.0, 1.0])}
OFFERED = ("bootstrap Δ AUC", "bootstrap Δ bal. acc.", "Obuchowski Δ AUC")
BEFORE = ("image-level DeLong, models fixed", "bootstrap percentile p, models fixed")


@dataclass(frozen=True)
class Scenario:
    contrast: str  # "same models" or "recipe"
    per_lesion: str  # a LESIONS key
    seed_sd: float  # SD of a run's AUC over seeds
    delta: float  # planted fall in AUC (0: a null)

    def describe(self) -> str:
        return f"{self.contrast:<11} {self.per_lesion:>5} {self.seed_sd:>7.2f} {self.delta:>6.2f}"


NULLS = [
    Scenario("same models", "1-3", 0.02, 0.0),
    Scenario("same models", "3", 0.04, 0.0),
    Scenario("recipe", "1", 0.02, 0.0),
    Scenario("recipe", "1", 0.04, 0.0),
    Scenario("recipe", "1-3", 0.0, 0.0),
    Scenario("recipe", "1-3", 0.02, 0.0),
    Scenario("recipe", "1-3", 0.04, 0.0),
    Scenario("recipe", "3", 0.02, 0.0),
]
POWER = [
    Scenario("same models", "1-3", 0.02, 0.03),
    Scenario("same models", "1-3", 0.02, 0.05),
    Scenario("recipe", "1-3", 0.02, 0.03),
    Scenario("recipe", "1-3", 0.02, 0.05),
]


# What the codec costs model A (AUC) in an interaction scenario; B's is this less the planted Δ.
CODEC_COST = 0.05
INTERACTION_OFFERED = (
    "bootstrap + seed var. interaction Δ AUC",
    "bootstrap + seed var. interaction Δ bal. acc.",
)
INTERACTION_BEFORE = ("interaction Δ AUC, models fixed (z)",)


@dataclass(frozen=True)
class InteractionScenario:
    per_lesion: str  # a LESIONS key
    seed_sd: float  # SD of a run's AUC over seeds
    cost_sd: float  # SD of a run's codec cost (AUC) over seeds
    delta: float  # how much less the codec costs model B than model A (0: a null)

    def describe(self) -> str:
        return f"{self.per_lesion:>5} {self.seed_sd:>7.2f} {self.cost_sd:>7.2f} {self.delta:>6.2f}"


INTERACTION_NULLS = [
    InteractionScenario("1-3", 0.02, 0.0, 0.0),
    InteractionScenario("1-3", 0.02, 0.01, 0.0),
    InteractionScenario("1-3", 0.04, 0.02, 0.0),
    InteractionScenario("1", 0.02, 0.01, 0.0),
    InteractionScenario("3", 0.02, 0.01, 0.0),
]
INTERACTION_POWER = [
    InteractionScenario("1-3", 0.02, 0.01, 0.02),
    InteractionScenario("1-3", 0.02, 0.01, 0.03),
    InteractionScenario("1-3", 0.02, 0.01, 0.05),
]


def _discrimination(auc: float, variance: float) -> float:
    """The class separation d that gives `auc` for binormal scores of within-class `variance`."""
    return float(np.sqrt(2 * variance) * norm.ppf(auc))


def simulate(
    scenario: Scenario, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list, list, float]:
    """(labels, lesion ids, scores of the side tested, scores of its reference, the class separation d), scores
    as lists of (N,) arrays, one per seed."""
    n_lesions, sizes_p = LESIONS[scenario.per_lesion]
    sizes = rng.choice(np.arange(1, len(sizes_p) + 1), size=n_lesions, p=sizes_p)
    lesion = np.repeat(np.arange(n_lesions), sizes)
    y = (rng.random(n_lesions) < 0.5).astype(int)[lesion]
    n = len(lesion)
    same = scenario.contrast == "same models"
    variance = sum(v**2 for v in SD.values()) + (sum(v**2 for v in CONDITION_SD.values()) if same else 0.0)
    d = _discrimination(BASE_AUC, variance)
    planted = _discrimination(BASE_AUC - scenario.delta, variance) - d
    slope = norm.pdf(norm.ppf(BASE_AUC)) / np.sqrt(2 * variance)  # dAUC / dd
    seed_sd = scenario.seed_sd / slope
    shared = SD["lesion"] * rng.normal(size=n_lesions)[lesion] + SD["image"] * rng.normal(size=n)

    def recipe(shift: float) -> list[np.ndarray]:
        lesion_recipe = SD["lesion_recipe"] * rng.normal(size=n_lesions)[lesion]
        return [
            (d + shift + seed_sd * rng.normal()) * y
            + shared
            + lesion_recipe
            + SD["lesion_run"] * rng.normal(size=n_lesions)[lesion]
            + SD["noise"] * rng.normal(size=n)
            for _ in range(SEEDS)
        ]

    if not same:
        return y, lesion, recipe(planted), recipe(0.0), d
    runs = recipe(0.0)

    def condition(shift: float) -> list[np.ndarray]:
        effect = CONDITION_SD["lesion"] * rng.normal(size=n_lesions)[lesion]
        return [s + shift * y + effect + CONDITION_SD["noise"] * rng.normal(size=n) for s in runs]

    return y, lesion, condition(planted), condition(0.0), d


def simulate_interaction(
    scenario: InteractionScenario, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list[list[np.ndarray]], float]:
    """(labels, lesion ids, the four rows' scores [A on the codec, A clean, B on the codec, B clean], each a
    list of (N,) arrays, one per seed, and the class separation d)."""
    n_lesions, sizes_p = LESIONS[scenario.per_lesion]
    sizes = rng.choice(np.arange(1, len(sizes_p) + 1), size=n_lesions, p=sizes_p)
    lesion = np.repeat(np.arange(n_lesions), sizes)
    y = (rng.random(n_lesions) < 0.5).astype(int)[lesion]
    n = len(lesion)
    variance = sum(v**2 for v in SD.values()) + sum(v**2 for v in CONDITION_SD.values())
    d = _discrimination(BASE_AUC, variance)
    slope = norm.pdf(norm.ppf(BASE_AUC)) / np.sqrt(2 * variance)  # dAUC / dd
    shared = SD["lesion"] * rng.normal(size=n_lesions)[lesion] + SD["image"] * rng.normal(size=n)
    # A condition's lesion effect is its images': the same for both models.
    effects = [CONDITION_SD["lesion"] * rng.normal(size=n_lesions)[lesion] for _ in range(2)]

    def model(cost: float) -> list[list[np.ndarray]]:
        lesion_recipe = SD["lesion_recipe"] * rng.normal(size=n_lesions)[lesion]
        runs = [
            (d + scenario.seed_sd / slope * rng.normal()) * y
            + shared
            + lesion_recipe
            + SD["lesion_run"] * rng.normal(size=n_lesions)[lesion]
            + SD["noise"] * rng.normal(size=n)
            for _ in range(SEEDS)
        ]
        shift = _discrimination(BASE_AUC - cost, variance) - d
        codec = [
            s
            + (shift + scenario.cost_sd / slope * rng.normal()) * y
            + effects[0]
            + CONDITION_SD["noise"] * rng.normal(size=n)
            for s in runs
        ]
        clean = [s + effects[1] + CONDITION_SD["noise"] * rng.normal(size=n) for s in runs]
        return [codec, clean]

    return y, lesion, [*model(CODEC_COST), *model(CODEC_COST - scenario.delta)], d


def interaction_tests(
    scenario: InteractionScenario, rng: np.random.Generator, n_bootstrap: int
) -> dict[str, float]:
    """The interaction's p (B's codec cost minus A's, as the tables compute it) on one simulated data set, and
    the p with the models held fixed."""
    y, lesion, sides, d = simulate_interaction(scenario, rng)
    weights = bootstrap.group_weights(lesion, n_bootstrap, int(rng.integers(1 << 31)))
    rows = [
        row_scores(y, [_probs(s) for s in side], [(s > d / 2).astype(int) for s in side], weights, recipe)
        for side, recipe in zip(sides, ("a", "a", "b", "b"), strict=True)
    ]
    # Every row one recipe: the models held fixed, no seed variance.
    fixed = [RowScores(row["auc"].point, row["auc"].resampled, "one recipe") for row in rows]
    b_codec, b_clean, a_codec, a_clean = rows[2], rows[3], rows[0], rows[1]
    return {
        INTERACTION_OFFERED[0]: interaction(b_codec["auc"], b_clean["auc"], a_codec["auc"], a_clean["auc"]).p,
        INTERACTION_OFFERED[1]: interaction(
            b_codec["balanced_accuracy"],
            b_clean["balanced_accuracy"],
            a_codec["balanced_accuracy"],
            a_clean["balanced_accuracy"],
        ).p,
        INTERACTION_BEFORE[0]: interaction(fixed[2], fixed[3], fixed[0], fixed[1]).p,
    }


def _probs(scores: np.ndarray) -> np.ndarray:
    p = 1.0 / (1.0 + np.exp(-scores))
    return np.stack([1.0 - p, p], axis=1)


def tests(scenario: Scenario, rng: np.random.Generator, n_bootstrap: int) -> dict[str, float]:
    """Every test's p on one simulated data set."""
    y, lesion, tested, reference, d = simulate(scenario, rng)
    threshold = d / 2
    weights = bootstrap.group_weights(lesion, n_bootstrap, int(rng.integers(1 << 31)))
    recipes = ("a", "a") if scenario.contrast == "same models" else ("a", "b")
    rows = [
        row_scores(y, [_probs(s) for s in side], [(s > threshold).astype(int) for s in side], weights, recipe)
        for side, recipe in zip((tested, reference), recipes, strict=True)
    ]
    a, b = np.stack(tested), np.stack(reference)
    _, clustered = auc_difference(y, a, b, lesion)
    delta, image_level = auc_difference(y, a, b)
    resampled = rows[0]["auc"].resampled.mean(axis=0) - rows[1]["auc"].resampled.mean(axis=0)
    return {
        "bootstrap Δ AUC": difference(rows[0]["auc"], rows[1]["auc"]).p,
        "bootstrap Δ bal. acc.": difference(rows[0]["balanced_accuracy"], rows[1]["balanced_accuracy"]).p,
        "Obuchowski Δ AUC": difference(rows[0]["auc"], rows[1]["auc"], sampling_variance=clustered).p,
        BEFORE[0]: float(2 * norm.sf(abs(delta) / np.sqrt(image_level))),
        BEFORE[1]: _percentile_p(resampled),
    }


def _percentile_p(deltas: np.ndarray) -> float:
    """The p the tables gave before: read off the resample distribution, with its floor of 2 / (B + 1)."""
    below, above = np.count_nonzero(deltas <= 0) + 1, np.count_nonzero(deltas >= 0) + 1
    return min(1.0, 2.0 * min(below, above) / (len(deltas) + 1))


def _chunk(args: tuple[Scenario | InteractionScenario, int, int, int]) -> Counter:
    scenario, n_sims, n_bootstrap, seed = args
    rng = np.random.default_rng(seed)
    run = interaction_tests if isinstance(scenario, InteractionScenario) else tests
    counts: Counter = Counter()
    for _ in range(n_sims):
        for name, p in run(scenario, rng, n_bootstrap).items():
            counts[name] += int(p < ALPHA)
    return counts


def rejection_rates(
    scenario: Scenario | InteractionScenario,
    n_sims: int,
    n_bootstrap: int,
    pool: ProcessPoolExecutor,
    workers: int,
    seed: int,
) -> dict[str, float]:
    """Each test's share of `n_sims` data sets rejected at ALPHA, the data sets spread over the workers."""
    sizes = [n_sims // workers + (k < n_sims % workers) for k in range(workers)]
    jobs = [(scenario, size, n_bootstrap, seed * 1000 + k) for k, size in enumerate(sizes) if size]
    totals: Counter = Counter()
    for counts in pool.map(_chunk, jobs):
        totals.update(counts)
    return {name: count / n_sims for name, count in totals.items()}


def keep_freed_memory() -> None:
    """glibc hands large freed arrays back to the system and faults them in again at the next allocation: a
    third of this benchmark's time went to the kernel. Keep them (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD); no-op
    elsewhere. Forked workers inherit it."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve arrays up to 1 GiB from the heap
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: never give the heap's top back


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=2000, help="simulated nulls per scenario")
    parser.add_argument("--power-sims", type=int, default=300, help="simulated data sets per power scenario")
    parser.add_argument("--bootstrap", type=int, default=200, help="group resamples per data set")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", choices=("paired", "interaction"), help="one kind of test (default: both)")
    args = parser.parse_args(argv)
    header = f"{'contrast':<11} {'img/lesion':>5} {'seed SD':>7} {'ΔAUC':>6}  {'test':<38} {'reject':>7}"
    interaction_header = f"{'contrast':<11} {'img/lesion':>5} {'seed SD':>7} {'cost SD':>7} {'ΔΔAUC':>6}  {'test':<46} {'reject':>7}"
    sections = []
    if args.only != "interaction":
        sections += [("Type-I error", NULLS, args.sims, header), ("Power", POWER, args.power_sims, header)]
    if args.only != "paired":
        sections += [
            (
                "Interaction (B's codec cost - A's): type-I error",
                INTERACTION_NULLS,
                args.sims,
                interaction_header,
            ),
            (
                "Interaction (B's codec cost - A's): power",
                INTERACTION_POWER,
                args.power_sims,
                interaction_header,
            ),
        ]
    offered_tests = (*OFFERED, *INTERACTION_OFFERED)
    failed = []
    keep_freed_memory()
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        for title, scenarios, n_sims, columns in sections:
            print(f"\n{title} at α = {ALPHA} ({n_sims} simulated data sets each, {args.bootstrap} resamples)")
            print(columns)
            for k, scenario in enumerate(scenarios):
                rates = rejection_rates(scenario, n_sims, args.bootstrap, pool, args.workers, seed=k + 1)
                kind = "interaction" if isinstance(scenario, InteractionScenario) else ""
                width = 46 if kind else 38
                for name, rate in rates.items():
                    offered = name in offered_tests
                    mark = "" if scenario.delta or not offered else " ok" if rate <= TARGET else " FAILS"
                    label = name if offered else f"({name}: not offered)"
                    row = f"{kind:<11} {scenario.describe()}" if kind else scenario.describe()
                    print(f"{row}  {label:<{width}} {rate:>6.1%}{mark}")
                    if scenario.delta == 0 and offered and rate > TARGET:
                        failed.append((scenario, name, rate))
                sys.stdout.flush()
    print(f"\n{time.perf_counter() - start:.0f} s; target: every offered test's type-I error <= {TARGET:.1%}")
    for scenario, name, rate in failed:
        print(f"MISSED: {name} rejects {rate:.1%} of nulls in {scenario}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
