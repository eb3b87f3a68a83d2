"""Effects of known size planted in the synthetic set, so that a run of the whole pipeline can be checked against
the answer: what resolution and compression cost a model, and whom they cost more.

MEL and NV share one melanocytic look. Two melanoma-specific signs, each on its own share of MEL lesions (drawn
independently) and on no NV lesion, tell them apart:

- the *coarse* sign, a blue-grey veil over a large part of the lesion (share c): it lives at the scale of the
  whole lesion, so it survives 32 px and any codec;
- the *fine* sign, a dot texture cos(2 pi k u) cos(2 pi k v) in image coordinates u, v in [0, 1), k = `cycles`
  periods along each side, modulating the lesion's brightness by +-`contrast` (share f): an image of R px keeps
  it only while k < R / 2 (the antialiased resize removes it below Nyquist), and low JPEG/WebP/AVIF quality
  quantises it away.

An ideal observer ranks a lesion with either sign above every lesion without one and cannot order the rest, so
its AUC is 1/2 + 1/2 P(sign) with P(sign) = 1 - (1 - c)(1 - f) while the fine sign is visible, and 1/2 + c/2
once it is gone: the planted cost of losing it is f (1 - c) / 2. A *subgroup* (lesions with one value of a
metadata column the manifest carries: `sex` or `anatom_site_general`) may have its own c and f: less coarse and
more fine sign there makes resolution and compression cost that subgroup more (a planted interaction), and
f = 0 elsewhere makes the rest a null arm, where compression has nothing to take.

Every draw comes from a generator seeded by (seed, 4, lesion), so the plan (ids, metadata, classes) and the
other classes' looks are the same with and without planting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

POSITIVE, NEGATIVE = "MEL", "NV"
SUBGROUP_COLUMNS = {"sex": "sex", "anatom_site_general": "site"}  # metadata column -> Lesion attribute
# The one look of MEL and NV: neither size, shape nor colour tells them apart.
LOOK = dict(
    radius=(0.3, 0.55),
    irregular=0.08,
    edge=0.15,
    opacity=0.95,
    base=(118, 76, 50),
    blotches=((70, 45, 32), (150, 110, 85)),
    n_blotches=(0, 3),
)
# The veil: a blotch (synth_draw._shape_params) a little off centre, most of the lesion wide, blue-grey.
VEIL = (0.15, 0.0, 0.6, np.array((140, 160, 200), float), 0.9)


@dataclass(frozen=True)
class Cues:
    """The shares of MEL lesions that carry the coarse and the fine sign."""

    coarse: float
    fine: float

    def auc(self, fine_visible: bool) -> float:
        """The ideal observer's AUC (module docstring), with or without the fine sign in the image."""
        fine = self.fine if fine_visible else 0.0
        return 0.5 + 0.5 * (1 - (1 - self.coarse) * (1 - fine))


@dataclass(frozen=True)
class Planted:
    """`data.synthetic.planted` of config.yaml (the schema documents each key)."""

    coarse: float = 0.4
    fine: float = 0.6
    cycles: int = 20
    contrast: float = 0.3
    subgroup: dict | None = field(default=None)

    @classmethod
    def from_config(cls, planted: dict | None) -> Planted | None:
        if planted is None:
            return None
        made = cls(**planted)
        if made.subgroup is not None and made.subgroup["column"] not in SUBGROUP_COLUMNS:
            raise ValueError(
                f"data.synthetic.planted.subgroup.column: {made.subgroup['column']!r} is not one of "
                f"{', '.join(SUBGROUP_COLUMNS)}"
            )
        return made

    def cues(self, lesion) -> Cues:
        """The shares that hold for a lesion: its subgroup's, or everyone else's."""
        if self.in_subgroup(lesion):
            return Cues(self.subgroup.get("coarse", self.coarse), self.subgroup.get("fine", self.fine))
        return Cues(self.coarse, self.fine)

    def in_subgroup(self, lesion) -> bool:
        """Whether a lesion (synth_plan.Lesion) has the subgroup's value of its column."""
        if self.subgroup is None:
            return False
        return getattr(lesion, SUBGROUP_COLUMNS[self.subgroup["column"]]) == self.subgroup["value"]

    def lesion_cues(self, lesion, seed: int) -> dict:
        """Whether a MEL or NV lesion carries the coarse sign (`veiled`) and the fine one (`textured`), and the
        texture's `phase` (its images share it, and the images' own draws stay as they are)."""
        rng = np.random.default_rng([seed, 4, lesion.index])
        cues = self.cues(lesion)
        draws = rng.random(2)
        melanoma = lesion.label == POSITIVE
        return {
            "veiled": bool(melanoma and draws[0] < cues.coarse),
            "textured": bool(melanoma and draws[1] < cues.fine),
            "phase": rng.uniform(0, 2 * np.pi, 2),
        }

    def describe(self) -> str:
        """What was planted and the AUC an ideal observer reaches, for the data set's documents and logs."""
        lines = [
            f"Planted effects (dermcompress.data.synth_planted), {POSITIVE} vs {NEGATIVE}:",
            f"- coarse sign (a blue-grey veil, survives any resolution and codec): on {self.coarse:.0%} of "
            f"{POSITIVE} lesions",
            f"- fine sign (a dot texture of {self.cycles} cycles per image side, brightness +-{self.contrast:.0%}):"
            f" on {self.fine:.0%} of {POSITIVE} lesions; gone at {2 * self.cycles} px and below and at low codec "
            "quality",
        ]
        groups = [("everyone", Cues(self.coarse, self.fine))]
        if self.subgroup is not None:
            column, value = self.subgroup["column"], self.subgroup["value"]
            cues = Cues(self.subgroup.get("coarse", self.coarse), self.subgroup.get("fine", self.fine))
            lines.append(
                f"- subgroup {column} = {value}: coarse sign on {cues.coarse:.0%}, fine sign on {cues.fine:.0%}"
            )
            groups = [(f"{column} = {value}", cues), (f"{column} != {value}", Cues(self.coarse, self.fine))]
        for name, cues in groups:
            lines.append(
                f"- ideal AUC, {name}: {cues.auc(True):.3f} with the fine sign visible, "
                f"{cues.auc(False):.3f} without (a cost of {cues.auc(True) - cues.auc(False):.3f})"
            )
        return "\n".join(lines) + "\n"


def planted_shape(shape: dict, cues: dict) -> dict:
    """A lesion's shape (synth_draw._shape_params of LOOK) with its signs (Planted.lesion_cues)."""
    blotches = list(shape["blotches"])
    if cues["veiled"]:
        blotches.append(VEIL)
    return shape | {"blotches": blotches, "textured": cues["textured"], "texture_phase": cues["phase"]}


def texture(width: int, height: int, cycles: int, phase: np.ndarray) -> np.ndarray:
    """(height, width) float32 in [-1, 1]: `cycles` periods of a dot lattice along each side."""
    u = (np.arange(width, dtype=np.float32) + 0.5) / width
    v = (np.arange(height, dtype=np.float32) + 0.5) / height
    return np.outer(np.cos(2 * np.pi * cycles * v + phase[1]), np.cos(2 * np.pi * cycles * u + phase[0]))
