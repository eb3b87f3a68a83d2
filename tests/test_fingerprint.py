from pathlib import Path

import pytest

from dermcompress.provenance import fingerprint


def test_closure_follows_package_imports_only():
    closure = fingerprint.module_closure("dermcompress.cli")
    assert "dermcompress.cli" in closure
    assert "dermcompress" in closure  # the package __init__ is always part of it
    assert all(name.startswith("dermcompress") for name in closure)


def test_relative_and_from_imports_are_resolved(tmp_path, monkeypatch):
    pkg = tmp_path / "dermcompress"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\nfrom dermcompress.c import thing\nimport numpy\n")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("thing = 1\n")
    (pkg / "d.py").write_text("")
    monkeypatch.setattr(fingerprint, "PACKAGE_DIR", pkg)
    fingerprint.module_closure.cache_clear()
    fingerprint.module_fingerprint.cache_clear()
    try:
        assert fingerprint.module_closure("dermcompress.a") == (
            "dermcompress",
            "dermcompress.a",
            "dermcompress.b",
            "dermcompress.c",
        )
        before = fingerprint.module_fingerprint("dermcompress.a")
        (pkg / "d.py").write_text("x = 1\n")  # not imported by a: no change
        fingerprint.module_fingerprint.cache_clear()
        assert fingerprint.module_fingerprint("dermcompress.a") == before
        (pkg / "b.py").write_text("x = 1\n")  # imported by a: changes
        fingerprint.module_fingerprint.cache_clear()
        assert fingerprint.module_fingerprint("dermcompress.a") != before
    finally:
        fingerprint.module_closure.cache_clear()
        fingerprint.module_fingerprint.cache_clear()


@pytest.mark.parametrize(
    "module",
    ["data.ingest", "data.task", "data.split", "data.resize", "data.degrade", "data.cache", "data.synth"],
)
def test_every_stage_module_has_a_fingerprint(module):
    assert Path(fingerprint._module_path(f"dermcompress.{module}")).is_file()
    assert len(fingerprint.module_fingerprint(f"dermcompress.{module}")) == 16
