"""The documentation lives in the repository (docs/) and everything that cites it resolves in a
clone: no file cites the old documents outside the repository, every ``docs/...md`` path named
anywhere exists, every link and anchor inside docs/ leads somewhere, every ``docs/rules.md §N``
names a section that exists, every seed a citation names is in docs/seeds/, and docs/cli.md names
every command and option of the ``farebox`` command."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import click
import pytest

from farebox.tools.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: spelled in two parts so that this file does not cite it itself
OUTSIDE = ".." + "/shared"
_SKIP_PARTS = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis"}
_TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".sh", ".cfg", ".ini", ".service", ".conf",
                  ".rules", ".json", ".yml", ".yaml", ""}


def _tracked_files() -> list[Path]:
    """The repository's files: what git tracks, or (no git, e.g. an unpacked archive) every file
    under the root outside the virtualenv, caches and build metadata."""
    try:
        done = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                               "--exclude-standard"], cwd=ROOT, capture_output=True,
                              check=True, timeout=60)
        names = [name for name in done.stdout.decode().split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        names = []
    if names:
        return [ROOT / name for name in names if (ROOT / name).is_file()]
    return [path for path in ROOT.rglob("*") if path.is_file()
            and not _SKIP_PARTS & set(path.relative_to(ROOT).parts)
            and not any(part.endswith(".egg-info") for part in path.parts)]


def _texts() -> dict[Path, str]:
    texts = {}
    for path in _tracked_files():
        if path.suffix not in _TEXT_SUFFIXES:
            continue
        try:
            texts[path] = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
    return texts


TEXTS = _texts()


def _where(path: Path, text: str, index: int) -> str:
    return f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, index) + 1}"


def test_the_files_are_found():
    """The checks below look at the whole repository, not at nothing."""
    names = {path.relative_to(ROOT).as_posix() for path in TEXTS}
    assert {"README.md", "docs/cli.md", "docs/rules.md", "docs/readers.md",
            "docs/architecture.md", "docs/seeds/README.md", "terminal/core/rules.py"} <= names


def test_no_file_cites_documents_outside_the_repository():
    found = [_where(path, text, match.start()) for path, text in TEXTS.items()
             for match in re.finditer(re.escape(OUTSIDE), text)]
    assert not found, f"cite docs/ instead of {OUTSIDE}: {found}"


_DOCS_PATH = re.compile(r"(?<![\w/.])docs/[\w./-]*\w")


def test_every_docs_path_cited_exists():
    cited = 0
    missing = []
    for path, text in TEXTS.items():
        if path == Path(__file__).resolve():
            continue  # its patterns are not citations
        for match in _DOCS_PATH.finditer(text):
            cited += 1
            if not (ROOT / match.group()).exists():
                missing.append(f"{_where(path, text, match.start())}: {match.group()}")
    assert not missing
    assert cited > 30  # the code and tests cite docs/ pages, not only the README


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


_LINK = re.compile(r"\]\(([^)\s]+)\)")
MARKDOWN = sorted([ROOT / "README.md", *DOCS.rglob("*.md")])


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_anchors_resolve(page):
    text = page.read_text(encoding="utf-8")
    broken = []
    for match in _LINK.finditer(text):
        target = match.group(1)
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(target)
        elif anchor and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, broken


def test_slug_matches_github():
    assert _slug(" 3. Payment (deduction)") == "3-payment-deduction"
    assert _slug("PC/SC (pyscard)") == "pcsc-pyscard"
    assert _slug("Settlement: terminal, batch") == "settlement-terminal-batch"


_RULES_SECTION = re.compile(r"docs/rules\.md (?:sections? )?§(\d+)((?:(?:-|, | and )§?\d+)*)")


def test_rules_sections_cited_exist():
    sections = {int(m.group(1)) for m in re.finditer(
        r"^## (\d+)\. ", (DOCS / "rules.md").read_text(encoding="utf-8"), flags=re.M)}
    assert sections == set(range(1, 10))
    cited = 0
    wrong = []
    for path, text in TEXTS.items():
        for match in _RULES_SECTION.finditer(text):
            numbers = [int(n) for n in re.findall(r"\d+", match.group(1) + match.group(2))]
            cited += 1
            if not set(numbers) <= sections:
                wrong.append(f"{_where(path, text, match.start())}: {match.group()}")
    assert not wrong
    assert cited > 20


_SEED_CITATION = re.compile(r"\b(00\d) (?:§|¶)")


def test_every_seed_cited_is_in_the_repository():
    seeds = {path.name[:3] for path in (DOCS / "seeds").glob("0*.txt")}
    assert seeds == {"000", "001", "002", "003", "004"}
    cited = {m.group(1) for text in TEXTS.values() for m in _SEED_CITATION.finditer(text)}
    assert cited and cited <= seeds
    index = (DOCS / "seeds" / "README.md").read_text(encoding="utf-8")
    for path in (DOCS / "seeds").glob("0*.txt"):
        assert path.name in index


def _commands(group: click.Group, prefix: str):
    ctx = click.Context(group, info_name=prefix)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        full = f"{prefix} {name}"
        if isinstance(command, click.Group):
            yield from _commands(command, full)
        else:
            yield full, command


COMMANDS = dict(_commands(cli, "farebox"))


def test_every_command_is_in_the_contract():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert len(COMMANDS) > 30
    missing = [name for name in COMMANDS if name not in text]
    assert not missing


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_in_the_contract(name):
    """Each option of the command appears in the docs/cli.md section with its synopsis."""
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    start = re.search(rf"^{re.escape(name)}\b", text, flags=re.M).start()  # its synopsis
    section = text[text.rindex("\n## ", 0, start):]
    end = section.find("\n## ", 1)
    section = section if end < 0 else section[:end]
    options = [flag for param in COMMANDS[name].params if isinstance(param, click.Option)
               for flag in param.opts if flag.startswith("--") and flag != "--help"]
    missing = [flag for flag in options if not re.search(re.escape(flag) + r"\b", section)]
    assert not missing
