"""Write, audit, publish: what readers see of the data half always comes from one run that
passed its blocking checks.

A run writes its ``manifest``, ``excluded``, ``pool``, ``unlabelled`` and ``splits`` tables as a *candidate* under
``manifest/candidates/<run id>/``; the data checks validate the candidate; only when every
blocking check of the manifest and the splits has passed are the candidate's files renamed over
the published ``manifest/manifest.parquet``, ``excluded.parquet``, ``pool.parquet``,
``unlabelled.parquet`` and ``splits.parquet`` (each synced to disk first, the manifest last). A run whose blocking check
fails leaves the published set exactly as it was and keeps its candidate, with the check results
(``checks_<stage>.json``), for inspection.

Every published table records its versions in its Parquet key-value metadata:
``manifest_version`` (a content hash of the manifest run: kept, excluded and pool rows as the
manifest stage wrote them) in all of them, ``data_version`` (image ids, labels and splits: what
checkpoints record) in the splits, and in the pool its own ``pool_version`` (image ids, pool
labels, pixels: what a pretrained backbone records) and the ``data_version`` of the splits its
leakage guard used. :func:`read_published` and :func:`read_pool` refuse a set whose versions
disagree (e.g. a crash between two renames, or a table copied in by hand), so mixing two runs is
detected instead of trained on. A data root published before the pool (or the unlabelled
images) existed has no ``pool.parquet`` (``unlabelled.parquet``): it reads as an empty table. Readers open each table once and check the versions
of what they read (never check, then reopen: a publication in between would go unnoticed).

Two runs on one data root at once (two instances, the CLI beside the daemon) never interleave
their publication: :func:`publish` renames under the data root's publication lock
(:mod:`fer_pipeline.publish_lock`), and compares and swaps: a candidate records, when its first
table is written (or when it adopts the published tables), which set was published then
(``base.json``: the published manifest's ``run_id`` and ``manifest_version``). If another run
published since, :class:`PublishConflict` names that run and nothing is published.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fer_pipeline.atomic import (
    PARQUET_META_KEY,
    fsync_dir,
    read_parquet_meta,
    replace_synced,
    write_json,
    write_parquet,
)
from fer_pipeline.paths import DataPaths
from fer_pipeline.publish_lock import WAIT_S, publication_lock, reading
from fer_pipeline.schema import MANIFEST_COLUMNS, MANIFEST_REVIEW_COLUMNS, POOL_COLUMNS

TABLES = ("manifest", "excluded", "splits")  # always published (the others may be absent in old data roots)
POOL = "pool"
UNLABELLED = "unlabelled"  # images of `role: unlabelled` sources, no class yet: what review may label
OPTIONAL = (POOL, UNLABELLED)  # published by every run, absent from data roots published before they existed
PUBLISH_ORDER = ("excluded", POOL, UNLABELLED, "splits", "manifest")  # the manifest last: its rename commits the set
KEEP_REJECTED = 5  # rejected candidates kept for inspection (oldest removed first)
BASE_FILE = "base.json"  # in a candidate: the published set it was built from

Head = dict[str, Any]  # which set is published: the manifest's run_id and manifest_version


class MixedSetError(RuntimeError):
    """The published tables are not one readable set: from different runs, never published
    together, or one of them unreadable."""


class PublishConflict(RuntimeError):
    """Another run published since this run's candidate was built: publishing it would silently
    replace that run's newer set, so nothing is published."""


def published_head(paths: DataPaths) -> Head | None:
    """Which set is published now (None: nothing yet): the manifest's rename commits a set, so its
    ``run_id`` and ``manifest_version`` name it. An unreadable manifest is named by its size and
    modification time, so replacing it still counts as a change."""
    try:
        meta = read_parquet_meta(paths.manifest)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 -- damaged: a later publication may repair it
        try:
            st = paths.manifest.stat()
        except FileNotFoundError:
            return None
        return {"unreadable": f"{st.st_size}:{st.st_mtime_ns}"}
    return {"run_id": meta.get("run_id"), "manifest_version": meta.get("manifest_version")}


def _describe(head: Head | None) -> str:
    if head is None:
        return "nothing published"
    if "unreadable" in head:
        return "an unreadable manifest"
    return f"run {head.get('run_id')}'s set (manifest version {head.get('manifest_version')})"


def manifest_version(kept: pd.DataFrame, excluded: pd.DataFrame, pool: pd.DataFrame | None = None,
                     unlabelled: pd.DataFrame | None = None) -> str:
    """Content hash of a manifest run: every kept image with its label, every exclusion with its
    reason, every pool image with its pool label, every unlabelled image (an empty pool or
    unlabelled table changes nothing)."""
    def rows(frame: pd.DataFrame, tag: str, what: list[str]) -> pd.Series:
        parts = [frame[c].astype(str) for c in ["source", "source_path", *what]]
        return tag + "|" + parts[0].str.cat(parts[1:], sep="|") if len(frame) else pd.Series([], dtype=str)

    lines = rows(kept, "k", ["image_id", "label"]).tolist() + rows(excluded, "x", ["reason"]).tolist()
    if pool is not None:
        lines += rows(pool, "p", ["image_id", "pool_label"]).tolist()
    if unlabelled is not None:
        lines += rows(unlabelled, "u", ["image_id"]).tolist()
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()[:16]


def pool_content_version(pool: pd.DataFrame) -> str:
    """Fingerprint of what pretraining sees: every pool image id with its pool label and the SHA-256
    of its processed pixels (so new preprocessing settings are a new pool)."""
    lines = sorted((pool["image_id"].astype(str) + "|" + pool["pool_label"].astype(str) + "|"
                    + pool["pixel_sha"].astype(str)).tolist()) if len(pool) else []
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def empty_pool() -> pd.DataFrame:
    """The pool of a catalogue without pool labels (or of a data root from before the pool)."""
    return pd.DataFrame({c: pd.Series(dtype="object") for c in POOL_COLUMNS})


def empty_unlabelled() -> pd.DataFrame:
    """The unlabelled table of a catalogue without ``role: unlabelled`` sources (or of an old data root)."""
    return pd.DataFrame({c: pd.Series(dtype="object") for c in (*MANIFEST_COLUMNS, *MANIFEST_REVIEW_COLUMNS)})


def data_version(manifest: pd.DataFrame, splits: pd.DataFrame) -> str:
    """Fingerprint of what a model sees: every image id with its label and split."""
    joined = manifest[["image_id", "label"]].merge(splits[["image_id", "split"]], on="image_id")
    rows = joined.sort_values("image_id").astype(str).agg("|".join, axis=1)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Candidate:
    """The tables one run proposes to publish, in their own folder."""

    paths: DataPaths
    run_id: str

    @property
    def dir(self) -> Path:
        return self.paths.candidates_dir / self.run_id

    def path(self, table: str) -> Path:
        return self.dir / f"{table}.parquet"

    def has(self, table: str) -> bool:
        return self.path(table).is_file()

    def write(self, table: str, frame: pd.DataFrame, meta: dict[str, Any]) -> Path:
        """Write one table; the first write records which set is published now (:meth:`base`)."""
        if not (self.dir / BASE_FILE).is_file():
            self.record_base(published_head(self.paths))
        return write_parquet(self.path(table), frame, meta)

    def record_base(self, head: Head | None) -> Path:
        """Record the published set this candidate is built from (:func:`publish` compares)."""
        return write_json(self.dir / BASE_FILE, {"published": head})

    def base(self) -> tuple[bool, Head | None]:
        """(recorded, the published set this candidate was built from); a candidate written before
        bases were recorded has none."""
        try:
            return True, json.loads((self.dir / BASE_FILE).read_text())["published"]
        except FileNotFoundError:
            return False, None

    def read(self, table: str, columns: list[str] | None = None) -> pd.DataFrame:
        return pd.read_parquet(self.path(table), columns=columns)

    def meta(self, table: str) -> dict[str, Any]:
        return read_parquet_meta(self.path(table))

    def record_checks(self, stage: str, results: dict[str, Any]) -> Path:
        """Keep the check results beside the candidate they judged."""
        return write_json(self.dir / f"checks_{stage}.json", results)

    def adopt_published(self) -> None:
        """Start from the published manifest, excluded, pool and unlabelled tables (a run that re-splits only:
        the published pool is guarded again against the new splits; images an earlier guard
        dropped stay excluded, which is conservative). The copies are taken under the shared
        publication lock and checked to be one set; the copied manifest is this candidate's base."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with reading(self.paths.root):
            for table in ("manifest", "excluded", *OPTIONAL):
                try:
                    shutil.copyfile(getattr(self.paths, table), self.path(table))
                except FileNotFoundError:
                    if table not in OPTIONAL:
                        raise FileNotFoundError(f"{getattr(self.paths, table)} does not exist: materialize "
                                                "manifest first") from None
                    self.path(table).unlink(missing_ok=True)  # published before the table existed
        metas = {t: _meta_or_refuse(self.path(t)) for t in ("manifest", "excluded", *OPTIONAL) if self.has(t)}
        versions = {t: m.get("manifest_version") for t, m in metas.items()}
        if len(set(versions.values())) != 1 or None in versions.values():
            detail = ", ".join(f"{t}.parquet {v}" for t, v in versions.items())
            raise MixedSetError(f"the published tables are not one set (manifest versions: {detail}): "
                                "re-materialize manifest and splits")
        self.record_base({"run_id": metas["manifest"].get("run_id"), "manifest_version": versions["manifest"]})
        if not self.has(POOL):  # published before the pool existed
            self.write(POOL, empty_pool(), {"manifest_version": versions["manifest"],
                                            "pool_version": pool_content_version(empty_pool())})
        if not self.has(UNLABELLED):  # published before unlabelled sources existed
            self.write(UNLABELLED, empty_unlabelled(), {"manifest_version": versions["manifest"]})


def publish(candidate: Candidate, wait: float = WAIT_S) -> str:
    """Rename the candidate's tables over the published ones (manifest last); returns the
    manifest version now published.

    Under the data root's publication lock (waiting at most ``wait`` seconds, then
    :class:`~fer_pipeline.publish_lock.PublishLockTimeout` naming the holder), and only if the
    published set is still the one the candidate was built from; otherwise
    :class:`PublishConflict` names the run that published meanwhile, the published set stays as
    that run left it and the candidate stays for inspection."""
    if not candidate.has(UNLABELLED) and candidate.has("manifest"):  # written without one: no unlabelled images
        meta = candidate.meta("manifest")
        write_parquet(candidate.path(UNLABELLED), empty_unlabelled(),
                      {k: meta[k] for k in ("manifest_version", "run_id") if k in meta})
    versions = {t: candidate.meta(t).get("manifest_version") for t in PUBLISH_ORDER}
    if len(set(versions.values())) != 1 or None in versions.values():
        raise MixedSetError(f"candidate {candidate.dir} is not one set: manifest versions {versions}")
    recorded, base = candidate.base()
    paths = candidate.paths
    with publication_lock(paths.root, candidate.run_id, "publishing the manifest set", wait):
        head = published_head(paths)
        if recorded and head != base:
            other = head.get("run_id") if head else None
            raise PublishConflict(
                f"run {candidate.run_id} did not publish: its candidate was built from {_describe(base)}, but "
                + (f"run {other} published manifest version {head.get('manifest_version')} since"
                   if head and other else f"the data root now holds {_describe(head)}")
                + f". The published set stays as it is; this run's candidate is kept at {candidate.dir}. "
                  "Run again to build on the set published now.")
        for table in PUBLISH_ORDER:
            replace_synced(candidate.path(table), getattr(paths, table))
    for leftover in candidate.dir.iterdir():
        leftover.unlink()
    candidate.dir.rmdir()
    fsync_dir(paths.candidates_dir)
    return str(versions["manifest"])


def record_audit(candidate: Candidate, stage: str, results: dict[str, Any], failed: Sequence[str]) -> None:
    """The audit step of write-audit-publish: keep a stage's check results beside the run's
    candidate; when a blocking check failed, the candidate stays for inspection and only the
    :data:`KEEP_REJECTED` newest rejected ones are kept."""
    candidate.record_checks(stage, results)
    if failed:
        prune_rejected(candidate.paths)


def publish_unless_rejected(candidate: Candidate, failed: Sequence[str]) -> str:
    """The publish step: the candidate's set is published only when no blocking check of any
    stage failed (``failed``); returns the publication's status in words."""
    if failed:
        return "rejected: " + ", ".join(failed)
    return f"published manifest version {publish(candidate)}"


def prune_rejected(paths: DataPaths, keep: int = KEEP_REJECTED) -> list[Path]:
    """Remove all but the ``keep`` newest rejected candidates; returns the removed folders."""
    if not paths.candidates_dir.is_dir():
        return []
    folders = sorted((p for p in paths.candidates_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    removed = folders[:-keep] if keep else folders
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


@dataclass(frozen=True)
class PublishedSet:
    manifest: pd.DataFrame
    splits: pd.DataFrame
    manifest_version: str
    data_version: str


_UNREADABLE = "is not a readable Parquet table"


def _unreadable(path: Path, exc: Exception) -> MixedSetError:
    return MixedSetError(f"{path} {_UNREADABLE} ({type(exc).__name__}: {exc}): re-materialize manifest and splits")


def _meta_of(schema_meta: dict[bytes, bytes] | None) -> dict[str, Any]:
    raw = (schema_meta or {}).get(PARQUET_META_KEY)
    return json.loads(raw) if raw else {}


def _meta_or_refuse(path: Path) -> dict[str, Any]:
    """A table's ``fer_pipeline`` metadata; an unreadable footer is refused naming the file."""
    try:
        return read_parquet_meta(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated or not Parquet: say which file, not a pyarrow trace
        raise _unreadable(path, exc) from exc


@dataclass(frozen=True)
class _Read:
    """One published table as read by one open: its metadata, and its rows when asked for."""

    meta: dict[str, Any]
    frame: pd.DataFrame | None = None


def _read_once(path: Path, rows: bool) -> _Read | None:
    """Open ``path`` once: the footer only, or all its bytes, from which both the metadata and the
    rows are parsed (so they are one version of the file). None: no such file."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open(path, "rb") as handle:
            if not rows:
                return _Read(_meta_of(pq.read_schema(handle).metadata))
            data = handle.read()
    except FileNotFoundError:
        return None
    except Exception as exc:  # truncated or not Parquet: say which file, not a pyarrow trace
        raise _unreadable(path, exc) from exc
    try:
        meta = _meta_of(pq.read_schema(pa.BufferReader(data)).metadata)
        return _Read(meta, pd.read_parquet(io.BytesIO(data)))
    except Exception as exc:  # pyarrow raises OSError, ArrowInvalid, ... without the path
        raise _unreadable(path, exc) from exc


def _read_set(paths: DataPaths, rows: tuple[str, ...] = ()) -> dict[str, _Read]:
    """Every published table (the pool and the unlabelled table when there are), each opened once, under the shared
    publication lock; the tables in ``rows`` with their rows. Refuses a set that is incomplete
    (FileNotFoundError), unreadable or not one set (:class:`MixedSetError`), judging only what
    was read."""
    with reading(paths.root):
        read = {t: _read_once(getattr(paths, t), t in rows) for t in (*TABLES, *OPTIONAL)}
    missing = [t for t in TABLES if read[t] is None]
    if missing:
        raise FileNotFoundError(f"no published {', '.join(missing)} under {paths.manifest_dir}: materialize the "
                                "data assets (splits publishes the set)")
    present = {t: r for t, r in read.items() if r is not None}
    versions = {t: r.meta.get("manifest_version") for t, r in present.items()}
    if len(set(versions.values())) != 1 or None in versions.values():
        detail = ", ".join(f"{t}.parquet {v}" for t, v in versions.items())
        raise MixedSetError(f"the published tables are not one set (manifest versions: {detail}): "
                            "re-materialize manifest and splits")
    return present


def published_versions(paths: DataPaths) -> dict[str, str | None]:
    """The manifest version each published table records (None: missing or unversioned); the pool
    and the unlabelled table only when there are (data roots published before them have none).
    Each footer is read once."""
    with reading(paths.root):
        read = {t: _read_once(getattr(paths, t), rows=False) for t in (*TABLES, *OPTIONAL)}
    return {t: (r.meta.get("manifest_version") if r else None) for t, r in read.items()
            if r is not None or t not in OPTIONAL}


def check_published(paths: DataPaths) -> str:
    """The published manifest version, or :class:`MixedSetError` naming what disagrees."""
    return str(_read_set(paths)["manifest"].meta["manifest_version"])


def read_published(paths: DataPaths) -> PublishedSet:
    """The published manifest and splits, verified to be one set (with the pool, when there is one):
    each table is read once and the versions compared are those of the rows returned."""
    read = _read_set(paths, rows=("manifest", "splits"))
    kept, splits = read["manifest"].frame, read["splits"].frame
    assert kept is not None and splits is not None
    return PublishedSet(kept, splits, str(read["manifest"].meta["manifest_version"]), data_version(kept, splits))


def _published_pool(paths: DataPaths, rows: bool) -> _Read | None:
    """The published pool, read once, after checking it belongs to the published set and was
    guarded against the published splits (None: no pool)."""
    read = _read_set(paths, rows=(POOL,) if rows else ())
    pool = read.get(POOL)
    if pool is None:
        return None
    guarded, splits = pool.meta.get("data_version"), read["splits"].meta.get("data_version")
    if guarded != splits:
        raise MixedSetError(f"{paths.pool} was guarded against splits of data version {guarded}, but the published "
                            f"splits are {splits}: re-materialize splits")
    return pool


def read_pool(paths: DataPaths) -> pd.DataFrame:
    """The published pretraining pool (``POOL_COLUMNS``), verified to belong to the published set;
    empty when the data root has none. Its faces load with
    :func:`fer_pipeline.faces.store.load_faces` (``face_path``)."""
    pool = _published_pool(paths, rows=True)
    return empty_pool() if pool is None or pool.frame is None else pool.frame


def read_unlabelled(paths: DataPaths) -> pd.DataFrame:
    """The published unlabelled images (the manifest's columns, ``label`` null), verified to belong
    to the published set; empty when the data root has none. What the review queue ranks."""
    read = _read_set(paths, rows=(UNLABELLED,))
    table = read.get(UNLABELLED)
    return empty_unlabelled() if table is None or table.frame is None else table.frame


def pool_version(paths: DataPaths) -> str:
    """The published pool's version (:func:`pool_content_version`; that of an empty pool when there
    is none): what a pretrained backbone records, so it is retrained only when the pool changes."""
    pool = _published_pool(paths, rows=False)
    if pool is None:
        return pool_content_version(empty_pool())
    if pool.meta.get("pool_version"):
        return str(pool.meta["pool_version"])
    pool = _published_pool(paths, rows=True)  # a pool from before pool versions: hash its rows
    return pool_content_version(empty_pool() if pool is None or pool.frame is None else pool.frame)


def publish_tables(paths: DataPaths, kept: pd.DataFrame, excluded: pd.DataFrame, splits: pd.DataFrame,
                   run_id: str = "manual", pool: pd.DataFrame | None = None,
                   unlabelled: pd.DataFrame | None = None) -> str:
    """Publish a set made outside a pipeline run (tools, tests) with the same versions and
    renames as a run (an empty pool and unlabelled table unless given); the caller vouches for its
    checks. Returns the manifest version."""
    pool = empty_pool() if pool is None else pool
    unlabelled = empty_unlabelled() if unlabelled is None else unlabelled
    version = manifest_version(kept, excluded, pool, unlabelled)
    split_version = data_version(kept, splits)
    candidate = Candidate(paths, run_id)
    candidate.write("manifest", kept, {"manifest_version": version, "run_id": run_id})
    candidate.write("excluded", excluded, {"manifest_version": version, "run_id": run_id})
    candidate.write(POOL, pool, {"manifest_version": version, "data_version": split_version,
                                 "pool_version": pool_content_version(pool), "run_id": run_id})
    candidate.write(UNLABELLED, unlabelled, {"manifest_version": version, "run_id": run_id})
    candidate.write("splits", splits, {"manifest_version": version, "data_version": split_version,
                                       "run_id": run_id})
    return publish(candidate)
