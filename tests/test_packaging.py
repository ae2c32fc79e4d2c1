"""The distribution installs as ``farebox.*`` only, and imports point one way: the import-linter
contracts in pyproject.toml (``tools -> {terminal, clearing} -> protocol -> cardimage``, the rooms
inside terminal and protocol, a pure core) hold. Nothing here writes into the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the folders installed as farebox.<folder> (setup.py)
PACKAGES = ("cardimage", "protocol", "terminal", "clearing", "tools")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@pytest.mark.parametrize("name", PACKAGES)
def test_top_level_names_are_not_installed(name, tmp_path):
    """Run from an empty directory (so the checkout is not on sys.path): only farebox.* exists."""
    code = (f"import importlib.util, sys\n"
            f"assert importlib.util.find_spec('farebox.{name}') is not None\n"
            f"sys.exit(0 if importlib.util.find_spec('{name}') is None else 3)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 0, (done.stdout, done.stderr)


def test_every_package_under_the_folders_is_installed(tmp_path):
    """Package discovery: every folder with an __init__.py under an installed folder imports as
    farebox.<its dotted path> from outside the checkout."""
    found = sorted(".".join(init.parent.relative_to(ROOT).parts)
                   for folder in PACKAGES for init in (ROOT / folder).rglob("__init__.py"))
    code = ("import importlib, sys\n"
            f"for name in {found!r}:\n"
            "    importlib.import_module('farebox.' + name)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert {"terminal.core", "terminal.store", "protocol.sim", "clearing"} <= set(found)


def _lint_imports(tree: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_import_contracts_are_kept():
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 4 kept, 0 broken." in done.stdout


def _copy_of_the_tree(tmp_path: Path) -> Path:
    """The installed folders as a plain farebox/ package tree beside a copy of pyproject.toml."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / "farebox" / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize("module, line, broken", [
    ("cardimage/money.py", "from farebox.terminal.core import rules",
     "farebox.cardimage is not allowed to import farebox.terminal"),
    ("clearing/store.py", "from farebox.terminal.store import journal",
     "farebox.clearing is not allowed to import farebox.terminal"),
    ("terminal/core/rules.py", "import sqlite3",
     "farebox.terminal.core is not allowed to import sqlite3"),
    ("terminal/store/journal.py", "from farebox.terminal.card import tap",
     "farebox.terminal.store is not allowed to import farebox.terminal.card"),
    ("protocol/transports/pcsc.py", "from farebox.protocol.sim import card",
     "farebox.protocol.transports is not allowed to import farebox.protocol.sim"),
])
def test_a_wrong_import_breaks_a_contract(tmp_path, module, line, broken):
    """The contracts can fail: the same check on a copy of the tree with one import against them
    (the copy comes first on the path, so the check reads it and not the checkout)."""
    tree = _copy_of_the_tree(tmp_path)
    with open(tree / "farebox" / module, "a", encoding="utf-8") as handle:
        handle.write(f"\n{line}\n")
    done = _lint_imports(tree, pythonpath=tree)
    assert done.returncode == 1, done.stdout + done.stderr
    assert broken in done.stdout


def test_the_sdist_carries_hw_docs_tests_and_an_spdx_license(tmp_path):
    """Built by the build backend from the files git tracks (as a release would be): the Pi
    install (hw/), docs, tests and benchmarks are in it, and the license is an SPDX expression
    (setuptools stops accepting a TOML table there in February 2027)."""
    import tarfile

    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode().split("\0")
    if not any(tracked):
        pytest.skip("not a git checkout")
    tree = tmp_path / "tree"
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    out = tmp_path / "dist"
    code = ("import sys, warnings\nfrom setuptools import build_meta\n"
            "warnings.simplefilter('error', category=DeprecationWarning)\n"
            "print(build_meta.build_sdist(sys.argv[1]))\n")
    done = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code, str(out)],
                          cwd=tree, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "License classifiers are deprecated" not in done.stderr
    with tarfile.open(out / done.stdout.strip().splitlines()[-1]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
        pkg_info = sdist.extractfile(next(m for m in sdist.getmembers()
                                          if m.name.count("/") == 1 and
                                          m.name.endswith("/PKG-INFO"))).read().decode()
    for wanted in ("hw/install.sh", "hw/farebox.service", "hw/terminal.toml", "docs/cli.md",
                   "tests/test_packaging.py", "bootstrap.sh", "LICENSE", "README.md",
                   "terminal/store/journal.py", "clearing/migrations/sqlite/0002-schema-v2.sql",
                   "clearing/migrations/postgresql/0002-schema-v2.sql"):
        assert wanted in names, wanted
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
    assert "License-Expression: MIT" in pkg_info
    assert "Classifier: Operating System :: POSIX :: Linux" in pkg_info


def _pins(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """{name: (version, hashes)} of a pip requirements file written with hashes."""
    import re

    from packaging.utils import canonicalize_name

    pins: dict[str, tuple[str, list[str]]] = {}
    for entry in re.split(r"\n(?=[A-Za-z0-9])", lock.read_text()):
        head = entry.split("\\", 1)[0].split(";", 1)[0].strip()
        if "==" not in head:
            continue
        name, version = head.split("==")
        pins[canonicalize_name(name)] = (version.strip(), re.findall(r"--hash=sha256:(\w+)", entry))
    return pins


@pytest.mark.parametrize("lock, extras", [
    ("requirements.lock", ("all", "test", "nfc", "pcsc", "clearing", "pkcs11")),
    ("hw/requirements.lock", ("nfc", "pcsc", "pkcs11")),
])
def test_the_locks_pin_every_dependency_with_hashes(lock, extras):
    """bootstrap.sh and hw/install.sh install from these (pip --require-hashes): each must pin
    every dependency pyproject.toml names for what it installs, at a version its lower bound
    admits, with hashes; a changed pyproject.toml without `hw/lock.sh` fails here."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [Requirement(text) for text in project["project"]["dependencies"]]
    for extra in extras:
        wanted += [Requirement(text) for text in project["project"]["optional-dependencies"][extra]]
    wanted += [Requirement(text) for text in project["build-system"]["requires"]]
    pins = _pins(ROOT / lock)
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        if name == "farebox":
            continue  # farebox[...] naming its own extras
        assert name in pins, f"{lock} does not pin {requirement.name}: run hw/lock.sh"
        version, hashes = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), \
            f"{lock}: {name}=={version} is outside {requirement}: run hw/lock.sh"
        assert hashes, f"{lock}: {name} has no hash"
    assert all(hashes for _, hashes in pins.values())


def test_bootstrap_and_install_sh_install_from_the_locks():
    bootstrap = (ROOT / "bootstrap.sh").read_text()
    install = (ROOT / "hw" / "install.sh").read_text()
    assert "--require-hashes" in bootstrap and "-r requirements.lock" in bootstrap
    assert "--require-hashes" in install and 'hw/requirements.lock"' in install


def test_the_wheel_carries_the_clearing_migrations(tmp_path):
    """The schema migrations are package data: farebox.clearing.migrate reads them from the
    installed package, so the wheel built from the tracked files must hold every one."""
    import zipfile

    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode().split("\0")
    if not any(tracked):
        pytest.skip("not a git checkout")
    tree = tmp_path / "tree"
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    out = tmp_path / "dist"
    code = ("import sys\nfrom setuptools import build_meta\n"
            "print(build_meta.build_wheel(sys.argv[1]))\n")
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=tree, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with zipfile.ZipFile(out / done.stdout.strip().splitlines()[-1]) as wheel:
        names = set(wheel.namelist())
    shipped = {f"farebox/{path.relative_to(ROOT).as_posix()}"
               for path in (ROOT / "clearing" / "migrations").rglob("*.sql")}
    from farebox.clearing.migrate import MIGRATIONS

    assert len(shipped) == 2 * len(MIGRATIONS) and shipped <= names, shipped - names
    # the web console's templates and static assets (served from the package, no CDN)
    console = {f"farebox/{path.relative_to(ROOT).as_posix()}"
               for folder in ("templates", "static")
               for path in (ROOT / "clearing" / "console" / folder).iterdir()}
    assert len(console) >= 10 and console <= names, console - names
