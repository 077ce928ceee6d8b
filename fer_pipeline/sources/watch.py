"""Cheap change detection for the catalogued sources: the core of the sources sensor.

A *fingerprint* of the data root covers ``sources.yaml`` (its bytes) and every source it
lists, without reading a single image:

* a folder (``image_folders`` or a generated ``synthetic`` source): the folder reader's own
  listing (:class:`~fer_pipeline.sources.readers.FolderReader`: the same link rule as a
  run, stat data only): relative names, sizes, modification times, inode change times
  (``st_ctime_ns``) and inode numbers. The change time and inode catch a file replaced by one
  of the same size whose modification time was set back (``cp -p``, ``rsync -t``,
  ``os.utime``): writing or replacing a file always moves its ctime or gives a new inode;
* an archive (``.zip``) or a FER2013 CSV: the file's size, modification time, change time and
  inode, so an archive replaced or rewritten as a whole counts as a change;
* a demographics CSV outside its source (a glob relative to the data root): the same stat data.

Unattended on hostile data: an entry that cannot be read is *part of* the fingerprint instead
of an exception -- a dangling symbolic link (with its target), a symbolic link loop, a FIFO,
socket or device, a subfolder that cannot be listed (links to folders are followed, as a run
follows them). Such a fault appearing, changing or disappearing is a change,
so the run that records the file as excluded happens; the faults are listed for humans
(:attr:`SourceState.faults`, :func:`describe_changes`). Only a source whose root itself cannot
be read raises :class:`UnreadableSourceError` (the sensor skips and names the source): a run then
would see an empty source and drop all its files from the manifest.

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
import stat
from dataclasses import dataclass, field
from pathlib import Path

from fer_pipeline.sources.catalog import Catalog, SourceSpec, load_catalog
from fer_pipeline.sources.files import SourceError, describe_error, file_kind
from fer_pipeline.sources.names import escape_text
from fer_pipeline.sources.readers import FolderReader, Member

CURSOR_VERSION = 1
MISSING = "missing"
MAX_FAULTS_SHOWN = 3  # per source, in change descriptions


class UnreadableSourceError(OSError):
    """A source's root folder or file cannot be read at all (the message names the source)."""


@dataclass(frozen=True)
class SourceState:
    """What one source looks like now: a digest of its listing, plus counts for humans."""

    name: str
    digest: str
    files: int  # regular files (what a run can read)
    bytes: int
    faults: tuple[str, ...] = ()  # "relative/path: why it cannot be read", sorted


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


def _stat_data(st: os.stat_result) -> str:
    """Type, size, mtime, ctime and inode: changes whenever the content may have changed."""
    return f"{stat.S_IFMT(st.st_mode):o}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def _folder_members(spec: SourceSpec) -> list[Member]:
    """The folder reader's own listing (stat data only, the same link rule as a run), sorted.

    Raises :class:`UnreadableSourceError` when the source's root folder cannot be listed."""
    try:
        return sorted(FolderReader(spec).members(), key=lambda m: m.path)
    except SourceError as exc:
        raise UnreadableSourceError(f"source '{spec.name}': {exc}") from exc


def _stat_line(path: Path) -> tuple[str, int] | None:
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # a loop, a permission problem: noticed as a state, never raised
        return f"error:{exc.errno}", 0
    return _stat_data(st), st.st_size


def _outside_demographics(spec: SourceSpec, data_root: Path) -> list[Path]:
    """Demographics CSVs named relative to the data root (those inside a folder are walked anyway)."""
    if spec.demographics is None or not spec.demographics.csv:
        return []
    pattern = Path(spec.demographics.csv).expanduser()
    pattern_str = str(pattern if pattern.is_absolute() else data_root / pattern)
    return sorted(Path(p) for p in glob.glob(pattern_str) if Path(p).is_file())


def fingerprint_source(spec: SourceSpec, data_root: Path) -> SourceState:
    """The state of one source: stat data of its files, never their contents.

    Raises :class:`UnreadableSourceError` when the source's root cannot be read at all."""
    h = hashlib.sha256(f"{spec.kind}|{str(spec.path)!a}".encode())
    files = size = 0
    faults: list[str] = []
    path = spec.path
    if path.is_dir():
        for m in _folder_members(spec):
            h.update(f"\n{m.path!a}\0{m.fingerprint}\0{m.problem.reason if m.problem else ''}".encode())
            if m.problem is None:
                files, size = files + 1, size + m.size
            else:
                faults.append(f"{escape_text(m.path)}: {escape_text(m.problem.reason)}")
    else:
        line = _file_line(spec, path)
        h.update(f"\n{MISSING}".encode() if line is None else f"\nfile\0{line[0]}".encode())
        if line is not None:
            files, size = 1, line[1]
    for csv in _outside_demographics(spec, data_root):
        line = _stat_line(csv)
        h.update(f"\ncsv\0{str(csv)!a}\0{line[0] if line else MISSING}".encode())
    return SourceState(spec.name, h.hexdigest(), files, size, tuple(faults))


def _file_line(spec: SourceSpec, path: Path) -> tuple[str, int] | None:
    """A file source's stat data (None: it vanished); raises when it is there but unreadable."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if not os.path.lexists(path):
            return None
        reason = "dangling symbolic link"
    except OSError as exc:
        reason = describe_error(exc)
    else:
        if not stat.S_ISREG(st.st_mode):
            reason = f"not a regular file ({file_kind(st.st_mode)})"
        elif not os.access(path, os.R_OK):
            reason = "permission denied"
        else:
            return _stat_data(st), st.st_size
    raise UnreadableSourceError(f"source '{spec.name}': cannot read {path}: {reason}")


def fingerprint_catalog(catalog: Catalog, catalog_bytes: bytes, data_root: Path) -> Fingerprint:
    catalog_digest = hashlib.sha256(catalog_bytes).hexdigest()
    sources = {spec.name: fingerprint_source(spec, data_root) for spec in catalog.sources}
    h = hashlib.sha256(f"catalog\0{catalog_digest}".encode())
    for name in sorted(sources):
        h.update(f"\n{name}\0{sources[name].digest}".encode())
    return Fingerprint(h.hexdigest(), catalog_digest, sources)


def fingerprint_sources(data_root: Path) -> Fingerprint:
    """Fingerprint ``<data_root>/sources.yaml`` and every source it lists.

    Raises :class:`~fer_pipeline.sources.catalog.CatalogError` when the catalogue is missing or invalid
    (the message names the source and the field).
    """
    data_root = Path(data_root)
    catalog_path = data_root / "sources.yaml"
    catalog = load_catalog(catalog_path, data_root)
    return fingerprint_catalog(catalog, catalog_path.read_bytes(), data_root)


def describe_changes(previous: CursorState | None, current: Fingerprint) -> list[str]:
    """What differs between the previous evaluation and now, one short line per change."""
    if previous is None:
        return [f"first evaluation: {len(current.sources)} source(s), {current.files} file(s)",
                *(_fault_line(s) for _, s in sorted(current.sources.items()) if s.faults)]
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
            if state.faults:
                changes.append(_fault_line(state))
    for name in sorted(set(previous.sources) - set(current.sources)):
        changes.append(f"source '{name}' no longer catalogued")
    return changes or ["fingerprint changed"]


def _fault_line(state: SourceState) -> str:
    """``source 'x': 2 unreadable entries (a.png: dangling symbolic link ...; ...)``."""
    shown = "; ".join(state.faults[:MAX_FAULTS_SHOWN]) + ("; ..." if len(state.faults) > MAX_FAULTS_SHOWN else "")
    n = len(state.faults)
    return f"source '{state.name}': {n} unreadable entr{'y' if n == 1 else 'ies'} ({shown})"


def run_key(fingerprint: Fingerprint, seq: int) -> str:
    """Stable run key for the ``seq``-th change, derived from the new fingerprint.

    The counter makes a return to an earlier state (files added, then removed again) a new
    change, which Dagster would otherwise drop as a repeated run key.
    """
    return f"sources-{fingerprint.digest[:16]}-{seq}"

