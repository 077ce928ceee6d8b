"""Cheap change detection for the catalogued sources: the core of the sources sensor.

A *fingerprint* of the data root covers ``sources.yaml`` (its bytes) and every source it
lists, without reading a single image:

* a folder (``image_folders`` or a generated ``synthetic`` source): one walk of relative names,
  sizes and modification times (``os.scandir``; stat data only);
* an archive (``.zip``) or a FER2013 CSV: the file's size and modification time, so an archive
  replaced or rewritten as a whole counts as a change;
* a demographics CSV outside its source (a glob relative to the data root): size + mtime.

The digest of all that is compared with the one kept in the sensor's cursor (a small JSON
document: the digest, a change counter, and per-source file counts), so each change triggers
exactly one run and an unchanged data root triggers none. ``describe_changes`` turns two
cursors into the human-readable summary the sensor attaches to its run request.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from fer_pipeline.dataset.catalog import Catalog, SourceSpec, load_catalog

CURSOR_VERSION = 1
MISSING = "missing"


@dataclass(frozen=True)
class SourceState:
    """What one source looks like now: a digest of its listing, plus counts for humans."""

    name: str
    digest: str
    files: int
    bytes: int


@dataclass(frozen=True)
class Fingerprint:
    """The state of a data root's catalogue and sources."""

    digest: str  # over the catalogue's bytes and every source's state
    catalog_digest: str
    sources: dict[str, SourceState] = field(default_factory=dict)

    @property
    def files(self) -> int:
        return sum(s.files for s in self.sources.values())

    def to_cursor(self, seq: int) -> str:
        """The sensor cursor: digest, change counter and a small per-source summary."""
        return json.dumps({
            "v": CURSOR_VERSION, "digest": self.digest, "seq": seq, "catalog": self.catalog_digest[:16],
            "sources": {n: [s.digest[:16], s.files, s.bytes] for n, s in sorted(self.sources.items())},
        }, separators=(",", ":"))


@dataclass(frozen=True)
class CursorState:
    """A parsed cursor (what the previous evaluation saw)."""

    digest: str
    seq: int
    catalog: str
    sources: dict[str, tuple[str, int, int]]


def parse_cursor(cursor: str | None) -> CursorState | None:
    """The state saved by :meth:`Fingerprint.to_cursor`; None for no/unknown/corrupt cursors."""
    if not cursor:
        return None
    try:
        data = json.loads(cursor)
        if data.get("v") != CURSOR_VERSION:
            return None
        sources = {str(k): (str(v[0]), int(v[1]), int(v[2])) for k, v in data.get("sources", {}).items()}
        return CursorState(str(data["digest"]), int(data.get("seq", 0)), str(data.get("catalog", "")), sources)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def _walk(root: Path) -> tuple[list[tuple[str, int, int]], int]:
    """(relative path, size, mtime_ns) of every file under ``root`` (stat only, sorted)."""
    entries: list[tuple[str, int, int]] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                items = list(it)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in items:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    continue
                st = entry.stat()  # follows a file symlink, like the folder reader does
            except (FileNotFoundError, PermissionError):  # removed while walking: the next tick sees it
                continue
            entries.append((Path(entry.path).relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    entries.sort()
    return entries, sum(e[1] for e in entries)


def _stat_line(path: Path) -> tuple[str, int] | None:
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    return f"{st.st_size}:{st.st_mtime_ns}", st.st_size


def _outside_demographics(spec: SourceSpec, data_root: Path) -> list[Path]:
    """Demographics CSVs named relative to the data root (those inside a folder are walked anyway)."""
    if spec.demographics is None or not spec.demographics.csv:
        return []
    pattern = Path(spec.demographics.csv).expanduser()
    pattern_str = str(pattern if pattern.is_absolute() else data_root / pattern)
    return sorted(Path(p) for p in glob.glob(pattern_str) if Path(p).is_file())


def fingerprint_source(spec: SourceSpec, data_root: Path) -> SourceState:
    """The state of one source: stat data of its files, never their contents."""
    h = hashlib.sha256(f"{spec.kind}|{spec.path}".encode())
    files = size = 0
    path = spec.path
    if path.is_dir():
        entries, size = _walk(path)
        files = len(entries)
        for rel, sz, mtime in entries:
            h.update(f"\n{rel}\0{sz}\0{mtime}".encode())
    else:
        line = _stat_line(path)
        if line is None:
            h.update(f"\n{MISSING}".encode())
        else:
            h.update(f"\nfile\0{line[0]}".encode())
            files, size = 1, line[1]
    for csv in _outside_demographics(spec, data_root):
        line = _stat_line(csv)
        h.update(f"\ncsv\0{csv}\0{line[0] if line else MISSING}".encode())
    return SourceState(spec.name, h.hexdigest(), files, size)


def fingerprint_catalog(catalog: Catalog, catalog_bytes: bytes, data_root: Path) -> Fingerprint:
    catalog_digest = hashlib.sha256(catalog_bytes).hexdigest()
    sources = {spec.name: fingerprint_source(spec, data_root) for spec in catalog.sources}
    h = hashlib.sha256(f"catalog\0{catalog_digest}".encode())
    for name in sorted(sources):
        h.update(f"\n{name}\0{sources[name].digest}".encode())
    return Fingerprint(h.hexdigest(), catalog_digest, sources)


def fingerprint_sources(data_root: Path) -> Fingerprint:
    """Fingerprint ``<data_root>/sources.yaml`` and every source it lists.

    Raises :class:`~fer_pipeline.dataset.catalog.CatalogError` when the catalogue is missing or invalid
    (the message names the source and the field).
    """
    data_root = Path(data_root)
    catalog_path = data_root / "sources.yaml"
    catalog = load_catalog(catalog_path, data_root)
    return fingerprint_catalog(catalog, catalog_path.read_bytes(), data_root)


def describe_changes(previous: CursorState | None, current: Fingerprint) -> list[str]:
    """What differs between the previous evaluation and now, one short line per change."""
    if previous is None:
        return [f"first evaluation: {len(current.sources)} source(s), {current.files} file(s)"]
    changes: list[str] = []
    if previous.catalog != current.catalog_digest[:16]:
        changes.append("sources.yaml changed")
    for name, state in sorted(current.sources.items()):
        before = previous.sources.get(name)
        if before is None:
            changes.append(f"new source '{name}' ({state.files} file(s))")
        elif before[0] != state.digest[:16]:
            delta = state.files - before[1]
            what = f"{before[1]} -> {state.files} files ({delta:+d})" if delta else \
                f"{state.files} files, contents or dates changed"
            changes.append(f"source '{name}': {what}")
    for name in sorted(set(previous.sources) - set(current.sources)):
        changes.append(f"source '{name}' no longer catalogued")
    return changes or ["fingerprint changed"]


def run_key(fingerprint: Fingerprint, seq: int) -> str:
    """Stable run key for the ``seq``-th change, derived from the new fingerprint.

    The counter makes a return to an earlier state (files added, then removed again) a new
    change, which Dagster would otherwise drop as a repeated run key.
    """
    return f"sources-{fingerprint.digest[:16]}-{seq}"

