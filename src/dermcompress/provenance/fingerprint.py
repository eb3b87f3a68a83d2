"""Code fingerprints: a hash of a package module and every package module it imports, transitively, and the
versions of the third-party packages those modules import.

Snakemake sees edits to a rule's script but not to the package the script calls. Each rule passes the
fingerprint of its stage module as a param, so an edit to dermcompress/data/degrade.py reruns degradation and what
follows, and nothing upstream. Likewise a new timm reruns training, and a new pandas everything that uses it;
an unrelated install (a linter, a new notebook package) reruns nothing.

A module counts by its syntax tree, not its text: comments, docstrings, blank lines and layout are left out
(ast.parse drops comments; docstrings are removed; ast.dump without line numbers), so a comment or a module
list in a package's docstring reruns nothing, while any change to what the code does reruns what it feeds. The
tree's shape is Python's own, so a new Python minor version reruns every stage once. Only package modules are
normalised: the rules' scripts/*.py are Snakemake's to watch (by their mtime), and .smk files never reach a
fingerprint (a rule's params, inputs and script say what it computes).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
from functools import cache
from pathlib import Path

PACKAGE = "dermcompress"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# Imported, but they only draw progress bars or fetch files: a new version changes no number.
NO_EFFECT = frozenset({"tqdm", "huggingface_hub"})
# What this module works out from the package's source and the installed packages (each module's imports, which
# distribution provides which top-level module, their versions), remembered between processes in results/ of
# the workflow being run while neither changed: working it out parses every module and reads every installed
# package's file list, ~1 s that Snakemake's start and every job's lineage record would pay.
MEMO = Path("results/.lineage/code.json")
# What MEMO holds per module (imports and the hash of the code's tree): a memo of another format is not read.
MEMO_FORMAT = 2


def _module_path(module: str) -> Path:
    parts = module.split(".")[1:]
    path = PACKAGE_DIR.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _statements(tree: ast.AST):
    """Every statement of a module, nested ones (in functions, classes, if/try/with blocks) included.

    Imports are statements: walking statements only, not the expressions inside them (most of the tree), makes
    the scan several times faster than ast.walk, which every job's lineage record pays.
    """
    todo = list(getattr(tree, "body", []))
    while todo:
        node = todo.pop()
        yield node
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            todo.extend(getattr(node, name, ()))


@cache
def _module_info(module: str) -> dict:
    """What MEMO keeps of `module`: the package modules and other top-level names it imports (function-level
    imports included) and the hash of its code (`tree`, normalised_tree); one parse when not remembered."""
    memo = _memo()
    if module not in memo["modules"]:
        tree = ast.parse(_module_path(module).read_text())
        found, external = _parse_imports(module, tree)
        memo["modules"][module] = {
            "imports": sorted(found),
            "external": sorted(external),
            "tree": hashlib.sha256(normalised_tree(tree)).hexdigest(),
        }
        _save(memo)
    return memo["modules"][module]


def _imports(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """(package modules, other top-level names) that `module` imports, function-level imports included."""
    info = _module_info(module)
    return frozenset(info["imports"]), frozenset(info["external"])


def normalised_tree(tree: ast.Module) -> bytes:
    """What a module's code does, as bytes: its syntax tree without docstrings (of the module, its classes and
    functions), dumped without positions. Comments are not in the tree; `tree` is changed in place."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
                node.body = node.body[1:]
    return ast.dump(tree, include_attributes=False).encode()


def _parse_imports(module: str, tree: ast.Module) -> tuple[set[str], set[str]]:
    found: set[str] = set()
    external: set[str] = set()
    package = module if _module_path(module).name == "__init__.py" else module.rpartition(".")[0]
    for node in _statements(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] != PACKAGE:
                external.add(name.split(".")[0])
            elif _module_path(name).is_file():
                found.add(name)
    return found, external - set(sys.stdlib_module_names) - {"", "__future__"}


def _package_imports(module: str) -> set[str]:
    """Package modules imported by `module` (absolute and relative imports, `from pkg import mod` too)."""
    return set(_imports(module)[0])


@cache
def module_closure(module: str) -> tuple[str, ...]:
    """`module` and every package module reachable through its imports, sorted."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_package_imports(name) - seen)
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
            todo.extend(name.rsplit(".", n)[0] for n in range(1, name.count(".") + 1))
    return tuple(sorted(seen))


@cache
def module_fingerprint(module: str) -> str:
    """sha256 (first 16 hex digits) over the code of `module`'s closure (each module's normalised_tree), names
    included."""
    digest = hashlib.sha256()
    for name in module_closure(module):
        digest.update(name.encode() + b"\0" + _module_info(name)["tree"].encode() + b"\0")
    return digest.hexdigest()[:16]


def package_fingerprint() -> str:
    """sha256 (first 16 hex digits) over every source file of the package."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _installed_state() -> list:
    """What the import-name -> distribution map depends on: the interpreter and the package metadata folders
    (*.dist-info, *.egg-info) on sys.path, with their times (installing, upgrading or removing a package adds,
    renames or removes one)."""
    folders = []
    # Each folder once, whatever order or how often it is on the path (a Snakemake job's script adds some again).
    for entry in sorted({os.path.realpath(p or ".") for p in sys.path}):
        try:
            with os.scandir(entry) as listing:
                found = sorted(
                    [e.name, e.stat().st_mtime_ns]
                    for e in listing
                    if e.name.endswith((".dist-info", ".egg-info"))
                )
        except OSError:
            continue
        if found:
            folders.append([entry, found])
    return [sys.executable, sys.version, folders]


@cache
def _memo() -> dict:
    """MEMO as it stands for this source and these installed packages (an empty one if either changed)."""
    key = [MEMO_FORMAT, _installed_state(), package_fingerprint()]
    try:
        memo = json.loads(MEMO.read_text())
        if memo["key"] == key:
            return memo
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {"key": key, "distributions": None, "versions": {}, "modules": {}}


def _save(memo: dict) -> None:
    """Write MEMO, but only into a workflow's existing results/ folder (never create one elsewhere)."""
    if not MEMO.parents[1].is_dir():
        return
    try:
        MEMO.parent.mkdir(parents=True, exist_ok=True)
        tmp = MEMO.with_name(f".{MEMO.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, MEMO)
    except OSError:  # a read-only folder: no memo, the same answers
        pass


def _distributions() -> dict[str, list[str]]:
    """importlib.metadata.packages_distributions(), remembered in MEMO."""
    memo = _memo()
    if memo["distributions"] is None:
        memo["distributions"] = importlib.metadata.packages_distributions()
        _save(memo)
    return memo["distributions"]


def _version(distribution: str) -> str | None:
    """The installed version of `distribution` (None if absent), remembered in MEMO."""
    memo = _memo()
    if distribution not in memo["versions"]:
        try:
            memo["versions"][distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            memo["versions"][distribution] = None
        _save(memo)
    return memo["versions"][distribution]


def module_packages(module: str) -> dict[str, str | None]:
    """{distribution: installed version (None if absent)} of what `module`'s closure imports from outside."""
    names = set().union(*(_imports(name)[1] for name in module_closure(module))) - NO_EFFECT
    dists = {dist for name in names for dist in _distributions().get(name, [name])}
    return {dist: _version(dist) for dist in sorted(dists, key=str.lower)}


def code_fingerprint(module: str, *, packages: bool = True) -> dict:
    """What a rule running `module` depends on besides its inputs: the package source of its closure and,
    unless the job runs in its own (conda) environment, the versions of the packages it imports here."""
    return {"source": module_fingerprint(module), "packages": module_packages(module) if packages else "env"}


def package_versions() -> dict[str, str | None]:
    """Python and every third-party package the package imports, as installed in this interpreter."""
    modules = [
        ".".join([PACKAGE, *path.relative_to(PACKAGE_DIR).with_suffix("").parts]).removesuffix(".__init__")
        for path in PACKAGE_DIR.rglob("*.py")
    ]
    packages: dict[str, str | None] = {}
    for module in modules:
        packages.update(module_packages(module))
    return {
        "python": platform.python_version(),
        **dict(sorted(packages.items(), key=lambda kv: kv[0].lower())),
    }
