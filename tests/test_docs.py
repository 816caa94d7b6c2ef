"""Every relative link in README.md and docs/ (figures, JSON, notes, other pages) resolves.

A link ``[text](path)`` or ``![alt](path)`` outside code must name a file or folder that exists,
relative to the page; ``path#anchor`` into a Markdown page must name one of its headings (GitHub's
anchors: lower case, punctuation dropped, spaces as hyphens, ``-1``, ``-2`` for repeats).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str, *, blank_code: bool = True) -> list[tuple[int, str]]:
    """The page's lines outside fenced code blocks, inline code spans blanked unless ``blank_code=False``."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, _CODE_SPAN.sub("", line) if blank_code else line))
    return out


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in _prose_lines(page.read_text(encoding="utf-8"), blank_code=False):
        m = _HEADING.match(line)
        if not m:
            continue
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(2))  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def broken_links(page: Path) -> list[str]:
    """``line: target (why)`` for every relative link of ``page`` that does not resolve."""
    broken = []
    # Code spans are blanked first: a link whose text is code keeps its target, `[x](y)` in code is no link.
    for number, line in _prose_lines(page.read_text(encoding="utf-8")):
        for m in _LINK.finditer(line):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
                continue
            path_part, _, anchor = target.partition("#")
            dest = page if not path_part else (page.parent / path_part).resolve()
            if not dest.exists():
                broken.append(f"{number}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{number}: {target} (no heading #{anchor} in {dest.name})")
    return broken


def test_pages_found():
    assert ROOT / "README.md" in PAGES and ROOT / "docs" / "benchmarks.md" in PAGES


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path):
    assert broken_links(page) == []


def test_checker_catches_a_broken_link(tmp_path: Path):
    (tmp_path / "fig.png").write_bytes(b"")
    (tmp_path / "other.md").write_text("# A `code` heading: yes\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "![ok](fig.png) [ok](other.md#a-code-heading-yes) [ok](other.md#twice-1) [web](https://x.y/z)\n"
        "[bad](missing.json) [bad anchor](other.md#nope) `[in code](nothing.md)`\n"
        "```\n[in a block](nothing.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page) == ["2: missing.json (no such file)", "2: other.md#nope (no heading #nope in other.md)"]


_DATA_PATH = re.compile(r"docs/(?:data|img)/[\w.{},=-]+\.(?:json|png)")


def _expand(path: str) -> list[str]:
    """``a_{x,y}_b.json`` → ``a_x_b.json``, ``a_y_b.json`` (shell brace expansion, one level)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for part in m.group(1).split(",") for p in _expand(path[: m.start()] + part + path[m.end() :])]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_named_data_files_exist(page: Path):
    """A JSON or figure named as ``docs/data/...`` or ``docs/img/...`` in the text (code spans too) exists."""
    named = {p for m in _DATA_PATH.finditer(page.read_text(encoding="utf-8")) for p in _expand(m.group(0))}
    assert sorted(p for p in named if not (ROOT / p).exists()) == []


def test_every_data_file_is_referenced():
    """Every JSON and figure under docs/data and docs/img is named somewhere in the docs or the README."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in PAGES)
    named = {Path(p).name for m in _DATA_PATH.finditer(text) for p in _expand(m.group(0))}
    named |= {Path(m.group(1)).name for m in _LINK.finditer(text)}
    files = [p for d in ("data", "img") for p in (ROOT / "docs" / d).iterdir() if p.suffix in (".json", ".png")]
    assert sorted(p.name for p in files if p.name not in named) == []
