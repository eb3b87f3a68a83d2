"""The parts of the package import downwards only, checked on what decides reruns: each module's code-fingerprint
closure (its transitive package imports, function-level ones included). data <- learn <- study, with provenance
beside study; `dermcompress` itself and `dermcompress.errors` are open to all, config and cli to none."""

from __future__ import annotations

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
