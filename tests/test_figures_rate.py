"""The rate-accuracy and forest figures, from hand-built experiment tables, and the Pareto front behind them."""

from __future__ import annotations

import logging

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from PIL import Image

from dermcompress.study import figures, rate_figures

# (eval variant, codec, quality, kB per image at 224 px); a quarter of the bytes at 112 px.
VARIANTS = (("png", "png", np.nan, 100.0), ("jpeg_q75", "jpeg", 75.0, 10.0))
VARIANTS += (("jpeg_q30", "jpeg", 30.0, 4.0), ("avif_q40", "avif", 40.0, 2.0))
# Test AUC per (model, res) for png, jpeg_q75, jpeg_q30, avif_q40.
AUC = {
    ("m", 224): (0.90, 0.88, 0.84, 0.86),
    ("m", 112): (0.87, 0.86, 0.83, 0.85),
    ("n", 224): (0.80, 0.79, 0.75, 0.78),
    ("n", 112): (0.78, 0.80, 0.76, 0.70),
}


def rate_table() -> pd.DataFrame:
    """2 models x 2 resolutions x 4 variants, the reference m at 224 px PNG, and a row without kB per image."""
    rows = []
    for (model, res), aucs in AUC.items():
        for (variant, codec, quality, kb), auc in zip(VARIANTS, aucs, strict=True):
            rows.append(
                {
                    "model": model,
                    "res": res,
                    "eval_variant": variant,
                    "kb_per_image": kb * (res / 224) ** 2,
                    "codec": codec,
                    "codec_quality": quality,
                    "auc": auc,
                }
            )
    rows.append(
        {
            "model": "m",
            "res": 224,
            "eval_variant": "mix",
            "kb_per_image": np.nan,
            "codec": "mixed",
            "auc": 0.85,
        }
    )
    table = pd.DataFrame(rows)
    n = len(table)
    rng = np.random.default_rng(0)
    table["n_runs"] = 3
    table["auc_mean"] = table.pop("auc")
    table["auc_std"] = 0.01
    table["balanced_accuracy_mean"] = table["auc_mean"] - 0.1 + rng.uniform(-0.02, 0.02, n)
    table["balanced_accuracy_std"] = 0.02
    table["bpp"] = table["kb_per_image"] * 8000 / table["res"] ** 2
    table["reference"] = (table["model"] == "m") & (table["res"] == 224) & (table["eval_variant"] == "png")
    ref = table[table["reference"]].iloc[0]
    for metric in ("auc", "balanced_accuracy"):
        delta = table[f"{metric}_mean"] - ref[f"{metric}_mean"]
        table[f"delta_{metric}"] = delta
        table[f"delta_{metric}_low"] = delta - 0.02
        table[f"delta_{metric}_high"] = delta + 0.02
        table[f"delta_{metric}_p_holm"] = np.where(delta.abs() > 0.03, 0.001, 0.4)
    table["delong_p_holm"] = table["delta_auc_p_holm"]
    delta_columns = [c for c in table.columns if c.startswith("delta_") or c == "delong_p_holm"]
    table.loc[table["reference"], delta_columns] = 0.0
    table.loc[table["reference"], [c for c in delta_columns if "_p_" in c or c == "delong_p_holm"]] = np.nan
    table["selected_by_val"] = False
    table["runs"] = "results/runs/x"
    return table


def assert_png(path, min_size=(600, 300)) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]


# ------------------------------------------------------------------------------------------- pareto front


def test_pareto_front_keeps_the_undominated_points_ties_included_nans_never():
    kb = np.array([1.0, 2.0, 2.0, 3.0, 4.0, 4.0, np.nan, 0.5, 5.0])
    score = np.array([0.70, 0.80, 0.80, 0.75, 0.90, 0.85, 0.99, np.nan, 0.90])
    # (2, 0.8) twice: neither strictly better, both on. (3, 0.75) < (2, 0.8); (4, 0.85) < (4, 0.9) at equal kB;
    # (5, 0.9) < (4, 0.9) at equal score. The NaNs are off and dominate nothing (else (1, 0.7) would be off).
    expected = [True, True, True, False, True, False, False, False, False]
    assert rate_figures.pareto_front(kb, score).tolist() == expected
    assert rate_figures.pareto_front(np.array([]), np.array([])).tolist() == []
    assert rate_figures.pareto_front(np.array([np.nan, 1.0]), np.array([0.5, np.nan])).tolist() == [
        False,
        False,
    ]
    assert rate_figures.pareto_front(np.array([3.0]), np.array([0.1])).tolist() == [True]


def test_pareto_front_matches_the_definition_on_random_points():
    rng = np.random.default_rng(1)
    for _ in range(20):
        kb = rng.integers(1, 6, 30).astype(float)  # many ties
        score = rng.integers(0, 6, 30).astype(float)
        kb[rng.random(30) < 0.1] = np.nan
        front = rate_figures.pareto_front(kb, score)
        for i in range(30):
            dominated = any(
                kb[j] <= kb[i] and score[j] >= score[i] and (kb[j] < kb[i] or score[j] > score[i])
                for j in range(30)
            )
            assert front[i] == (not np.isnan(kb[i]) and not dominated)


# ------------------------------------------------------------------------------------------- rate-accuracy


def test_rate_accuracy_draws_a_line_per_resolution_and_codec_and_the_front(tmp_path, caplog):
    table = rate_table()
    with caplog.at_level(logging.WARNING, logger=rate_figures.log.name):
        fig = rate_figures.plot_rate_accuracy(table, "What do bytes buy?")
    assert "1 row(s) without kB per image" in caplog.text
    axes = np.array(fig.axes).reshape(2, 2)  # AUC, balanced accuracy x models m, n
    assert [ax.get_title() for ax in axes[0]] == ["m", "n"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["test AUC", "test balanced accuracy"]
    assert all(ax.get_xscale() == "log" for ax in axes.flat)
    assert all(ax.get_xlabel() == "kB per image (log scale)" for ax in axes[1])
    drawn = table.dropna(subset=["kb_per_image"])
    for r, metric in enumerate(("auc", "balanced_accuracy")):
        for c, model in enumerate(("m", "n")):
            ax = axes[r, c]
            panel = drawn[drawn["model"] == model]
            mask = rate_figures.pareto_front(
                panel["kb_per_image"].to_numpy(), panel[f"{metric}_mean"].to_numpy()
            )
            expected = panel[mask].sort_values(["kb_per_image", f"{metric}_mean"])
            (line,) = [line for line in ax.lines if line.get_gid() == "pareto_front"]
            assert line.get_linestyle() == "--" and line.get_drawstyle() == "steps-post"
            np.testing.assert_allclose(line.get_xdata(), expected["kb_per_image"])
            np.testing.assert_allclose(line.get_ydata(), expected[f"{metric}_mean"])
            # Each frontier point ringed: an unfilled scatter at exactly those points.
            rings = [
                s for s in ax.collections if isinstance(s, PathCollection) and s.get_gid() != "reference"
            ]
            assert any(
                np.allclose(s.get_offsets(), expected[["kb_per_image", f"{metric}_mean"]]) for s in rings
            )
            # Quality labels on the coded points only: 2 resolutions x 3 coded variants.
            notes = sorted(t.get_text() for t in ax.texts)
            assert notes == sorted(["q75", "q30", "q40"] * 2)
            stars = [s for s in ax.collections if s.get_gid() == "reference"]
            if model == "m":
                ref = table[table["reference"]].iloc[0]
                np.testing.assert_allclose(stars[0].get_offsets(), [[100.0, ref[f"{metric}_mean"]]])
            else:
                assert not stars
    # The AUC front of m by hand: 112 px AVIF, 224 px AVIF, 224 px JPEG q75, 224 px PNG; 112 px JPEG q75 (2.5 kB)
    # only ties 224 px AVIF (2 kB) on AUC and 112 px PNG (25 kB) is below 224 px JPEG q75 (10 kB).
    m_front = next(line for line in axes[0, 0].lines if line.get_gid() == "pareto_front")
    np.testing.assert_allclose(m_front.get_xdata(), [0.5, 2.0, 10.0, 100.0])
    np.testing.assert_allclose(m_front.get_ydata(), [0.85, 0.86, 0.88, 0.90])
    (legend,) = fig.legends
    assert legend.get_title().get_text() == figures.SEEDS_NOTE
    labels = [t.get_text() for t in legend.get_texts()]
    assert len(labels) == len(set(labels))
    assert labels[:2] == ["224 px PNG", "224 px JPEG"]  # lines first, largest resolution first
    lines = {"224 px PNG", "224 px JPEG", "224 px AVIF", "112 px PNG", "112 px JPEG", "112 px AVIF"}
    assert lines <= set(labels)
    assert rate_figures.FRONTIER in labels and "reference level" in labels
    assert "reference: m, 224 px PNG, 100 kB" in labels
    assert not any("mixed" in label for label in labels)  # its only row has no kB per image
    out = tmp_path / "rate.png"
    fig.savefig(out, dpi=figures.DPI)
    plt.close(fig)
    assert_png(out, min_size=(1000, 800))


def test_rate_accuracy_with_one_model_and_no_reference_draws_one_column():
    table = rate_table()
    table = table[table["model"] == "m"].drop(columns="reference")
    fig = rate_figures.plot_rate_accuracy(table, "t")
    assert len(fig.axes) == 2 and fig.axes[0].get_title() == "m"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert not any(label.startswith("reference") for label in labels)
    plt.close(fig)


@pytest.mark.parametrize("span", [1.2, 30.0])
def test_rate_accuracy_labels_its_kb_axis_in_plain_numbers_even_over_a_narrow_range(span):
    """Less than a decade of kB (a matched arm's two points) still gets a labelled tick, and labels read
    0.5, 1, 2 (never 10^-0.3 or overlapping minor-tick labels)."""
    table = rate_table()
    table = table[(table["model"] == "m") & table["kb_per_image"].notna()].drop(columns="reference")
    low = table["kb_per_image"].min()
    table["kb_per_image"] = low + (table["kb_per_image"] - low) / np.ptp(table["kb_per_image"]) * low * (
        span - 1
    )
    fig = rate_figures.plot_rate_accuracy(table.reset_index(drop=True), "t")
    fig.canvas.draw()
    ax = fig.axes[-1]
    left, right = ax.get_xlim()
    shown = [t for t in ax.get_xticklabels() if t.get_text() and left <= t.get_position()[0] <= right]
    assert shown and all(float(t.get_text()) == pytest.approx(t.get_position()[0]) for t in shown)
    assert not any(t.get_text() for t in ax.get_xticklabels(minor=True))
    plt.close(fig)


def test_rate_accuracy_without_any_kb_still_draws():
    table = rate_table().assign(kb_per_image=np.nan)
    fig = rate_figures.plot_rate_accuracy(table, "t")
    assert len(fig.axes) == 2 and fig.axes[0].get_title() == "no row has a kB per image"
    plt.close(fig)


def test_rate_accuracy_panels_per_training_arm():
    table = rate_table()
    table = pd.concat([table.assign(train_variant="clean"), table.assign(train_variant="codec")])
    table["reference"] &= table["train_variant"] == "clean"
    fig = rate_figures.plot_rate_accuracy(table.reset_index(drop=True), "t")
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert titles == [
        "m, trained on clean",
        "n, trained on clean",
        "m, trained on codec",
        "n, trained on codec",
    ]  # in table order
    assert len(fig.axes) == 8
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- forest


def test_forest_has_a_line_per_row_filled_where_significant(tmp_path):
    table = rate_table()
    fig = rate_figures.plot_forest(table, "Δ vs 224 px PNG")
    assert len(fig.axes) == 2
    left, right = fig.axes
    labels = [t.get_text() for t in left.get_yticklabels()]
    assert len(labels) == len(table)
    reference = int(np.flatnonzero(table["reference"])[0])
    assert labels[reference] == "reference: m, 224 px, evaluated on png, 100 kB/image"
    assert sum(label.startswith("reference") for label in labels) == 1
    assert labels[5] == "m, 112 px, evaluated on jpeg_q75, 2.5 kB/image"
    assert labels[-1] == "m, 224 px, evaluated on mix"  # no kB per image, still compared
    assert left.get_ylim()[0] > left.get_ylim()[1]  # first row on top
    for ax, metric in ((left, "auc"), (right, "balanced_accuracy")):
        assert any(np.allclose(line.get_xdata(), 0) and line.get_linestyle() == "-" for line in ax.lines)
        others = table[~table["reference"]]
        significant = others[f"delta_{metric}_p_holm"] < 0.05
        assert len(ax.containers) == len(others)  # an interval per non-reference row
        hollow = [c for c in ax.containers if c.lines[0].get_markerfacecolor() == "white"]
        assert len(hollow) == int((~significant).sum())
        filled = [c for c in ax.containers if c.lines[0].get_markerfacecolor() != "white"]
        assert len(filled) == int(significant.sum()) > 0
        # The interval of each row spans its low-high.
        for container, (_, row) in zip(ax.containers, others.iterrows(), strict=True):
            segment = container.lines[2][0].get_segments()[0]
            np.testing.assert_allclose(
                sorted(segment[:, 0]), [row[f"delta_{metric}_low"], row[f"delta_{metric}_high"]]
            )
        (star,) = [line for line in ax.lines if line.get_marker() == "*"]
        np.testing.assert_allclose([star.get_xdata()[0], star.get_ydata()[0]], [0, reference])
    small = rate_figures.plot_forest(table.head(4), "t")
    assert small.get_figheight() < fig.get_figheight()
    out = tmp_path / "forest.png"
    fig.savefig(out, dpi=figures.DPI)
    plt.close(fig)
    plt.close(small)
    assert_png(out, min_size=(1000, 500))


# ------------------------------------------------------------------------------------------- from the CSV


def test_table_csv_reads_back_with_its_types(tmp_path, monkeypatch):
    csv = tmp_path / "table.csv"
    rate_table().assign(lr="1e-05", schedule="").to_csv(csv, index=False)
    table = rate_figures.read_table_csv(str(csv))
    assert table["res"].dtype == np.int64 and table["codec_quality"].dtype == float
    assert table["reference"].dtype == bool and table["reference"].sum() == 1
    assert set(table["lr"]) == {"1e-05"} and set(table["schedule"]) == {""}
    assert table["codec_quality"].isna().sum() == 5  # 4 PNG, 1 mixed


@pytest.mark.parametrize("kind", ["rate_accuracy", "forest"])
def test_run_table_figure_writes_a_png_from_the_table_csv(tmp_path, kind, caplog):
    csv = tmp_path / "table.csv"
    rate_table().to_csv(csv, index=False)
    out = tmp_path / f"{kind}.png"
    open_before = set(plt.get_fignums())
    with caplog.at_level(logging.INFO, logger=rate_figures.log.name):
        rate_figures.run_table_figure(kind=kind, table_csv=str(csv), title="codecs", out=str(out))
    assert f"{kind} figure of 17 table rows" in caplog.text
    assert_png(out)
    assert set(plt.get_fignums()) == open_before  # closed


def test_each_model_panel_and_forest_row_uses_its_own_reference(tmp_path):
    """A reference per model (compared_with_row): every rate panel stars and levels its own model's reference;
    the forest stars both, says which rows carry no p, and its legend names the test."""
    table = rate_table()
    table["reference"] = (table["res"] == 224) & (table["eval_variant"] == "png")
    refs = {
        model: int(table.index[table["reference"] & (table["model"] == model)][0]) for model in ("m", "n")
    }
    table["compared_with_row"] = table["model"].map(refs)
    table["untested"] = ""
    table.loc[5, "untested"] = "not selected by validation"
    fig = rate_figures.plot_rate_accuracy(table, "codecs")
    axes = np.array(fig.axes).reshape(2, -1)
    for col, model in enumerate(("m", "n")):
        for row, metric in enumerate(("auc", "balanced_accuracy")):
            ax = axes[row, col]
            (star,) = [s for s in ax.collections if s.get_gid() == "reference"]
            ref = table.loc[refs[model]]
            np.testing.assert_allclose(star.get_offsets(), [[100.0, ref[f"{metric}_mean"]]])
            levels = [line for line in ax.lines if line.get_linestyle() == ":"]
            assert [line.get_ydata()[0] for line in levels] == [ref[f"{metric}_mean"]]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "reference: each panel's own (224 px PNG)" in labels
    forest = rate_figures.plot_forest(table, "Δ")
    ticks = [t.get_text() for t in forest.axes[0].get_yticklabels()]
    assert sum(label.startswith("reference") for label in ticks) == 2
    assert ticks[5].endswith("(no p: not selected by validation)")
    title = forest.legends[0].get_title().get_text()
    assert title == rate_figures.FOREST_TEST and "Welch t" in title and "models fixed" in title
    plt.close(fig)
    plt.close(forest)
