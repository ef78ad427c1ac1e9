"""The package layering: every import points down (core < models < pipeline < training, generation <
evaluation, tuning < lipsync), `core/` imports nothing of ours, no `_private` name crosses a package, and only
lipsync's own entry points import `lipsync`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS_BOTTOM_UP = (
    ("core",),
    ("models",),
    ("pipeline",),
    ("training", "generation"),
    ("evaluation", "tuning"),
    ("lipsync",),
)
LAYERS = {pkg: level for level, pkgs in enumerate(LAYERS_BOTTOM_UP) for pkg in pkgs}

ENTRY_POINTS = ("lipsync.cli", "lipsync.demo")


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) for every import in a file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
    return found


def package_files() -> list[tuple[str, Path]]:
    return [(pkg, path) for pkg in LAYERS for path in sorted((ROOT / pkg).rglob("*.py"))]


def arrows() -> list[tuple[str, str, list[str], str]]:
    """(importing package, imported package, names, where) for every import between our packages."""
    found = []
    for pkg, path in package_files():
        for module, names, line in imports_of(path):
            top = module.split(".")[0]
            if top in LAYERS and top != pkg:
                found.append((pkg, top, names, f"{path.relative_to(ROOT)}:{line} imports {module}"))
    return found


def test_the_tree_has_the_packages_it_layers() -> None:
    assert all((ROOT / pkg / "__init__.py").exists() for pkg in LAYERS)
    assert len(package_files()) > 50


def test_every_import_points_down() -> None:
    upward = [where for src, dst, _, where in arrows() if LAYERS[dst] >= LAYERS[src]]
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def test_core_imports_nothing_of_ours() -> None:
    assert not [where for src, _, _, where in arrows() if src == "core"]


def test_no_private_name_crosses_a_package() -> None:
    crossing = [where for _, _, names, where in arrows() if any(n.startswith("_") for n in names)]
    crossing += [where for _, dst, names, where in arrows() if "._" in where.split(" imports ")[1]]
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("folder", ["benchmarks", "tests"])
def test_only_the_entry_points_import_lipsync(folder: str) -> None:
    """Scripts and tests use `lipsync` only through its entry points (the command line and the demo)."""
    users = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for module, _, line in imports_of(path)
        if module.split(".")[0] == "lipsync" and module not in ENTRY_POINTS
    ]
    assert not users, "\n".join(users)
