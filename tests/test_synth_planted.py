"""Planted effects in the synthetic set (data/synth_planted.py): the signs are on the lesions the config says, the
ideal AUCs are what an ideal observer gets, the fine sign is in the written images at high resolution and codec
quality and gone at low, and every layout says what was planted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

from dermcompress.data import codec
from dermcompress.data.resize import resize_image
from dermcompress.data.sources import DOC_FILES, GROUND_TRUTH, IMAGES_DIR
from dermcompress.data.synth import make_synthetic
from dermcompress.data.synth_layouts import README
from dermcompress.data.synth_plan import plan_images
from dermcompress.data.synth_planted import Cues, Planted, texture

REPO = Path(__file__).resolve().parents[1]
PLANTED = {
    "coarse": 0.4,
    "fine": 0.6,
    "cycles": 10,
    "contrast": 0.3,
    "subgroup": {"column": "sex", "value": "female", "coarse": 0.1, "fine": 0.9},
}


def _signs(n: int, seed: int, planted: Planted) -> pd.DataFrame:
    plan = plan_images(n, seed)
    rows = []
    for lesion in plan.lesions:
        if lesion.label in ("MEL", "NV"):
            cues = planted.lesion_cues(lesion, seed)
            rows.append({"label": lesion.label, "sub": planted.in_subgroup(lesion), **cues})
    return pd.DataFrame(rows)


def test_signs_sit_on_the_shares_of_mel_lesions_the_config_gives_and_never_on_nv():
    planted = Planted.from_config(PLANTED)
    signs = _signs(20_000, 0, planted)
    nv = signs[signs["label"] == "NV"]
    assert not nv["veiled"].any() and not nv["textured"].any()
    for in_subgroup, cues in ((True, Cues(0.1, 0.9)), (False, Cues(0.4, 0.6))):
        mel = signs[(signs["label"] == "MEL") & (signs["sub"] == in_subgroup)]
        assert len(mel) > 500
        for column, share in (("veiled", cues.coarse), ("textured", cues.fine)):
            se = np.sqrt(share * (1 - share) / len(mel))
            assert abs(mel[column].mean() - share) < 4 * se, (in_subgroup, column)
        # Drawn independently: both signs together as often as the product says.
        both = (mel["veiled"] & mel["textured"]).mean()
        assert abs(both - cues.coarse * cues.fine) < 4 * np.sqrt(cues.coarse * cues.fine / len(mel))


@pytest.mark.parametrize(("coarse", "fine"), [(0.4, 0.6), (0.2, 1.0), (0.6, 0.0)])
def test_ideal_auc_is_what_an_ideal_observer_scores(coarse, fine):
    """The ideal observer scores a lesion 1 when it shows a sign it can see and 0 otherwise (ties count half)."""
    rng = np.random.default_rng(1)
    n = 200_000
    mel = rng.random(n) < 0.5
    veiled = mel & (rng.random(n) < coarse)
    textured = mel & (rng.random(n) < fine)
    cues = Cues(coarse, fine)
    assert roc_auc_score(mel, veiled | textured) == pytest.approx(cues.auc(True), abs=0.005)
    assert roc_auc_score(mel, veiled) == pytest.approx(cues.auc(False), abs=0.005)


def test_unknown_subgroup_column_is_refused_with_its_key():
    with pytest.raises(ValueError, match=r"data\.synthetic\.planted\.subgroup\.column"):
        Planted.from_config({**PLANTED, "subgroup": {"column": "age_approx", "value": "60"}})


@pytest.fixture(scope="module")
def planted_set(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("planted") / "isic", n=120, seed=5, planted=PLANTED)


def _lattice_amplitude(pixels: np.ndarray, cycles: int, phase: np.ndarray) -> float:
    """The amplitude (grey levels) of the fine sign's lattice in an image: its projection on the lattice."""
    grey = pixels.astype(float).mean(axis=2)
    grey -= grey.mean()
    lattice = texture(grey.shape[1], grey.shape[0], cycles, phase)
    return float((grey * lattice).sum() / (lattice**2).sum())


def test_fine_sign_is_in_the_images_while_resolution_and_quality_allow(planted_set):
    """In the written JPEGs: at 32 px (10 cycles, below Nyquist) the lattice is there on textured lesions and not on
    the others, JPEG q95 keeps it, JPEG q30 removes most of it, and 16 px (above Nyquist) has none of it."""
    planted = Planted.from_config(PLANTED)
    plan = plan_images(120, 5)
    amplitudes: dict[tuple[bool, str], list[float]] = {}
    for image_id, lesion, _ in plan.slots:
        if lesion.label not in ("MEL", "NV"):
            continue
        cues = planted.lesion_cues(lesion, 5)
        with Image.open(planted_set / IMAGES_DIR / f"{image_id}.jpg") as img:
            img.load()
            for resolution in (32, 16):
                pixels = resize_image(img, resolution, "squash")
                versions = {"clean": pixels}
                if resolution == 32:
                    for quality in (95, 30):
                        versions[f"q{quality}"] = codec.transmit(
                            pixels, {"format": "jpeg", "quality": quality}
                        )[0]
                for name, version in versions.items():
                    amplitude = _lattice_amplitude(version, planted.cycles, cues["phase"])
                    amplitudes.setdefault((cues["textured"], f"{resolution}/{name}"), []).append(amplitude)
    textured = {k: float(np.mean(v)) for (t, k), v in amplitudes.items() if t}
    plain = {k: float(np.mean(np.abs(v))) for (t, k), v in amplitudes.items() if not t}
    assert len(amplitudes[(True, "32/clean")]) >= 5
    # Measured: 3.3 grey levels on textured lesions against |0.2| on the others; q95 3.4, q30 1.0, 16 px -0.2.
    assert textured["32/clean"] > max(1.0, 10 * plain["32/clean"])
    assert textured["32/q95"] > 0.8 * textured["32/clean"]
    assert abs(textured["32/q30"]) < 0.4 * textured["32/clean"]
    assert abs(textured["16/clean"]) < 0.1 * textured["32/clean"]


def test_what_was_planted_is_written_beside_the_images(planted_set, tmp_path):
    attribution = (planted_set / IMAGES_DIR / DOC_FILES[0]).read_text()
    assert "Planted effects" in attribution and "sex = female" in attribution
    assert f"ideal AUC, sex = female: {Cues(0.1, 0.9).auc(True):.3f}" in attribution
    # Same (n, seed, planted), same bytes; and the planted set differs from the plain one.
    again = make_synthetic(tmp_path / "again", n=120, seed=5, planted=PLANTED)
    plain = make_synthetic(tmp_path / "plain", n=120, seed=5)
    image = next(p.name for p in (planted_set / IMAGES_DIR).glob("*.jpg"))
    assert (again / IMAGES_DIR / image).read_bytes() == (planted_set / IMAGES_DIR / image).read_bytes()
    assert (plain / GROUND_TRUTH).read_bytes() == (planted_set / GROUND_TRUTH).read_bytes()
    assert "Planted" not in (plain / IMAGES_DIR / DOC_FILES[0]).read_text()
    for source in ("isic2020", "ham10000", "isic_archive"):
        out = make_synthetic(tmp_path / source, n=40, seed=5, source=source, planted=PLANTED)
        assert "ideal AUC" in (out / README).read_text(), source


def test_cli_plants_what_a_config_file_describes(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"synthetic": {"n": 40, "seed": 0, "planted": PLANTED}}}))
    cli = [sys.executable, "-m", "dermcompress.cli", "synth", "--n", "40"]
    done = subprocess.run(
        [*cli, str(tmp_path / "out"), "--planted", str(config)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "Planted effects" in (tmp_path / "out" / IMAGES_DIR / DOC_FILES[0]).read_text()
    config.write_text(yaml.safe_dump({"data": {"synthetic": {"n": 40, "seed": 0}}}))
    refused = subprocess.run(
        [*cli, str(tmp_path / "no"), "--planted", str(config)], capture_output=True, text=True
    )
    assert refused.returncode != 0 and "has no data.synthetic.planted" in refused.stderr


@pytest.mark.parametrize("planted", [PLANTED, None])
def test_report_front_page_says_what_was_planted(planted):
    """workflow.rst (Snakemake renders it with Jinja2): the planted shares and subgroup, only when planted."""
    import jinja2

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["data"]["synthetic"]["planted"] = planted
    template = jinja2.Template((REPO / "workflow/report/workflow.rst").read_text())
    text = " ".join(template.render(snakemake=SimpleNamespace(config=config)).split())
    assert "SYNTHETIC DATA" in text
    if planted is None:
        assert "Planted effects" not in text
        return
    assert "marks 40% of MEL lesions" in text and "texture of 10 periods" in text and "20 px or fewer" in text
    assert "Lesions with ``sex = female`` carry the veil on 10% and the texture on 90%" in text
