"""Raw-source inventory: every file of every catalogued source, with its content hash, raw
label, split hint, target class and demographics, or the reason it is not an image candidate.

Members whose fingerprint (zip CRC+size, or file size+mtime) matches the previous inventory
reuse its content hash, so an unchanged archive is listed without being decompressed again; a
source whose whole listing (archive size+mtime, or every file's name+size+mtime) and catalogue
entry are unchanged reuses its previous rows without being listed at all.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from fer_pipeline.dataset.catalog import Catalog, SourceSpec
from fer_pipeline.dataset.demographics import load_demographics
from fer_pipeline.dataset.source_readers import (
    Member,
    SourceReader,
    is_image_name,
    junk_reason,
    open_reader,
)

# folder names (lower case) that are a source's own split, and the split (schema.SPLITS) they hint at
SPLIT_FOLDERS = {"train": "train", "training": "train", "test": "test", "testing": "test",
                 "val": "validation", "valid": "validation", "validation": "validation", "dev": "validation",
                 "publictest": "test", "privatetest": "test"}

# status of an inventory row: a candidate goes on to decoding, the others are excluded here
CANDIDATE, JUNK, NOT_IMAGE, NO_LABEL, UNMAPPED = "candidate", "junk", "not_image", "no_label", "unmapped"

INVENTORY_VERSION = 1  # bump when classification changes, so unchanged sources are listed again
LISTINGS_ATTR = "fer_source_listings"  # per-source listing fingerprints, kept in the table's attrs

INVENTORY_COLUMNS = ["source", "source_path", "bytes", "fingerprint", "sha256", "raw_label", "split_hint",
                     "label", "status", "reason", "gender", "age_group", "race"]


def folder_label(path: str, spec: SourceSpec) -> tuple[str | None, str | None]:
    """(raw label, split hint) from the folders on a member's path.

    The label is the deepest folder whose name is in the source's label map; failing that, the
    deepest folder that is not a split name (so unmapped labels are still reported by name).
    """
    folders = list(PurePosixPath(path).parts[:-1])
    split_hint = next((SPLIT_FOLDERS[f.lower()] for f in folders if f.lower() in SPLIT_FOLDERS), None)
    for folder in reversed(folders):
        if folder.lower() in spec.label_map:
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
    demographics_notes: dict[str, dict[str, int]] = field(default_factory=dict)


def _classify(member: Member, spec: SourceSpec) -> dict[str, object]:
    row: dict[str, object] = {"source": spec.name, "source_path": member.path, "bytes": member.size,
                              "fingerprint": member.fingerprint, "sha256": None, "raw_label": None,
                              "split_hint": member.split_hint, "label": None, "status": CANDIDATE,
                              "reason": None}
    junk = junk_reason(member.path)
    if junk:
        row.update(status=JUNK, reason=junk)
        return row
    if spec.kind != "fer2013_csv" and not is_image_name(member.path):
        ext = PurePosixPath(member.path).suffix or "(none)"
        row.update(status=NOT_IMAGE, reason=f"not an image file (extension {ext})")
        return row
    if member.label is not None:
        raw_label, hint = member.label, member.split_hint
    else:
        raw_label, hint = folder_label(member.path, spec)
    row.update(raw_label=raw_label, split_hint=hint)
    if raw_label is None:
        row.update(status=NO_LABEL, reason="no label: the file is not inside a class folder")
        return row
    label = spec.map_label(raw_label)
    if label is None:
        row.update(status=UNMAPPED, reason=f"unmapped label: {raw_label}")
    row["label"] = label
    return row


def inventory_source(spec: SourceSpec, reader: SourceReader, data_root: Path,
                     previous: dict[tuple[str, str], tuple[str, str]]) -> tuple[pd.DataFrame, int, int, dict[str, int]]:
    """Inventory one source. ``previous`` maps (source, path) to (fingerprint, sha256)."""
    rows: list[dict[str, object]] = []
    hashed = reused = 0
    for member in reader.members():
        row = _classify(member, spec)
        if row["status"] != JUNK and row["status"] != NOT_IMAGE:
            prev = previous.get((spec.name, member.path))
            if prev is not None and prev[0] == member.fingerprint and prev[1]:
                row["sha256"] = prev[1]
                reused += 1
            else:
                row["sha256"] = hashlib.sha256(reader.read(member)).hexdigest()
                hashed += 1
        rows.append(row)
    df = pd.DataFrame(rows, columns=INVENTORY_COLUMNS[:10])
    demo = load_demographics(spec, reader, df["source_path"].tolist(), data_root)
    for col in ("gender", "age_group", "race"):
        df[col] = demo.table[col].to_numpy() if len(df) else pd.Series(dtype="object")
    notes = {"csv_keys_unmatched": demo.unmatched_keys, "csv_keys_ambiguous": demo.ambiguous_keys}
    return df, hashed, reused, notes


def _spec_digest(spec: SourceSpec, data_root: Path) -> str:
    """Everything besides the files that decides a source's inventory rows."""
    return hashlib.sha1(f"{INVENTORY_VERSION}|{data_root}|{spec!r}".encode()).hexdigest()[:16]


def build_inventory(catalog: Catalog, data_root: Path, previous: pd.DataFrame | None = None) -> InventoryReport:
    """Inventory all sources of the catalogue.

    A source whose listing (stat data of its files, see :mod:`fer_pipeline.dataset.source_watch`) and
    catalogue entry are unchanged since ``previous`` reuses its rows without being listed again;
    the listings travel with the table as ``table.attrs[LISTINGS_ATTR]`` (kept in the Parquet file).
    """
    from fer_pipeline.dataset.source_watch import fingerprint_source

    start = time.perf_counter()
    prev_listings: dict[str, dict[str, object]] = {}
    if previous is not None and len(previous):
        prev_listings = dict(previous.attrs.get(LISTINGS_ATTR) or {})
    listings = {spec.name: {"spec": _spec_digest(spec, data_root),
                            "listing": fingerprint_source(spec, data_root).digest} for spec in catalog.sources}
    reusable: dict[str, pd.DataFrame] = {}
    for spec in catalog.sources:
        before = prev_listings.get(spec.name)
        if previous is not None and isinstance(before, dict) and \
                all(before.get(k) == v for k, v in listings[spec.name].items()):
            rows = previous[previous["source"] == spec.name]
            if len(rows) == before.get("rows"):  # unchanged source: its rows as they were
                reusable[spec.name] = rows
    prev_map: dict[tuple[str, str], tuple[str, str]] = {}
    if previous is not None and len(previous):  # per-member hash reuse, for the sources listed again
        rows = previous.loc[~previous["source"].isin(list(reusable)), ["source", "source_path", "fingerprint", "sha256"]]
        prev_map = {(s, p): (f, h) for s, p, f, h in rows.itertuples(index=False, name=None)}
    frames: list[pd.DataFrame] = []
    hashed = reused = 0
    notes: dict[str, dict[str, int]] = {}
    for spec in catalog.sources:
        if spec.name in reusable:
            rows = reusable[spec.name]
            before = prev_listings[spec.name]
            frames.append(rows[INVENTORY_COLUMNS].reset_index(drop=True))
            reused += int(rows["sha256"].notna().sum())
            notes[spec.name] = dict(before.get("notes") or {})  # type: ignore[call-overload]
            listings[spec.name] = before
            continue
        with open_reader(spec) as reader:
            df, h, r, n = inventory_source(spec, reader, data_root, prev_map)
        frames.append(df)
        hashed, reused = hashed + h, reused + r
        notes[spec.name] = n
        listings[spec.name] = {**listings[spec.name], "rows": len(df), "notes": {k: int(v) for k, v in n.items()}}
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=INVENTORY_COLUMNS)
    table["bytes"] = table["bytes"].astype("int64")
    junk = Counter(table.loc[table["status"] == JUNK, "reason"])
    table = table[INVENTORY_COLUMNS]
    table.attrs = {LISTINGS_ATTR: listings}
    return InventoryReport(table, time.perf_counter() - start, hashed, reused, junk, notes)
