"""The package's floors (docs/architecture.md): each module imports only the floors below it, never the
package root nor a private name of a sibling; no library file is over about 400 lines; the wheel's package
list is `norga` and its subpackages only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "norga"
# what each top-level part of norga may import from norga (besides itself)
ALLOWED = {
    "_compat": set(),
    "_checks": {"_compat"},
    "_version": set(),
    "gates": {"_checks"},
    "functional": {"_checks", "_compat", "gates"},
    "layers": {"_checks", "gates", "functional"},
    "prompts": {"_checks", "gates", "functional", "layers"},
    "patch": {"_checks", "gates", "functional", "layers"},
    "checkpoint": {"_checks", "_version", "gates", "functional", "layers", "prompts", "patch"},
    "migrate": {"_checks", "gates", "functional", "layers", "prompts", "patch"},
    "distributed": {"_checks", "gates", "functional", "layers", "prompts", "patch", "checkpoint"},
    "cl": {"_checks"},
    "info": {"_checks", "_version", "gates", "functional"},
}
MAX_LINES = 430  # "about 400" (the limit for a file in norga/)
FILES = sorted(p for p in ROOT.rglob("*.py"))


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.parts[0]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module inside norga, imported names) for every import of norga in `path`."""
    tree = ast.parse(path.read_text())
    pkg = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if pkg[-1] != "__init__":
        pkg = pkg[:-1]
    else:
        pkg = pkg[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "norga" or mod.startswith("norga."):
                found.append((mod, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name == "norga" or a.name.startswith("norga.")]
    return found


@pytest.mark.parametrize("path", [p for p in FILES if p.relative_to(ROOT).as_posix() != "__init__.py"], ids=str)
def test_floors(path):
    part = _part(path)
    for mod, names in _imports(path):
        parts = mod.split(".")
        assert len(parts) > 1, f"{path}: imports the package root ({mod})"
        target = parts[1]
        if target == part:
            continue
        assert target in ALLOWED[part], f"{path}: {part} may not import {mod} (allowed: {sorted(ALLOWED[part])})"
        private = [n for n in names if n.startswith("_") and not n.endswith("__")]
        assert not private, f"{path}: imports private names {private} from {mod}"
        if target not in ("_checks", "_compat", "_version"):
            assert not any(p.startswith("_") for p in parts[2:]), f"{path}: imports a private module {mod}"


@pytest.mark.parametrize("path", FILES, ids=str)
def test_file_size(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path}: {lines} lines (the layout keeps files at about 400)"


def test_wheel_holds_only_the_library():
    """setuptools' package discovery (pyproject's `include`) finds norga and its subpackages only."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = pytest.importorskip("setuptools")

    cfg = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = setuptools.find_packages(where=str(ROOT.parent), include=cfg["include"], exclude=cfg.get("exclude", ()))
    assert found and all(p == "norga" or p.startswith("norga.") for p in found), found
    subpackages = {p.parent.relative_to(ROOT.parent).as_posix().replace("/", ".") for p in ROOT.rglob("__init__.py")}
    assert set(found) == subpackages, f"packages missing from the wheel: {subpackages - set(found)}"
