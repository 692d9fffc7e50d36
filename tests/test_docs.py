"""The README and docs/ stay true to the tree: every relative link and image resolves (an
``#anchor`` to a heading GitHub would slug to it), and every command and path the README's quick
start and the docs name exists. A page moved or renamed, a heading reworded, a module or script
renamed by a refactor: each fails here, by file and link, instead of in a reader's browser.

Plain text only (no torch, no MLflow): it runs in a fraction of a second."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`+[^`]*`+")
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title" follows)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str, code: str = "drop") -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks; inline code spans dropped (a link inside
    one is no link) or, with ``code="text"``, kept as their text (a heading's anchor has it)."""
    out, fenced = [], False
    for no, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            keep = (lambda m: m.group(0).strip("`")) if code == "text" else ""
            out.append((no, CODE_SPAN.sub(keep, line)))
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (github-slugger): the rendered text, lower-cased,
    everything but letters, digits, marks, spaces, ``-`` and ``_`` dropped, spaces to ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor, repeated headings numbered as GitHub numbers them (-1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8"), code="text"):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """What is wrong with each relative link of one page, as ``page:line: target: why``."""
    problems = []
    for no, line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}:{no}: {target}"
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in "
                                f"{dest.relative_to(ROOT)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_a_broken_link_or_anchor_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself: a planted missing file, missing image and missing anchor are each
    reported; a good anchor, an external link and a link inside code are not."""
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text(
        "# Sweeps of hundreds of λ × seed jobs\n\n## A `key` here\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n"
        "[ok](docs/b.md#sweeps-of-hundreds-of-λ--seed-jobs) [ok](docs/b.md#a-key-here) [ok](#top)\n"
        "[gone](docs/missing.md) ![img](docs/none.png) [anchor](docs/b.md#nowhere)\n"
        "[web](https://example.org/x) `[code](docs/not-a-link.md)`\n"
        "```\n[fenced](docs/also-not-a-link.md)\n```\n")
    found = broken_links(page)
    assert found == ["README.md:3: docs/missing.md: no such file",
                     "README.md:3: docs/none.png: no such file",
                     "README.md:3: docs/b.md#nowhere: no heading with anchor #nowhere in docs/b.md"]


@pytest.mark.parametrize(("heading", "slug"), [
    ("A second factor: how the best λ depends on it",
     "a-second-factor-how-the-best-λ-depends-on-it"),
    ("λ × learning rate on MNIST-1D (Loshchilov & Hutter)",
     "λ--learning-rate-on-mnist-1d-loshchilov--hutter"),
    ("Before anything trains: help, config errors, run ids",
     "before-anything-trains-help-config-errors-run-ids"),
    ("The `make_sweep` table", "the-make_sweep-table"),
])
def test_headings_slug_as_github_does(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section of a page."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no section '## {title}'"
    return m.group(1)


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)


def test_the_quick_start_is_make_sweep_and_make_test_and_both_are_targets() -> None:
    quick = section(README.read_text(encoding="utf-8"), "Quick start")
    commands = [ln.split("#")[0].strip() for block in code_blocks(quick)
                for ln in block.splitlines() if ln.startswith("make ")]
    assert commands == ["make sweep", "make test"]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for cmd in commands:
        target = cmd.split()[1]
        assert re.search(rf"^{re.escape(target)}\s*:", makefile, re.M), f"no target {target}"


def module_exists(dotted: str) -> bool:
    path = ROOT / "src" / Path(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_every_l2lab_module_the_readme_runs_exists() -> None:
    text = README.read_text(encoding="utf-8")
    modules = set(re.findall(r"python -m (l2lab(?:\.\w+)+)", text))
    assert {"l2lab.train", "l2lab.reproduce"} <= modules  # the README's own examples are seen
    assert sorted(m for m in modules if not module_exists(m)) == []


def section_of_toml(text: str, table: str) -> str:
    """One ``[table]`` of a TOML file as text (tomllib is 3.11+; the project runs on 3.10)."""
    m = re.search(rf"^\[{re.escape(table)}\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert m, f"no [{table}]"
    return m.group(1)


def test_every_console_script_the_readme_names_is_installed() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    table = section_of_toml(pyproject, "project.scripts")
    scripts = dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', table, re.M))
    named = set(re.findall(r"`(l2lab-[a-z]+)`", README.read_text(encoding="utf-8")))
    assert named and sorted(named - set(scripts)) == []
    for target in (scripts[n] for n in named):
        assert module_exists(target.split(":")[0]), target


# a repository path as the pages write it: scripts/x.py, src/l2lab/core/, tests/test_x.py::name
REPO_PATH = re.compile(r"(?<![\w/.-])((?:scripts|src|tests|conf)/[\w./-]*\w/?)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_a_page_names_exists(page: Path) -> None:
    """`scripts/...`, `src/...`, `tests/...` and `conf/...` paths, in prose and in commands:
    a renamed script or module leaves no stale name behind (placeholders such as
    ``mnist1d_<model>.yaml`` are not paths and are skipped)."""
    missing = []
    for no, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        for m in REPO_PATH.finditer(line):
            if line[m.end():m.end() + 1] in ("<", "*", "…", "{"):  # a placeholder, not a path
                continue
            if not (ROOT / m.group(1)).exists():
                missing.append(f"{page.relative_to(ROOT)}:{no}: {m.group(1)}")
    assert missing == []


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_docs_page_says_what_it_is_for_and_links_back(page: Path) -> None:
    """A page opens with its title and a paragraph saying what it is for, linking the README; the
    README links every page, so none is an orphan."""
    text = page.read_text(encoding="utf-8")
    title, _, rest = text.partition("\n\n")
    intro = rest.split("\n\n")[0]
    assert title.startswith("# ") and "](../README.md" in intro
    assert f"](docs/{page.name})" in README.read_text(encoding="utf-8")
