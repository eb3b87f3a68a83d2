from pathlib import Path

import pytest

from dermcompress.provenance import fingerprint


def test_closure_follows_package_imports_only():
    closure = fingerprint.module_closure("dermcompress.cli")
    assert "dermcompress.cli" in closure
    assert "dermcompress" in closure  # the package __init__ is always part of it
    assert all(name.startswith("dermcompress") for name in closure)


def forget() -> None:
    """Drop what this process remembers of the package (its memo, each module's imports and tree, closures)."""
    for name in ("_memo", "_module_info", "module_closure", "module_fingerprint"):
        getattr(fingerprint, name).cache_clear()


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A small `dermcompress` package in tmp_path standing for the real one (no memo file: no results/ there)."""
    pkg = tmp_path / "dermcompress"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\nfrom dermcompress.c import thing\nimport numpy\n")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("thing = 1\n")
    (pkg / "d.py").write_text("")
    monkeypatch.setattr(fingerprint, "PACKAGE_DIR", pkg)
    monkeypatch.chdir(tmp_path)
    forget()
    yield pkg
    forget()


def test_relative_and_from_imports_are_resolved(package):
    assert fingerprint.module_closure("dermcompress.a") == (
        "dermcompress",
        "dermcompress.a",
        "dermcompress.b",
        "dermcompress.c",
    )
    before = fingerprint.module_fingerprint("dermcompress.a")
    (package / "d.py").write_text("x = 1\n")  # not imported by a: no change
    forget()
    assert fingerprint.module_fingerprint("dermcompress.a") == before
    (package / "b.py").write_text("x = 1\n")  # imported by a: changes
    forget()
    assert fingerprint.module_fingerprint("dermcompress.a") != before


CODE = '''"""A module."""

import numpy


class Shape:
    """A class."""

    def area(self, side):
        """A method."""
        return side * side  # squared


def scale(x, factor=2):
    return x * factor
'''


@pytest.mark.parametrize(
    ("edit", "reruns"),
    [
        # Comments, docstrings (of the module, a class, a function), blank lines and layout: not code.
        (lambda s: s.replace("# squared", "# the square of the side") + "\n# an edit\n", False),
        (lambda s: s.replace('"""A module."""', '"""A module that lists: a, b, c.\n\nMore."""'), False),
        (lambda s: s.replace('"""A method."""', '"""The area."""'), False),
        (lambda s: s.replace('    """A class."""\n\n', ""), False),
        (lambda s: s.replace("x * factor", "(x *\n            factor)").replace("\n\n\n", "\n\n\n\n"), False),
        # What the code does.
        (lambda s: s.replace("factor=2", "factor=3"), True),
        (lambda s: s.replace("side * side", "side * side * 1"), True),
        (lambda s: s + "\nEDITED = True\n", True),
        # A string statement that is not the first of its body is code, not a docstring.
        (
            lambda s: s.replace(
                "    return x * factor", '    x = x\n    "not a docstring"\n    return x * factor'
            ),
            True,
        ),
    ],
)
def test_only_a_change_to_what_the_code_does_changes_the_fingerprint(package, edit, reruns):
    module = package / "b.py"
    module.write_text(CODE)
    forget()
    before = fingerprint.module_fingerprint("dermcompress.a")
    module.write_text(edit(CODE))
    forget()
    assert (fingerprint.module_fingerprint("dermcompress.a") != before) == reruns


@pytest.mark.parametrize(
    "module",
    ["data.ingest", "data.task", "data.split", "data.resize", "data.degrade", "data.cache", "data.synth"],
)
def test_every_stage_module_has_a_fingerprint(module):
    assert Path(fingerprint._module_path(f"dermcompress.{module}")).is_file()
    assert len(fingerprint.module_fingerprint(f"dermcompress.{module}")) == 16
