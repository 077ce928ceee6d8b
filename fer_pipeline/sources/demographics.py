"""Demographic attributes (gender, age group, race) from a CSV or a file-name regex.

Real datasets label demographics in many ways (``Male``/``M``, ``Middle-aged``, Windows paths
as keys, partial coverage). Everything is normalised into three nullable lower-case columns so
that the bias analysis can compare groups across sources.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from fer_pipeline.sources.catalog import (
    DEMOGRAPHIC_ATTRIBUTES,
    SourceSpec,
    catalog_error,
)
from fer_pipeline.sources.files import MemberError, read_regular
from fer_pipeline.sources.names import escape_text
from fer_pipeline.sources.readers import FolderReader, Member, SourceReader, ZipReader
from fer_pipeline.sources.regex_guard import MAX_NAME_CHARS

_GENDER = {"m": "male", "male": "male", "man": "male", "men": "male",
           "f": "female", "female": "female", "woman": "female", "women": "female"}
_AGE = {"young": "young", "youth": "young", "child": "young", "middle": "middle", "middle-aged": "middle",
        "middle aged": "middle", "adult": "middle", "senior": "senior", "old": "senior", "elderly": "senior"}


def normalise_value(attribute: str, value: object) -> str | None:
    """Lower-case, trimmed attribute value with common synonyms folded; None for blanks."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    text = str(value).strip()
    if not text or text.lower() in {"nan", "none", "null", "unknown", "n/a", "na", "-"}:
        return None
    low = text.lower()
    if attribute == "gender":
        if low.startswith("other") or "non-binary" in low or "nonbinary" in low:
            return "other"
        return _GENDER.get(low, low)
    if attribute == "age_group":
        return _AGE.get(low, low)
    return low


def normalise_key(key: str) -> str:
    """Compare paths with ``/`` separators, case-insensitively, without a leading ``./``."""
    k = str(key).strip().replace("\\", "/").lower()
    while k.startswith("./"):
        k = k[2:]
    return k.lstrip("/")


@dataclass
class DemographicsResult:
    """Attributes per source path, plus what could not be matched (for the coverage report)."""

    table: pd.DataFrame  # columns: source_path, gender, age_group, race
    unmatched_keys: int = 0
    ambiguous_keys: int = 0
    csv_files: list[str] = field(default_factory=list)
    conflicting_files: int = 0  # files whose rows disagree on an attribute: left empty, never guessed
    conflict_examples: list[str] = field(default_factory=list)  # ``path: attribute 'a' vs 'b'``, a few


MAX_CONFLICT_EXAMPLES = 5


def _empty(paths: Sequence[str]) -> pd.DataFrame:
    df = pd.DataFrame({"source_path": list(paths)})
    for attr in DEMOGRAPHIC_ATTRIBUTES:
        df[attr] = pd.Series([None] * len(df), dtype="object")
    return df


def _parse_csv(spec: SourceSpec, data: bytes | str, where: str) -> pd.DataFrame:
    """One demographics CSV as strings (a byte-order mark skipped, undecodable bytes replaced);
    a file pandas cannot parse is a configuration error naming the source, the field and the file."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return pd.read_csv(source, dtype=str, encoding="utf-8-sig", encoding_errors="replace")
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise catalog_error(spec.name, "demographics.csv", f"cannot read {where}: {exc}") from exc


def _csv_file(spec: SourceSpec, path: str, max_bytes: int) -> pd.DataFrame:
    """A sheet on disk, read only if it is a regular file within the cap: a FIFO would block
    forever and ``/dev/zero`` would be read until memory runs out."""
    try:
        data = read_regular(path, max_bytes)
    except MemberError as exc:
        raise catalog_error(spec.name, "demographics.csv", f"cannot read {path}: {exc}") from exc
    return _parse_csv(spec, data, path)


def read_demographics_table(spec: SourceSpec, reader: SourceReader, data_root: Path) -> tuple[pd.DataFrame, list[str]]:
    """The demographics CSV(s) of a source, checked against the catalogue (key and columns present).

    Read before any image of the source, so a wrong ``demographics`` entry fails fast."""
    pattern = spec.demographics.csv  # type: ignore[union-attr]
    frames: list[pd.DataFrame] = []
    found: list[str] = []
    if isinstance(reader, ZipReader):
        inside = [n for n in reader.names() if fnmatch.fnmatch(n.lower(), pattern.replace("\\", "/").lower())]
        for name in sorted(inside):
            where = f"{spec.path.name}:{name}"
            try:
                frames.append(_parse_csv(spec, reader.read(Member(name, 0, "")), where))
            except MemberError as exc:
                raise catalog_error(spec.name, "demographics.csv", f"cannot read {where}: {exc}") from exc
            found.append(where)
    elif isinstance(reader, FolderReader):
        for name in sorted(glob.glob(str(spec.path / pattern))):
            frames.append(_csv_file(spec, name, reader.max_file_bytes))
            found.append(name)
    if not frames:
        outside = Path(pattern).expanduser()
        outside_glob = str(outside if outside.is_absolute() else data_root / outside)
        for name in sorted(glob.glob(outside_glob)):
            frames.append(_csv_file(spec, name, reader.max_file_bytes))
            found.append(name)
    if not frames:
        raise catalog_error(spec.name, "demographics.csv", f"no file matches '{pattern}' inside the source or "
                                                           f"relative to the data root")
    df = pd.concat(frames, ignore_index=True)
    key = spec.demographics.key  # type: ignore[union-attr]
    missing = [c for c in [key, *spec.demographics.columns.values()] if c not in df.columns]  # type: ignore[union-attr]
    if missing:
        raise catalog_error(spec.name, "demographics.columns", f"column(s) {missing} not in {found} "
                                                               f"(columns there: {list(df.columns)})")
    return df, found


def _suffixes(path: str) -> list[str]:
    """``a/b/c`` -> ``["b/c", "c"]``: the path without one or more leading folders."""
    parts = path.split("/")
    return ["/".join(parts[k:]) for k in range(1, len(parts))]


def demographics_from_csv(spec: SourceSpec, reader: SourceReader, paths: Sequence[str], data_root: Path,
                          table: tuple[pd.DataFrame, list[str]] | None = None) -> DemographicsResult:
    """Match CSV keys to source paths: by relative path (or path suffix) when the key has a
    folder, else by file name when that name is unique in the source. ``table`` is what
    :func:`read_demographics_table` returned, when already read."""
    df, found = table if table is not None else read_demographics_table(spec, reader, data_root)
    demo = spec.demographics
    assert demo is not None and demo.key is not None
    out = _empty(paths)
    by_path = {normalise_key(p): i for i, p in enumerate(paths)}
    by_name: dict[str, list[int]] = {}
    by_suffix: dict[str, list[int]] = {}  # proper suffixes at folder boundaries: a join, not a scan per key
    for i, p in enumerate(paths):
        by_name.setdefault(PurePosixPath(normalise_key(p)).name, []).append(i)
    for p, i in by_path.items():
        for suffix in _suffixes(p):
            by_suffix.setdefault(suffix, []).append(i)
    unmatched = ambiguous = 0
    values: dict[str, list[str | None]] = {attr: [None] * len(paths) for attr in DEMOGRAPHIC_ATTRIBUTES}
    conflicts: dict[tuple[int, str], set[str]] = {}  # (file, attribute) -> the values its rows give
    for rowd in df.to_dict("records"):
        raw_key = rowd.get(demo.key)
        key = normalise_key(raw_key) if isinstance(raw_key, str) else ""
        idx: int | None = None
        if not key:
            unmatched += 1
            continue
        if "/" in key:
            idx = by_path.get(key)
            if idx is None:  # the key may include or omit a top-level folder
                cands = sorted({*by_suffix.get(key, []), *(by_path[k] for k in _suffixes(key) if k in by_path)})
                idx = cands[0] if len(cands) == 1 else None
                ambiguous += len(cands) > 1
        else:
            cands = by_name.get(key, [])
            idx = cands[0] if len(cands) == 1 else None
            ambiguous += len(cands) > 1
        if idx is None:
            unmatched += 1
            continue
        for attr, column in demo.columns.items():
            _assign(values[attr], conflicts, idx, attr, normalise_value(attr, rowd.get(column)))
    for attr in DEMOGRAPHIC_ATTRIBUTES:
        out[attr] = pd.Series(values[attr], dtype="object")
    examples = [f"{escape_text(paths[i])}: {attr} " + " vs ".join(repr(v) for v in sorted(vals))
                for (i, attr), vals in sorted(conflicts.items())[:MAX_CONFLICT_EXAMPLES]]
    return DemographicsResult(out, unmatched_keys=unmatched, ambiguous_keys=ambiguous, csv_files=found,
                              conflicting_files=len({i for i, _ in conflicts}), conflict_examples=examples)


def _assign(column: list[str | None], conflicts: dict[tuple[int, str], set[str]], idx: int, attr: str,
            value: str | None) -> None:
    """Give file ``idx`` its ``attr`` from one more CSV row: a blank adds nothing, the same value
    again is fine, a different one is a conflict (recorded; the value left empty, not last-row-wins)."""
    if value is None:
        return
    clash = conflicts.get((idx, attr))
    if clash is not None:
        clash.add(value)
    elif column[idx] is None:
        column[idx] = value
    elif column[idx] != value:
        conflicts[(idx, attr)] = {column[idx], value}  # type: ignore[arg-type]
        column[idx] = None


def demographics_from_regex(pattern: str, paths: Sequence[str]) -> DemographicsResult:
    """Named groups of ``pattern`` searched in each file name (not the folders), on its first
    ``MAX_NAME_CHARS`` characters: the catalogue refused patterns that backtrack catastrophically
    (:mod:`fer_pipeline.sources.regex_guard`), the bound keeps the rest's work per name bounded."""
    rx = re.compile(pattern)
    out = _empty(paths)
    values = {attr: [None] * len(paths) for attr in DEMOGRAPHIC_ATTRIBUTES}
    for i, p in enumerate(paths):
        m = rx.search(PurePosixPath(p).name[:MAX_NAME_CHARS])
        if not m:
            continue
        for attr, val in m.groupdict().items():
            if attr in values:
                values[attr][i] = normalise_value(attr, val)
    for attr in DEMOGRAPHIC_ATTRIBUTES:
        out[attr] = pd.Series(values[attr], dtype="object")
    return DemographicsResult(out)


def load_demographics(spec: SourceSpec, reader: SourceReader, paths: Sequence[str], data_root: Path,
                      table: tuple[pd.DataFrame, list[str]] | None = None) -> DemographicsResult:
    """Demographics for ``paths`` of one source (all-null columns when the source has none)."""
    if spec.demographics is None:
        return DemographicsResult(_empty(paths))
    if spec.demographics.filename_regex:
        return demographics_from_regex(spec.demographics.filename_regex, paths)
    return demographics_from_csv(spec, reader, paths, data_root, table)
