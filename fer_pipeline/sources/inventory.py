"""Raw-source inventory: every file of every catalogued source, with its content hash, raw
label, split hint, target class (or pretraining-pool label: status ``pool``; or none yet: status
``unlabelled``, every image of a ``role: unlabelled`` source) and demographics, or
the reason it is not an image candidate. Whether a file is an image is judged from its first bytes
(:mod:`fer_pipeline.sources.formats`: the one format policy the decoder applies too), never by
reading it whole; its name is only a hint.

Members whose fingerprint (zip CRC+size, or file size+mtime) matches the previous inventory
reuse its content hash, so an unchanged archive is listed without being decompressed again; a
source whose whole listing (archive size+mtime, or every file's name+size+mtime) and catalogue
entry are unchanged reuses its previous rows without being listed at all (not a folder source
holding symbolic links: what they point to can change without its listing changing).

Nothing stops the inventory but a bad catalogue entry (a demographics CSV that is missing or
lacks its columns fails fast, before any image is read). A file that cannot be read is one row
with status ``unreadable`` or ``too_large`` and the reason (see
:mod:`fer_pipeline.sources.readers`); a source that cannot be listed at all, or holds no
file, is one row with status ``source_error`` whose ``source_path`` is the source's own file or
folder name (:func:`~fer_pipeline.sources.readers.source_row_path`). Hashes are streamed
in chunks.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from fer_pipeline.limits import MAX_FILE_BYTES as DEFAULT_MAX_FILE_BYTES
from fer_pipeline.sources.catalog import (
    DEMOGRAPHIC_ATTRIBUTES,
    Catalog,
    SourceSpec,
    fold_label,
)
from fer_pipeline.sources.demographics import load_demographics, read_demographics_table
from fer_pipeline.sources.files import (
    NO_LABEL,
    SOURCE_ERROR,
    TOO_LARGE,
    UNREADABLE,
    MemberError,
    SourceError,
)
from fer_pipeline.sources.formats import SNIFF_BYTES, refusal
from fer_pipeline.sources.names import junk_reason
from fer_pipeline.sources.readers import (
    BrokenSource,
    Member,
    SourceReader,
    open_reader,
    source_row_path,
)

# folder names (lower case) that are a source's own split, and the split (schema.SPLITS) they hint at
SPLIT_FOLDERS = {"train": "train", "training": "train", "test": "test", "testing": "test",
                 "val": "validation", "valid": "validation", "validation": "validation", "dev": "validation",
                 "publictest": "test", "privatetest": "test"}

# status of an inventory row: a candidate (a target class), a pool item (a pretraining-pool label) or an
# unlabelled image (a `role: unlabelled` source: no class yet) goes on to decoding, the others are excluded here
CANDIDATE, POOL, UNLABELLED = "candidate", "pool", "unlabelled"
JUNK, NOT_IMAGE, UNMAPPED = "junk", "not_image", "unmapped"
STATUSES = (CANDIDATE, POOL, UNLABELLED, JUNK, NOT_IMAGE, NO_LABEL, UNMAPPED, UNREADABLE, TOO_LARGE, SOURCE_ERROR)
DECODED = (CANDIDATE, POOL, UNLABELLED)  # the statuses the faces stage decodes

INVENTORY_VERSION = 5  # bump when classification changes, so unchanged sources are listed again
LISTINGS_ATTR = "fer_source_listings"  # per-source listing fingerprints, kept in the table's attrs

ROW_COLUMNS = ["source", "source_path", "bytes", "fingerprint", "sha256", "raw_label", "split_hint", "label",
               "pool_label", "status", "reason"]
INVENTORY_COLUMNS = [*ROW_COLUMNS, *DEMOGRAPHIC_ATTRIBUTES]


def folder_label(path: str, spec: SourceSpec) -> tuple[str | None, str | None]:
    """(raw label, split hint) from the folders on a member's path.

    The label is the deepest folder whose name is in the source's label map or its listed pool
    labels; failing that, the deepest folder that is not a split name (so unmapped labels are still
    reported by name, and ``pretrain_labels: all`` takes them).
    """
    folders = list(PurePosixPath(path).parts[:-1])
    split_hint = next((SPLIT_FOLDERS[f.lower()] for f in folders if f.lower() in SPLIT_FOLDERS), None)
    for folder in reversed(folders):
        if fold_label(folder) in spec.label_map or spec.is_pool_folder(folder):
            return folder, split_hint
    for folder in reversed(folders):
        if folder.lower() not in SPLIT_FOLDERS:
            return folder, split_hint
    return None, split_hint


@dataclass
class InventoryReport:
    table: pd.DataFrame
    seconds: float
    hashed: int  # members whose bytes were read and hashed this time
    reused: int  # members whose hash came from the previous inventory
    junk: Counter = field(default_factory=Counter)
    # per source: csv_keys_unmatched/ambiguous, csv_conflicting_files (counts), csv_conflict_examples (text)
    demographics_notes: dict[str, dict[str, object]] = field(default_factory=dict)


def _classify(member: Member, spec: SourceSpec) -> dict[str, object]:
    row: dict[str, object] = {"source": spec.name, "source_path": member.path, "bytes": member.size,
                              "fingerprint": member.fingerprint, "sha256": None, "raw_label": None,
                              "split_hint": member.split_hint, "label": None, "pool_label": None,
                              "status": CANDIDATE, "reason": None}
    junk = junk_reason(member.path)
    if junk:
        row.update(status=JUNK, reason=junk)
        return row
    if spec.kind == "fer2013_csv":
        raw_label, hint = member.label, member.split_hint
    else:
        raw_label, hint = folder_label(member.path, spec)
    if spec.unlabelled:  # no class yet: whatever label its folders or rows carry is not one
        raw_label = None
    if member.problem is not None:  # unreadable, too large...: still say which class lost a file
        row.update(status=member.problem.status, reason=member.problem.reason, raw_label=raw_label,
                   split_hint=hint, label=spec.map_label(raw_label), pool_label=spec.pool_label(raw_label))
        return row
    row.update(raw_label=raw_label, split_hint=hint)
    if spec.unlabelled:
        row["status"] = UNLABELLED
        return row
    if raw_label is None:
        row.update(status=NO_LABEL, reason="no label: the file is not inside a class folder")
        return row
    label = spec.map_label(raw_label)
    pool_label = spec.pool_label(raw_label) if label is None else None
    if pool_label is not None:  # decoded like a candidate, then goes to the pretraining pool
        row.update(status=POOL, pool_label=pool_label)
    elif label is None:
        row.update(status=UNMAPPED, reason=f"unmapped label: {raw_label}")
    row["label"] = label
    return row


def _source_row(spec: SourceSpec, reason: str, taken: set[str]) -> dict[str, object]:
    """The one row standing for a source that cannot be listed (or holds no file)."""
    path = source_row_path(spec)
    while path in taken:
        path += " (source)"
    return {"source": spec.name, "source_path": path, "bytes": 0, "fingerprint": "", "sha256": None,
            "raw_label": None, "split_hint": None, "label": None, "pool_label": None, "status": SOURCE_ERROR,
            "reason": reason}


def _hash(row: dict[str, object], member: Member, reader: SourceReader,
          previous: dict[tuple[str, str], tuple[str, str]]) -> str | None:
    """Judge the member's format from its first bytes (:mod:`fer_pipeline.sources.formats`),
    then fill its SHA-256; ``"reused"`` when the hash is the previous inventory's (unchanged
    fingerprint: its content was accepted then), ``"hashed"`` when read now, None when the member
    is not an image file (never read whole)."""
    prev = previous.get((reader.spec.name, member.path))
    if prev is not None and prev[0] == member.fingerprint and prev[1]:
        row["sha256"] = prev[1]
        return "reused"
    try:
        if reader.spec.kind != "fer2013_csv":  # a FER2013 row is a PNG the reader makes
            not_image = refusal(reader.head(member, SNIFF_BYTES), member.path)
            if not_image is not None:
                row.update(status=NOT_IMAGE, reason=not_image, raw_label=None, label=None, pool_label=None,
                           split_hint=member.split_hint)
                return None
        row["sha256"] = reader.sha256(member)
    except MemberError as exc:
        row.update(status=exc.problem.status, reason=exc.problem.reason)
    return "hashed"


@dataclass
class SourceInventory:
    """One source's rows and what listing it cost."""

    table: pd.DataFrame
    hashed: int
    reused: int
    notes: dict[str, object]  # see InventoryReport.demographics_notes
    links: int  # symbolic links met: the listing cannot be reused next time


def inventory_source(spec: SourceSpec, reader: SourceReader, data_root: Path,
                     previous: dict[tuple[str, str], tuple[str, str]],
                     demographics: tuple[pd.DataFrame, list[str]] | None = None) -> SourceInventory:
    """Inventory one source. ``previous`` maps (source, path) to (fingerprint, sha256);
    ``demographics`` is the source's demographics CSV when already read."""
    rows: list[dict[str, object]] = []
    hashed = reused = 0
    try:
        for member in reader.members():
            row = _classify(member, spec)
            if row["status"] != JUNK and member.problem is None:
                read = _hash(row, member, reader, previous)
                hashed += read == "hashed"
                reused += read == "reused"
            rows.append(row)
    except SourceError as exc:
        rows.append(_source_row(spec, str(exc), {str(r["source_path"]) for r in rows}))
    if not rows:
        rows.append(_source_row(spec, reader.empty_reason, set()))
    df = pd.DataFrame(rows, columns=ROW_COLUMNS)
    notes: dict[str, object] = {"csv_keys_unmatched": 0, "csv_keys_ambiguous": 0, "csv_conflicting_files": 0,
                                "csv_conflict_examples": []}
    if isinstance(reader, BrokenSource):  # nothing to attach attributes to
        for col in DEMOGRAPHIC_ATTRIBUTES:
            df[col] = pd.Series([None] * len(df), dtype="object")
        return SourceInventory(df, hashed, reused, notes, reader.links)
    demo = load_demographics(spec, reader, df["source_path"].tolist(), data_root, demographics)
    for col in DEMOGRAPHIC_ATTRIBUTES:
        df[col] = demo.table[col].to_numpy()
    notes = {"csv_keys_unmatched": demo.unmatched_keys, "csv_keys_ambiguous": demo.ambiguous_keys,
             "csv_conflicting_files": demo.conflicting_files, "csv_conflict_examples": demo.conflict_examples}
    return SourceInventory(df, hashed, reused, notes, reader.links)


def _plain(notes: dict[str, object]) -> dict[str, object]:
    """Demographics notes as JSON values (counts, lists of text): kept in the table's attrs."""
    return {k: [str(x) for x in v] if isinstance(v, list) else int(v)  # type: ignore[call-overload]
            for k, v in notes.items()}


def _spec_digest(spec: SourceSpec, data_root: Path, max_file_bytes: int) -> str:
    """Everything besides the files that decides a source's inventory rows."""
    return hashlib.sha1(f"{INVENTORY_VERSION}|{data_root}|{max_file_bytes}|{spec!r}".encode()).hexdigest()[:16]


def _listing_digest(spec: SourceSpec, data_root: Path) -> str:
    """Stat data of a source's files; a source that cannot be read gets a digest never reused."""
    from fer_pipeline.sources.watch import fingerprint_source

    try:
        return fingerprint_source(spec, data_root).digest
    except OSError:  # the root cannot be read: list it again (it becomes a source_error row)
        return f"unreadable:{time.time_ns()}"


def _demographics_tables(specs: list[SourceSpec], data_root: Path,
                         max_file_bytes: int) -> dict[str, tuple[pd.DataFrame, list[str]]]:
    """Every demographics CSV of the sources to list, read first: a wrong entry fails before any image."""
    tables = {}
    for spec in specs:
        if spec.demographics is not None and spec.demographics.csv:
            with open_reader(spec, max_file_bytes) as reader:
                if not isinstance(reader, BrokenSource):
                    tables[spec.name] = read_demographics_table(spec, reader, data_root)
    return tables


def build_inventory(catalog: Catalog, data_root: Path, previous: pd.DataFrame | None = None,
                    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> InventoryReport:
    """Inventory all sources of the catalogue; files above ``max_file_bytes`` are never read.

    A source whose listing (stat data of its files, see :mod:`fer_pipeline.sources.watch`) and
    catalogue entry are unchanged since ``previous`` reuses its rows without being listed again;
    the listings travel with the table as ``table.attrs[LISTINGS_ATTR]`` (kept in the Parquet file).
    """
    start = time.perf_counter()
    prev_listings: dict[str, dict[str, object]] = {}
    if previous is not None and len(previous):
        prev_listings = dict(previous.attrs.get(LISTINGS_ATTR) or {})
    listings = {spec.name: {"spec": _spec_digest(spec, data_root, max_file_bytes),
                            "listing": _listing_digest(spec, data_root)} for spec in catalog.sources}
    reusable: dict[str, pd.DataFrame] = {}
    for spec in catalog.sources:
        before = prev_listings.get(spec.name)
        if previous is not None and isinstance(before, dict) and not before.get("links") and \
                all(before.get(k) == v for k, v in listings[spec.name].items()):
            rows = previous[previous["source"] == spec.name]
            if len(rows) == before.get("rows"):  # unchanged source: its rows as they were
                reusable[spec.name] = rows
    prev_map: dict[tuple[str, str], tuple[str, str]] = {}
    if previous is not None and len(previous):  # per-member hash reuse, for the sources listed again
        rows = previous.loc[~previous["source"].isin(list(reusable)), ["source", "source_path", "fingerprint", "sha256"]]
        prev_map = {(s, p): (f, h) for s, p, f, h in rows.itertuples(index=False, name=None)}
    demographics = _demographics_tables([s for s in catalog.sources if s.name not in reusable], data_root,
                                        max_file_bytes)
    frames: list[pd.DataFrame] = []
    hashed = reused = 0
    notes: dict[str, dict[str, object]] = {}
    for spec in catalog.sources:
        if spec.name in reusable:
            rows = reusable[spec.name]
            before = prev_listings[spec.name]
            frames.append(rows[INVENTORY_COLUMNS].reset_index(drop=True))
            reused += int(rows["sha256"].notna().sum())
            notes[spec.name] = dict(before.get("notes") or {})  # type: ignore[call-overload]
            listings[spec.name] = before
            continue
        with open_reader(spec, max_file_bytes) as reader:
            inv = inventory_source(spec, reader, data_root, prev_map, demographics.get(spec.name))
        frames.append(inv.table)
        hashed, reused = hashed + inv.hashed, reused + inv.reused
        notes[spec.name] = inv.notes
        listings[spec.name] = {**listings[spec.name], "rows": len(inv.table), "links": inv.links,
                               "notes": _plain(inv.notes)}
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=INVENTORY_COLUMNS)
    table["bytes"] = table["bytes"].astype("int64")
    junk = Counter(table.loc[table["status"] == JUNK, "reason"])
    table = table[INVENTORY_COLUMNS]
    table.attrs = {LISTINGS_ATTR: listings}
    return InventoryReport(table, time.perf_counter() - start, hashed, reused, junk, notes)
