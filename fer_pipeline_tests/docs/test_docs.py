"""The README and the documentation site (docs/, mkdocs.yml; `make docs`): the site builds with
MkDocs in strict mode without a warning, the README stays short, every relative link in the README
and in docs/ reaches an existing file (and heading), and every page is in the site's navigation.

Fast: one MkDocs build of a few pages (about a second) and some text parsing."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml

from fer_pipeline_tests.conftest import REPO
from fer_pipeline_tests.servers import unavailable

README = REPO / "README.md"
DOCS = REPO / "docs"
MKDOCS_YML = REPO / "mkdocs.yml"
README_MAX_LINES = 300

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
# [text](target) and ![alt](target), an optional "title" after the target.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
EXTERNAL = ("http://", "https://", "mailto:")


def _mkdocs_available() -> bool:
    if importlib.util.find_spec("mkdocs") is not None:
        return True
    unavailable("the documentation build", "mkdocs is not installed (pip install -e '.[test]' brings it)")


def _build(config: Path, site_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site_dir)], cwd=config.parent, capture_output=True, text=True,
                          timeout=300)


def _warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if "WARNING" in line]


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (their brackets are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slugify(heading: str) -> str:
    """The id MkDocs (Python-Markdown's toc extension) gives a heading: its text without markup,
    ASCII, lowercase, punctuation other than '-' and '_' dropped, runs of spaces/'-' to one '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"[`*]|(?<!\w)_|_(?!\w)", "", text)  # code and emphasis markers
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(markdown: str) -> set[str]:
    """Every heading's id in a page, with MkDocs' suffixes for repeated headings (`_1`, `_2`…)."""
    seen: set[str] = set()
    for match in HEADING.finditer(FENCE.sub("", markdown)):
        slug = base = slugify(match.group(2))
        n = 0
        while slug in seen:
            n += 1
            slug = f"{base}_{n}"
        seen.add(slug)
    return seen


def broken_links(page: Path) -> list[str]:
    """Each relative link of a Markdown page whose file, or heading in that file, does not exist."""
    problems = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if target.lower().startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{page.relative_to(REPO)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{page.relative_to(REPO)}: {target} (no heading #{anchor} in {dest.name})")
    return problems


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def _nav_files(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [] if nav.lower().startswith(EXTERNAL) else [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in _nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in _nav_files(value)]
    return []


def test_site_builds_strict_without_warnings(tmp_path: Path) -> None:
    _mkdocs_available()
    result = _build(MKDOCS_YML, tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not _warnings(output), output
    assert (tmp_path / "site" / "index.html").is_file()
    for page in _pages():
        built = tmp_path / "site" / page.relative_to(DOCS).with_suffix("") / "index.html"
        if page.name == "index.md":
            built = tmp_path / "site" / page.relative_to(DOCS).parent / "index.html"
        assert built.is_file(), f"{page.relative_to(REPO)} was not built ({built})"


def test_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    """The build check can fail: the same site plus one link to a page that does not exist."""
    _mkdocs_available()
    shutil.copytree(DOCS, tmp_path / "docs")
    config = yaml.safe_load(MKDOCS_YML.read_text(encoding="utf-8"))
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    with (tmp_path / "docs" / "index.md").open("a", encoding="utf-8") as f:
        f.write("\nSee [the missing page](no-such-page.md) and [a missing heading](data.md#no-such-heading).\n")
    result = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and any("no-such-page.md" in w for w in _warnings(output)), output


def test_readme_is_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_no_broken_relative_links() -> None:
    pages = [README, *_pages()]
    assert len(pages) > 1, "no documentation pages under docs/"
    problems = [p for page in pages for p in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_readme_links_every_docs_page() -> None:
    """A newcomer reaches every page from the README."""
    linked = {(README.parent / t.partition("#")[0]).resolve()
              for t in LINK.findall(_prose(README.read_text(encoding="utf-8")))
              if not t.lower().startswith(EXTERNAL) and t.partition("#")[0]}
    missing = [str(p.relative_to(REPO)) for p in _pages() if p.resolve() not in linked]
    assert not missing, f"README.md links none of: {missing}"


def test_link_checker_finds_broken_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The link check can fail: a missing file, a missing heading; code is not a link."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "other.md").write_text("# Other\n\n## Face detection (`faces: detect`)\n\n## Notes\n\n## Notes\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#face-detection-faces-detect) [ok](other.md#notes_1) [ok](#top)\n"
                    "# Top\n`[code](not-a-link.md)`\n```\n[fenced](not-a-link.md)\n```\n"
                    "[gone](gone.md) ![img](img/gone.png) [bad anchor](other.md#nope) [web](https://example.com/x)\n"
                    "[bad here](#nowhere)\n")
    assert broken_links(page) == ["page.md: gone.md (no such file)", "page.md: img/gone.png (no such file)",
                                  "page.md: other.md#nope (no heading #nope in other.md)",
                                  "page.md: #nowhere (no heading #nowhere in page.md)"]


def test_every_docs_page_is_in_the_nav() -> None:
    config = yaml.safe_load(MKDOCS_YML.read_text(encoding="utf-8"))
    assert Path(config.get("docs_dir", "docs")) == Path("docs")
    nav = _nav_files(config.get("nav"))
    pages = {str(p.relative_to(DOCS)) for p in _pages()}
    assert not pages - set(nav), f"pages not in mkdocs.yml's nav: {sorted(pages - set(nav))}"
    assert not set(nav) - pages, f"nav entries without a page: {sorted(set(nav) - pages)}"
