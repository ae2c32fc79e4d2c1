"""The distribution installs as ``farebox.*`` only, and imports point one way:
``tools -> terminal -> {protocol, cardimage}`` (DESIGN.md §1)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cardimage", "protocol", "terminal", "tools")
#: what each package may import from the others
ALLOWED = {
    "cardimage": set(),
    "protocol": set(),
    "terminal": {"cardimage", "protocol"},
    "tools": {"cardimage", "protocol", "terminal"},
}


@pytest.mark.parametrize("name", PACKAGES)
def test_top_level_names_are_not_installed(name, tmp_path):
    """Run from an empty directory (so the checkout is not on sys.path): only farebox.* exists."""
    code = (f"import importlib.util, sys\n"
            f"assert importlib.util.find_spec('farebox.{name}') is not None\n"
            f"sys.exit(0 if importlib.util.find_spec('{name}') is None else 3)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 0, (done.stdout, done.stderr)


def _imports(path: Path) -> set[str]:
    """The farebox packages a module imports (absolute farebox.X, or relative beyond its own)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = path.relative_to(ROOT).parts[0]
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            elif node.level > len(path.relative_to(ROOT).parts) - 1:
                names = ["<outside>"]
        for name in names:
            parts = name.split(".")
            if parts[0] in PACKAGES:
                found.add(f"bare {parts[0]}")  # a top-level import that only works in a checkout
            elif parts[0] == "farebox" and len(parts) > 1 and parts[1] != own:
                found.add(parts[1])
            elif parts[0] == "<outside>":
                found.add("<outside>")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imports(path) - ALLOWED[package]
        if bad:
            wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert wrong == {}


def test_the_import_checker_sees_a_wrong_import(tmp_path, monkeypatch):
    """The checker above must be able to fail."""
    module = ROOT / "cardimage" / "_probe_wrong_import.py"
    module.write_text("from farebox.terminal.rules import Tariff\nimport tools\n")
    try:
        assert _imports(module) == {"terminal", "bare tools"}
    finally:
        module.unlink()
