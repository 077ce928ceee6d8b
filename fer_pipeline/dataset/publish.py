"""Write, audit, publish: what readers see of the data half always comes from one run that
passed its blocking checks.

A run writes its ``manifest``, ``excluded``, ``pool`` and ``splits`` tables as a *candidate* under
``manifest/candidates/<run id>/``; the data checks validate the candidate; only when every
blocking check of the manifest and the splits has passed are the candidate's files renamed over
the published ``manifest/manifest.parquet``, ``excluded.parquet``, ``pool.parquet`` and
``splits.parquet`` (each synced to disk first, the manifest last). A run whose blocking check
fails leaves the published set exactly as it was and keeps its candidate, with the check results
(``checks_<stage>.json``), for inspection.

Every published table records its versions in its Parquet key-value metadata:
``manifest_version`` (a content hash of the manifest run: kept, excluded and pool rows as the
manifest stage wrote them) in all four, ``data_version`` (image ids, labels and splits: what
checkpoints record) in the splits, and in the pool its own ``pool_version`` (image ids, pool
labels, pixels: what a pretrained backbone records) and the ``data_version`` of the splits its
leakage guard used. :func:`read_published` and :func:`read_pool` refuse a set whose versions
disagree (e.g. a crash between two renames, or a table copied in by hand), so mixing two runs is
detected instead of trained on. A data root published before the pool existed has no
``pool.parquet``: it reads as an empty pool.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fer_pipeline.atomic import (
    fsync_dir,
    read_parquet_meta,
    replace_synced,
    write_json,
    write_parquet,
)
from fer_pipeline.paths import DataPaths
from fer_pipeline.schema import POOL_COLUMNS

TABLES = ("manifest", "excluded", "splits")  # always published (the pool may be absent in old data roots)
POOL = "pool"
PUBLISH_ORDER = ("excluded", POOL, "splits", "manifest")  # the manifest last: its rename commits the set
KEEP_REJECTED = 5  # rejected candidates kept for inspection (oldest removed first)


class MixedSetError(RuntimeError):
    """The published tables are not one readable set: from different runs, never published
    together, or one of them unreadable."""


def manifest_version(kept: pd.DataFrame, excluded: pd.DataFrame, pool: pd.DataFrame | None = None) -> str:
    """Content hash of a manifest run: every kept image with its label, every exclusion with its
    reason, every pool image with its pool label (an empty pool changes nothing)."""
    def rows(frame: pd.DataFrame, tag: str, what: list[str]) -> pd.Series:
        parts = [frame[c].astype(str) for c in ["source", "source_path", *what]]
        return tag + "|" + parts[0].str.cat(parts[1:], sep="|") if len(frame) else pd.Series([], dtype=str)

    lines = rows(kept, "k", ["image_id", "label"]).tolist() + rows(excluded, "x", ["reason"]).tolist()
    if pool is not None:
        lines += rows(pool, "p", ["image_id", "pool_label"]).tolist()
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
        return write_parquet(self.path(table), frame, meta)

    def read(self, table: str, columns: list[str] | None = None) -> pd.DataFrame:
        return pd.read_parquet(self.path(table), columns=columns)

    def meta(self, table: str) -> dict[str, Any]:
        return read_parquet_meta(self.path(table))

    def record_checks(self, stage: str, results: dict[str, Any]) -> Path:
        """Keep the check results beside the candidate they judged."""
        return write_json(self.dir / f"checks_{stage}.json", results)

    def adopt_published(self) -> None:
        """Start from the published manifest, excluded and pool tables (a run that re-splits only:
        the published pool is guarded again against the new splits; images an earlier guard
        dropped stay excluded, which is conservative)."""
        for table in ("manifest", "excluded"):
            published = getattr(self.paths, table)
            if not published.is_file():
                raise FileNotFoundError(f"{published} does not exist: materialize manifest first")
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(published, self.path(table))
        if self.paths.pool.is_file():
            shutil.copyfile(self.paths.pool, self.path(POOL))
        else:  # published before the pool existed
            version = self.meta("manifest").get("manifest_version")
            self.write(POOL, empty_pool(), {"manifest_version": version, "pool_version": pool_content_version(
                empty_pool())})


def publish(candidate: Candidate) -> str:
    """Rename the candidate's tables over the published ones (manifest last); returns the
    manifest version now published."""
    versions = {t: candidate.meta(t).get("manifest_version") for t in PUBLISH_ORDER}
    if len(set(versions.values())) != 1 or None in versions.values():
        raise MixedSetError(f"candidate {candidate.dir} is not one set: manifest versions {versions}")
    for table in PUBLISH_ORDER:
        replace_synced(candidate.path(table), getattr(candidate.paths, table))
    for leftover in candidate.dir.iterdir():
        leftover.unlink()
    candidate.dir.rmdir()
    fsync_dir(candidate.paths.candidates_dir)
    return str(versions["manifest"])


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


def _recorded_version(path: Path) -> str | None:
    """The manifest version a published table records (None: missing or unversioned)."""
    if not path.is_file():
        return None
    try:
        return read_parquet_meta(path).get("manifest_version")
    except Exception as exc:  # truncated or not Parquet: say which file, not a pyarrow trace
        raise MixedSetError(f"{path} is not a readable Parquet table ({type(exc).__name__}: {exc}): "
                            "re-materialize manifest and splits") from exc


def _read_table(path: Path) -> pd.DataFrame:
    """A published table's rows; damage past a readable footer (a garbled page) names the file too."""
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises OSError, ArrowInvalid, ... without the path
        raise MixedSetError(f"{path} is not a readable Parquet table ({type(exc).__name__}: {exc}): "
                            "re-materialize manifest and splits") from exc


def published_versions(paths: DataPaths) -> dict[str, str | None]:
    """The manifest version each published table records (None: missing or unversioned); the pool
    only when there is one (data roots published before it have none)."""
    present = TABLES + ((POOL,) if paths.pool.is_file() else ())
    return {t: _recorded_version(getattr(paths, t)) for t in present}


def check_published(paths: DataPaths) -> str:
    """The published manifest version, or :class:`MixedSetError` naming what disagrees."""
    versions = published_versions(paths)
    missing = [t for t in TABLES if not getattr(paths, t).is_file()]
    if missing:
        raise FileNotFoundError(f"no published {', '.join(missing)} under {paths.manifest_dir}: materialize the "
                                "data assets (splits publishes the set)")
    if len(set(versions.values())) != 1 or None in versions.values():
        detail = ", ".join(f"{t}.parquet {v}" for t, v in versions.items())
        raise MixedSetError(f"the published tables are not one set (manifest versions: {detail}): "
                            "re-materialize manifest and splits")
    return str(versions["manifest"])


def read_published(paths: DataPaths) -> PublishedSet:
    """The published manifest and splits, verified to be one set (with the pool, when there is one)."""
    version = check_published(paths)
    kept, splits = _read_table(paths.manifest), _read_table(paths.splits)
    return PublishedSet(kept, splits, version, data_version(kept, splits))


def _published_pool_meta(paths: DataPaths) -> dict[str, Any] | None:
    """The published pool's metadata after checking it belongs to the published set (None: no pool)."""
    check_published(paths)  # the pool's manifest version is the set's
    if not paths.pool.is_file():
        return None
    meta = read_parquet_meta(paths.pool)
    guarded = meta.get("data_version")
    splits = read_parquet_meta(paths.splits).get("data_version")
    if guarded != splits:
        raise MixedSetError(f"{paths.pool} was guarded against splits of data version {guarded}, but the published "
                            f"splits are {splits}: re-materialize splits")
    return meta


def read_pool(paths: DataPaths) -> pd.DataFrame:
    """The published pretraining pool (``POOL_COLUMNS``), verified to belong to the published set;
    empty when the data root has none. Its faces load with
    :func:`fer_pipeline.dataset.face_store.load_faces` (``face_path``)."""
    if _published_pool_meta(paths) is None:
        return empty_pool()
    return _read_table(paths.pool)


def pool_version(paths: DataPaths) -> str:
    """The published pool's version (:func:`pool_content_version`; that of an empty pool when there
    is none): what a pretrained backbone records, so it is retrained only when the pool changes."""
    meta = _published_pool_meta(paths)
    if meta is None:
        return pool_content_version(empty_pool())
    return str(meta.get("pool_version") or pool_content_version(pd.read_parquet(paths.pool)))


def publish_tables(paths: DataPaths, kept: pd.DataFrame, excluded: pd.DataFrame, splits: pd.DataFrame,
                   run_id: str = "manual", pool: pd.DataFrame | None = None) -> str:
    """Publish a set made outside a pipeline run (tools, tests) with the same versions and
    renames as a run (an empty pool unless ``pool`` is given); the caller vouches for its checks.
    Returns the manifest version."""
    pool = empty_pool() if pool is None else pool
    version = manifest_version(kept, excluded, pool)
    split_version = data_version(kept, splits)
    candidate = Candidate(paths, run_id)
    candidate.write("manifest", kept, {"manifest_version": version, "run_id": run_id})
    candidate.write("excluded", excluded, {"manifest_version": version, "run_id": run_id})
    candidate.write(POOL, pool, {"manifest_version": version, "data_version": split_version,
                                 "pool_version": pool_content_version(pool), "run_id": run_id})
    candidate.write("splits", splits, {"manifest_version": version, "data_version": split_version,
                                       "run_id": run_id})
    return publish(candidate)
