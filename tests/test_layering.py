"""The parts of the package import downwards only, checked on what decides reruns: each module's code-fingerprint
closure (its transitive package imports, function-level ones included). data <- learn <- study, with provenance
beside study; `dermcompress` itself and `dermcompress.errors` are open to all, config and cli to none.

And what a job imports before its work begins (its start-up, paid by every job): a torch job none of the heavy
packages (scikit-learn, scipy, matplotlib, timm, transformers, ...), which are imported where they are used; a
data stage only those its work uses."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dermcompress.provenance import fingerprint

PACKAGE = Path(fingerprint.PACKAGE_DIR)
OPEN = {"dermcompress", "dermcompress.errors"}
# What a module of each part may reach (parts are prefixes; `provenance.fingerprint` is a leaf every part uses).
MAY_REACH = {
    "data": ("dermcompress.data",),
    "learn": ("dermcompress.learn", "dermcompress.data", "dermcompress.provenance.fingerprint"),
    "study": (
        "dermcompress.study",
        "dermcompress.learn",
        "dermcompress.data",
        "dermcompress.provenance.fingerprint",
    ),
    "provenance": ("dermcompress.provenance", "dermcompress.data", "dermcompress.learn"),
}


def modules(part: str) -> list[str]:
    return sorted(
        ".".join(["dermcompress", part, *p.relative_to(PACKAGE / part).with_suffix("").parts]).removesuffix(
            ".__init__"
        )
        for p in (PACKAGE / part).rglob("*.py")
    )


def allowed(name: str, part: str) -> bool:
    if name in OPEN:
        return True
    if part != "provenance" and name == "dermcompress.provenance":  # runs before provenance.fingerprint
        return True
    return any(name == p or name.startswith(p + ".") for p in MAY_REACH[part])


def test_every_module_belongs_to_a_part():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "cli", "config", "errors"]
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(
        MAY_REACH
    )


@pytest.mark.parametrize("part", sorted(MAY_REACH))
def test_part_reaches_only_what_it_may(part):
    found = {m: [n for n in fingerprint.module_closure(m) if not allowed(n, part)] for m in modules(part)}
    assert len(found) > 1
    assert {m: bad for m, bad in found.items() if bad} == {}


def test_fingerprint_is_a_leaf():
    assert fingerprint.module_closure("dermcompress.provenance.fingerprint") == (
        "dermcompress",
        "dermcompress.provenance",
        "dermcompress.provenance.fingerprint",
    )


def test_data_stages_do_not_depend_on_experiment_grids_or_config():
    """config.py checks the experiment grids; a data stage that imported it would rerun for a grid edit."""
    for module in modules("data"):
        closure = fingerprint.module_closure(module)
        assert "dermcompress.config" not in closure and "dermcompress.study.experiments" not in closure, (
            module
        )


def test_subpackages_say_what_they_may_import():
    for part in MAY_REACH:
        doc = (PACKAGE / part / "__init__.py").read_text()
        assert "May import:" in doc, part


# ------------------------------------------------------------------------------------------ start-up imports

SCRIPTS = PACKAGE.parents[1] / "scripts"
# Imported where a job uses them (a model built from timm or transformers, scores from scikit-learn), never by the
# imports a job runs before its work: ~1-3 s each, which every job of the study would pay at start-up.
HEAVY = ("sklearn", "scipy", "matplotlib", "timm", "transformers", "torchvision", "peft", "fvcore", "lightly")
# The data stages, and the heavy packages each one's work uses (lesion groups: scipy; the grouped split: sklearn).
DATA_STAGES = {
    "ingest": {"scipy"},
    "ingest_gather": {"scipy"},
    "task": set(),
    "split": {"sklearn", "scipy"},
    "resize": set(),
    "resize_gather": set(),
    "degrade": set(),
    "data_summary": set(),
    "bytes_summary": set(),
}


def imported_at_start(script: Path) -> set[str]:
    """Top-level packages loaded by a fresh interpreter that runs the script's own import statements (its work,
    which needs Snakemake's `snakemake` object, left out)."""
    tree = ast.parse(script.read_text())
    imports = "; ".join(ast.unparse(n) for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom))
    code = f"{imports}; import sys; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def torch_scripts() -> list[str]:
    """The scripts of torch jobs: those whose package modules import torch (read from the source, not run)."""
    return sorted(
        {
            script.stem
            for script in SCRIPTS.glob("*.py")
            for node in ast.parse(script.read_text()).body
            if isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("dermcompress.learn")
            and "torch" in fingerprint.module_packages(node.module)
        }
    )


def test_torch_scripts_are_found():
    assert {"train", "evaluate", "features", "linear", "evaluate_probe", "pretrain"} <= set(torch_scripts())
    assert not set(DATA_STAGES) & set(torch_scripts())


@pytest.mark.parametrize("name", torch_scripts())
def test_a_torch_job_imports_nothing_heavy_before_its_work(name):
    loaded = imported_at_start(SCRIPTS / f"{name}.py")
    assert "torch" in loaded
    assert sorted(loaded & set(HEAVY)) == []


@pytest.mark.parametrize(
    "module", ["train", "evaluate", "features", "probes", "models", "loop", "checkpoints", "distributed"]
)
def test_only_pretraining_depends_on_lightly(module):
    """lightly (and what it pulls in) is pretraining's alone: no other learn module reaches it, even through a
    function-level import, so a new lightly reruns pretrainings and nothing else, and no other job imports it."""
    assert "lightly" not in fingerprint.module_packages(f"dermcompress.learn.{module}")
    assert "lightly" in fingerprint.module_packages("dermcompress.learn.pretrain")


@pytest.mark.parametrize("name", sorted(DATA_STAGES))
def test_a_data_stage_imports_only_what_its_work_uses(name):
    loaded = imported_at_start(SCRIPTS / f"{name}.py")
    assert sorted((loaded & {"torch", *HEAVY}) - DATA_STAGES[name]) == []


def test_the_statistics_of_tables_import_no_scipy_stats_or_scikit_learn():
    """Every table and subgroup job runs the paired comparisons: scipy.stats (~1.2 s) and scikit-learn (~2 s)
    would add their import to each of those jobs, for a normal and a t distribution (scipy.special) and midranks
    (pandas)."""
    code = (
        "import sys, dermcompress.study.compare, dermcompress.study.subgroups, dermcompress.study.tables; "
        "print(' '.join(m for m in sys.modules if m.startswith(('scipy.stats', 'sklearn'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
