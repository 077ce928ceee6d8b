"""A ``demographics.filename_regex`` that backtracks catastrophically is refused when the catalogue
is parsed (issue #19: seconds per file name before), naming the source and the field; the
patterns people write (and the ones in the docs and tests) still pass, and a name is matched on
a bounded prefix."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from fer_pipeline.sources.catalog import CatalogError, parse_catalog
from fer_pipeline.sources.demographics import demographics_from_regex
from fer_pipeline.sources.regex_guard import MAX_NAME_CHARS, backtracking_risk

ROOT = Path(__file__).resolve().parents[2]

CATASTROPHIC = [
    (r"(?P<gender>a+)+$", "nested quantifiers"),
    (r"(?P<gender>a|a)*$", "alternatives that can match the same text or nothing"),
    (r"(?P<gender>.*)*x", "nested quantifiers"),
    (r"(?P<gender>\w+\s?)+$", "nested quantifiers"),
    (r"(?P<gender>a|aa)+$", "alternatives that can match the same text or nothing"),
    (r"(?P<gender>ab|[a-z]c)+$", "alternatives that can match the same text or nothing"),
    (r"(?P<gender>(?:[^_]*_){2})x", "nested quantifiers"),
    (r"(?P<gender>a*a*a*a*)x", "4 unbounded quantifiers"),
]

ORDINARY = [
    r"(?i)(?P<gender>female|male)_(?P<age_group>young|middle|senior)",
    r"(?P<gender>[mf])_(?P<age_group>\d+)",
    r"^(?P<race>[a-z]+)_.*$",
    r".*_(?P<gender>m|f)_.*",
    r"(?P<gender>(?:\d{2}_)+)",  # a fixed-count repeat inside a repeat: one way to match
    r"(?P<gender>(?:ab|cd)*)",  # alternatives that start differently
    r"(?P<gender>(?:[^_]*+_){2})x",  # the refused (?:[^_]*_){2}, made possessive
    r"(?P<gender>(?>a+)+)$",  # ... or atomic
]


def _catalog(tmp_path: Path, pattern: str) -> object:
    (tmp_path / "src").mkdir(exist_ok=True)
    return parse_catalog({"sources": [{"name": "webcam", "kind": "image_folders", "path": "src",
                                       "label_map": {"angry": "Angry"},
                                       "demographics": {"filename_regex": pattern}}]}, tmp_path)


def _slow(pattern: str, name: str, budget: float = 0.5) -> bool:
    start = time.perf_counter()
    re.search(pattern, name)
    return time.perf_counter() - start > budget


@pytest.mark.parametrize(("pattern", "why"), CATASTROPHIC, ids=[p for p, _ in CATASTROPHIC])
def test_catastrophic_pattern_is_refused_naming_source_and_field(tmp_path: Path, pattern: str, why: str) -> None:
    start = time.perf_counter()
    with pytest.raises(CatalogError) as err:
        _catalog(tmp_path, pattern)
    assert time.perf_counter() - start < 1.0  # judged by its shape, never run
    message = str(err.value)
    assert "source 'webcam', field 'demographics.filename_regex': refused:" in message
    assert why in message and "possessive" in message


def test_the_refused_shapes_are_really_slow() -> None:
    """The rule is not arbitrary: two of the refused shapes take over half a second on one
    short name (the time doubles with each character more)."""
    assert _slow(r"(a+)+$", "a" * 26 + "!")
    assert _slow(r"(a|a)*$", "a" * 24 + "!")


@pytest.mark.parametrize("pattern", ORDINARY)
def test_ordinary_patterns_pass_and_stay_fast(tmp_path: Path, pattern: str) -> None:
    assert backtracking_risk(pattern) is None
    _catalog(tmp_path, pattern)
    for name in ("a" * MAX_NAME_CHARS + "!", "_" * MAX_NAME_CHARS, "m_" * (MAX_NAME_CHARS // 2)):
        assert not _slow(pattern, name, 0.2), name


def test_patterns_in_the_docs_and_tests_pass() -> None:
    found = set()
    for path in [ROOT / "docs" / "data.md", *sorted((ROOT / "fer_pipeline_tests").rglob("*.py")),
                 *sorted((ROOT / "configs").glob("*.yaml"))]:
        found |= set(re.findall(r"filename_regex[\"']?:\s*[\"']([^\"']+)[\"']", path.read_text()))
    assert found, "no filename_regex found: the search is broken"
    assert {p: backtracking_risk(p) for p in found} == {p: None for p in found}


def test_names_are_matched_on_a_bounded_prefix() -> None:
    """A permitted polynomial pattern on a 100,000-character name takes the time of 255."""
    long_name = "angry/" + "a" * 100_000 + ".png"
    start = time.perf_counter()
    result = demographics_from_regex(r"(?P<race>a*a*a*)x", [long_name, "angry/aax.png"])
    assert time.perf_counter() - start < 5.0
    assert result.table["race"].tolist() == [None, "aa"]
