"""Code fingerprints: a hash of a package module and every package module it imports, transitively.

Snakemake sees edits to a rule's script but not to the package the script calls. Each rule passes the
fingerprint of its stage module as a param, so an edit to dermcompress/degrade.py reruns degradation and what
follows, and nothing upstream.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE = "dermcompress"
PACKAGE_DIR = Path(__file__).resolve().parent


def _module_path(module: str) -> Path:
    parts = module.split(".")[1:]
    path = PACKAGE_DIR.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _package_imports(module: str) -> set[str]:
    """Package modules imported by `module` (absolute and relative imports, `from pkg import mod` too)."""
    tree = ast.parse(_module_path(module).read_text())
    found: set[str] = set()
    package = module if _module_path(module).name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
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
            if name.split(".")[0] == PACKAGE and _module_path(name).is_file():
                found.add(name)
    return found


@cache
def module_closure(module: str) -> tuple[str, ...]:
    """`module` and every package module reachable through its imports, sorted."""
    seen, todo = set(), [module, PACKAGE]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_package_imports(name) - seen)
    return tuple(sorted(seen))


@cache
def module_fingerprint(module: str) -> str:
    """sha256 (first 16 hex digits) over the source of `module`'s closure, names included."""
    digest = hashlib.sha256()
    for name in module_closure(module):
        digest.update(name.encode() + b"\0" + _module_path(name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def package_fingerprint() -> str:
    """sha256 (first 16 hex digits) over every source file of the package."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
