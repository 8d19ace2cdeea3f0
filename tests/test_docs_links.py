"""The documentation's links hold: every relative link in README.md and docs/*.md points
at a file that exists (and, with ``#anchor``, at a heading of that file), none points
into ``src/`` (modules move; the docs name the public API instead), and the README
stays a front door (at most 400 lines, the plugin section within its first 120).

Standard library only; no network, no import of fedunlearn.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

README_MAX_LINES = 400
PLUGIN_HEADING = "## Add unlearning to your own Flower app"
PLUGIN_WITHIN = 120

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); the text may hold one level of brackets.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            continue
        out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation other than
    '-' and '_' dropped, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the headings of a markdown file (repeats get -1, -2, ...),
    plus explicit <a name/id> anchors."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(_HTML_ANCHOR.findall(line))
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        if base in seen:
            seen[base] += 1
            found.add(f"{base}-{seen[base]}")
        else:
            seen[base] = 0
            found.add(base)
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside code blocks and code spans."""
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in _LINK.finditer(_CODE_SPAN.sub("", line)):
            out.append((number, match.group(1).strip("<>")))
    return out


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def relative_links(path: Path) -> list[tuple[int, str]]:
    return [(n, t) for n, t in links(path) if not is_external(t)]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_there_are_pages_and_links():
    assert README.exists() and DOCS.is_dir()
    assert len(PAGES) > 2
    assert relative_links(README), "the README links into docs/"


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_relative_links_point_at_existing_files_and_headings(page):
    problems = []
    for number, target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(file_part)).resolve() if file_part else page
        where = f"{_id(page)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: {file_part} does not exist")
            continue
        if anchor:
            if dest.is_dir() or dest.suffix.lower() != ".md":
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif unquote(anchor).lower() not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_no_link_points_into_the_source_tree(page):
    """Modules move; name the public API (e.g. ``fedunlearn.UnlearningService``)."""
    src = (ROOT / "src").resolve()
    into_src = []
    for number, target in relative_links(page):
        file_part = target.partition("#")[0]
        if not file_part:
            continue
        dest = (page.parent / unquote(file_part)).resolve()
        if dest == src or src in dest.parents:
            into_src.append(f"{_id(page)}:{number}: {target}")
    assert not into_src, "links into src/:\n" + "\n".join(into_src)


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    heading_at = [i for i, line in enumerate(lines, 1) if line.strip() == PLUGIN_HEADING]
    assert heading_at, f"README.md has no {PLUGIN_HEADING!r}"
    assert heading_at[0] <= PLUGIN_WITHIN, f"{PLUGIN_HEADING!r} is on line {heading_at[0]}"


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=_id)
def test_every_docs_page_has_a_title_and_is_listed_in_the_index(page):
    first = page.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# "), f"{_id(page)} does not start with a title"
    if page.name.lower() in ("readme.md", "index.md"):
        return
    index = next(p for p in (DOCS / "README.md", DOCS / "index.md") if p.exists())
    listed = {(index.parent / t.partition("#")[0]).resolve() for _, t in relative_links(index)}
    assert page.resolve() in listed, f"{_id(index)} does not list {page.name}"


def test_the_link_checker_catches_what_it_should(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A `code`, heading!\n\n## Twice\n\n## Twice\n")
    page.write_text(
        "# Title\n\n[ok](other.md#a-code-heading) [twice](other.md#twice-1) [self](#title)\n"
        "[web](https://example.org) `[not a link](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n"
        "[missing](nowhere.md) [bad anchor](other.md#nope)\n"
    )
    assert links(page) == [
        (3, "other.md#a-code-heading"), (3, "other.md#twice-1"), (3, "#title"),
        (4, "https://example.org"), (8, "nowhere.md"), (8, "other.md#nope"),
    ]
    assert {"a-code-heading", "twice", "twice-1"} <= anchors(tmp_path / "other.md")
    assert slug("Run-config keys (`[tool.flwr.app.config]` in `pyproject.toml`)") == \
        "run-config-keys-toolflwrappconfig-in-pyprojecttoml"
