"""A data root in an object store (``s3://bucket/prefix``, ``gs://…``), behind one seam.

The pipeline's stages read and write plain local files (Parquet tables, face shards,
checkpoints, figures) through :class:`~fer_pipeline.paths.DataPaths`; rewriting each of them for
an object store would touch every module. Instead an :class:`ObjectStore` mirrors the store's
data root into a local *working copy* and the stages keep using ``DataPaths(root=working copy)``:

* :meth:`ObjectStore.pull_published` downloads what a step may read: the catalogue files, the
  ``manifest/`` tables, the face store, ``models/`` and ``reports/`` (never other runs'
  candidates, never ``models/candidates/``); :meth:`ObjectStore.pull_sources` downloads the
  sources ``sources.yaml`` names by a relative path, for the steps that read them. Only objects
  whose size/ETag changed since the last sync are downloaded; a file removed from the store is
  removed from the working copy unless it was changed locally and not pushed yet.
* :meth:`ObjectStore.push` uploads the files written locally since the last sync (new inode,
  size or mtime). The face store goes first (tables refer to its shards), the manifest table
  last (``excluded``, ``pool``, ``splits``, then ``manifest``, as the local publish renames them), so a
  reader that sees a new manifest finds its splits and faces. A single object PUT is atomic on
  S3 and GCS: the upload to the final key is the "rename". A file the store changed since this
  working copy last synced it is a conflict: nothing is uploaded and :class:`StoreConflictError`
  names the files.
* Concurrent writers: a push holds the store's publication lock from its listing to its last
  upload, so the listing it checks is still the store's when it uploads. On S3 the lock is the
  object ``<data root>/.fer-publish.lock``, created with a conditional PUT (``If-None-Match: *``):
  exactly one writer creates it, the others wait (``lock_wait``) and then refuse naming the holder;
  one older than ``STORE_LOCK_LEASE_S`` is a dead writer's and is removed (conditional DELETE). The
  manifest, the commit point, is uploaded with ``If-Match`` (the ETag listed) or ``If-None-Match``
  (none listed), so even a writer that ignores the lock never has its manifest overwritten
  silently. On a ``file://`` store the lock is the local publication lock on that folder; other
  stores (GCS) get no lock here.

What stays local, and why: copies of the sources (inputs, fetched again when they change in the
store), synthetic sources (regenerated, deterministic), other runs' candidates and rejected model
candidates (kept for inspection where they were made), temporary files, and the working copy's
own sync record (``.fer-store.json``, beside a lock file that serialises the syncs of processes
sharing the working copy). The face store *is* mirrored: the published manifest refers to its
shards, which every model and evaluation step loads; the shards are content-addressed and never
rewritten, so each is uploaded once.

Credentials and endpoints come from fsspec's usual sources (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL_S3``, instance roles; for GCS:
``GOOGLE_APPLICATION_CREDENTIALS``; any option as ``FSSPEC_S3_<OPTION>``). No Dagster here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fer_pipeline.atomic import atomic_path, write_json
from fer_pipeline.paths import DataPaths, data_root_setting, is_store_url
from fer_pipeline.publish import PUBLISH_ORDER, MixedSetError, published_versions
from fer_pipeline.publish_lock import LOCK_FILE as PUBLISH_LOCK
from fer_pipeline.publish_lock import PublishLockTimeout, publication_lock
from fer_pipeline.sources.catalog import CatalogError, load_catalog

WORKING_COPY_ENV = "FER_WORKING_COPY"
STATE_FILE = ".fer-store.json"  # the working copy's sync record (not a pipeline output)
LOCK_FILE = ".fer-store.lock"

# What a step may read, as DataPaths attributes (the names live in fer_pipeline.paths).
CATALOGUE_FILES = ("catalog", "settings", "relabels")
PUBLISHED_TREES = ("faces_dir", "manifest_dir", "models_dir", "reports_dir", "reviews_dir")
LOCAL_ONLY = ("candidates_dir", "model_candidates_dir")  # except the running run's own candidate folder
MIXED_SET_RETRIES = 3  # a pull that lands in the middle of another worker's push pulls the set again
STORE_LOCK_WAIT_S = 600.0  # how long a push waits for another writer's push to finish
STORE_LOCK_LEASE_S = 3600.0  # a store lock older than this is a dead writer's: removed
S3_PROTOCOLS = ("s3", "s3a")

LogFn = Callable[[str], None]


class StoreError(RuntimeError):
    """The data root URL cannot be used (unknown protocol, missing package, bucket or credentials)."""


class StoreConflictError(StoreError):
    """Files changed in the store since this working copy synced them: nothing was uploaded."""


@dataclass(frozen=True)
class _Remote:
    identity: str  # size + ETag (or the store's own content tag): changes whenever the object does
    modified: float  # seconds since the epoch (0 when the store does not say)
    etag: str | None = None  # as the store gives it, for conditional writes


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an S3 call was refused by its condition (HTTP 412 PreconditionFailed); s3fs turns it
    into FileExistsError (If-None-Match) or OSError(EINVAL), keeping the botocore error as cause."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return error.get("Code") in ("PreconditionFailed", "412") or status == 412
        seen = seen.__cause__ or seen.__context__
    return isinstance(exc, FileExistsError)


@dataclass
class SyncReport:
    """What one pull or push did, by path relative to the data root."""

    downloaded: list[str] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)
    removed_local: list[str] = field(default_factory=list)  # gone from the store, so gone here
    removed_remote: list[str] = field(default_factory=list)  # the run's published candidate, pruned rejects
    kept_local: list[str] = field(default_factory=list)  # changed here and not pushed yet: not overwritten
    refused: list[str] = field(default_factory=list)  # keys that are no plain path inside the working copy
    unchanged: int = 0
    bytes: int = 0

    def merge(self, other: SyncReport) -> SyncReport:
        for name in ("downloaded", "uploaded", "removed_local", "removed_remote", "kept_local", "refused"):
            getattr(self, name).extend(getattr(other, name))
        self.unchanged += other.unchanged
        self.bytes += other.bytes
        return self

    def summary(self) -> str:
        parts = [f"{len(self.downloaded)} downloaded", f"{len(self.uploaded)} uploaded",
                 f"{self.unchanged} unchanged", f"{self.bytes / 1e6:.1f} MB"]
        for name in ("removed_local", "removed_remote", "kept_local", "refused"):
            if getattr(self, name):
                parts.append(f"{len(getattr(self, name))} {name.replace('_', ' ')}")
        return ", ".join(parts)


def default_working_copy(url: str) -> Path:
    """``$FER_WORKING_COPY``, else a folder per URL under the user's cache directory."""
    env = os.environ.get(WORKING_COPY_ENV)
    if env:
        return Path(env).expanduser().resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[:80]
    return cache / "fer-pipeline" / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def _identity(info: dict[str, Any]) -> str:
    tag = next((info[k] for k in ("ETag", "etag", "md5Hash", "crc32c", "checksum") if info.get(k)), None)
    if tag is None:  # a local "store" (file://): no content tag, the modification time stands in
        tag = info.get("mtime") or info.get("LastModified") or info.get("updated") or ""
    return f"{info.get('size')}:{str(tag).strip(chr(34))}"


def _modified(info: dict[str, Any]) -> float:
    for key in ("LastModified", "mtime", "updated", "last_modified"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value).timestamp()
    return 0.0


def _stat(path: Path) -> list[int] | None:
    """What says a local file changed: size, mtime and inode (every write here renames a new file in)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # fer_pipeline.atomic.atomic_path's temp files


def _safe_rel(rel: str) -> bool:
    """Whether a key relative to the data root is a plain relative path, so it stays inside the
    working copy: no ``..``, ``.`` or empty part (``a//b``, a leading ``/``), no NUL."""
    return bool(rel) and "\0" not in rel and not any(part in ("", ".", "..") for part in rel.split("/"))


def _under(rel: str, prefix: str) -> bool:
    return rel == prefix or rel.startswith(prefix + "/")


class ObjectStore:
    """A data root at ``url`` mirrored into the local folder ``working_copy``.

    Construction checks nothing remote; :meth:`open` checks that the store answers and the
    bucket exists, so a wrong URL or bucket fails before any work, naming the URL."""

    def __init__(self, url: str, working_copy: str | os.PathLike[str] | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        protocol = self.url.split("://", 1)[0]
        try:
            self.fs = fsspec.filesystem(protocol, skip_instance_cache=True, **(storage_options or {}))
        except ValueError as exc:  # fsspec: "Protocol not known"
            raise StoreError(f"data root {self.url!r}: unknown storage protocol '{protocol}://' ({exc})") from exc
        except ImportError as exc:
            extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol, protocol)
            raise StoreError(f"data root {self.url!r} needs the '{extra}' extra (pip install -e '.[{extra}]'), "
                             f"here and on every worker: {exc}") from exc
        self.root_key = str(self.fs._strip_protocol(self.url)).rstrip("/")
        if not self.root_key:
            raise StoreError(f"data root {self.url!r}: no bucket named")
        self.local = Path(working_copy).expanduser().resolve() if working_copy else default_working_copy(self.url)
        self.paths = DataPaths(self.local)
        self._opened = False

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r}, working_copy={str(self.local)!r})"

    @property
    def _is_local_fs(self) -> bool:
        protocol = self.fs.protocol
        return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))

    # --- names ------------------------------------------------------------------------------------

    def rel(self, path: Path) -> str:
        """A working-copy path as a key relative to the data root (POSIX)."""
        return path.relative_to(self.local).as_posix()

    def key(self, rel: str) -> str:
        return f"{self.root_key}/{rel}"

    def _local_only(self, run_id: str | None) -> Callable[[str], bool]:
        """Whether a key stays local: other runs' candidates and model candidates (module docstring)."""
        prefixes = [self.rel(getattr(self.paths, attr)) for attr in LOCAL_ONLY]
        own = self.rel(self.paths.candidates_dir / run_id) if run_id else None
        return lambda rel: any(_under(rel, p) for p in prefixes) and not (own is not None and _under(rel, own))

    # --- checks -----------------------------------------------------------------------------------

    def open(self) -> ObjectStore:
        """Check that the store answers and its bucket exists (an empty prefix is a new data root),
        and that the working copy mirrors this URL; :class:`StoreError` otherwise."""
        if self._opened:
            return self
        try:
            if self._is_local_fs:
                if not self.fs.isdir(self.root_key):
                    raise StoreError(f"data root {self.url!r}: folder {self.root_key} does not exist")
            else:
                try:
                    self.fs.ls(self.root_key, detail=False)
                except FileNotFoundError:  # an empty prefix, or no such bucket
                    bucket = self.root_key.split("/", 1)[0]
                    try:
                        self.fs.ls(bucket, detail=False)
                    except FileNotFoundError as exc:
                        raise StoreError(f"data root {self.url!r}: bucket '{bucket}' does not exist "
                                         f"({exc})") from exc
        except StoreError:
            raise
        except Exception as exc:  # credentials, endpoint, permissions: say which URL
            raise StoreError(f"data root {self.url!r}: cannot reach the store ({type(exc).__name__}: {exc}); "
                             "credentials and endpoint come from the usual environment (e.g. AWS_ACCESS_KEY_ID, "
                             "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3; GOOGLE_APPLICATION_CREDENTIALS)") from exc
        with self._state() as state:
            if state.setdefault("url", self.url) != self.url:
                raise StoreError(f"working copy {self.local} mirrors {state['url']}, not {self.url}: "
                                 f"give each data root its own working copy (${WORKING_COPY_ENV})")
        self._opened = True
        return self

    # --- the sync record --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        """The sync record, under an exclusive lock (processes sharing the working copy take turns);
        saved when the block ends, even on an error, so what was synced stays recorded."""
        self.local.mkdir(parents=True, exist_ok=True)
        with open(self.local / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.local / STATE_FILE
            try:
                state = json.loads(path.read_text()) if path.is_file() else {}
            except ValueError:  # a damaged record: everything is compared again, nothing is lost
                state = {}
            if not isinstance(state, dict) or not isinstance(state.get("objects", {}), dict):
                state = {}  # the wrong shape (a list, objects not a mapping): damaged, as above
            objects = state.setdefault("objects", {})
            for rel in [r for r, v in objects.items()  # entries of the wrong shape, or escaping keys: dropped
                        if not (_safe_rel(r) and isinstance(v, list) and v and isinstance(v[0], str))]:
                del objects[rel]
            before = json.dumps(state, sort_keys=True)
            try:
                yield state
            finally:
                if json.dumps(state, sort_keys=True) != before:
                    write_json(path, state)

    # --- listing ----------------------------------------------------------------------------------

    def _list(self, rel: str) -> dict[str, _Remote]:
        """Objects at ``rel`` (one object) or under it (a prefix), by key relative to the root."""
        self.fs.invalidate_cache()  # another worker may have written since the last listing
        try:
            found = self.fs.find(self.key(rel), detail=True)
        except FileNotFoundError:
            return {}
        start = len(self.root_key) + 1
        return {name[start:]: _Remote(_identity(info), _modified(info), info.get("ETag"))
                for name, info in found.items()
                if info.get("type", "file") == "file" and not _is_temporary(name.rsplit("/", 1)[-1])}

    # --- pull -------------------------------------------------------------------------------------

    def pull(self, rels: Iterable[str], run_id: str | None = None, log: LogFn | None = None) -> SyncReport:
        """Bring the objects at or under each of ``rels`` into the working copy (changed ones only)."""
        self.open()
        report = SyncReport()
        local_only, any_run = self._local_only(run_id), self._local_only(None)
        with self._state() as state:
            for rel in rels:
                listing = {}
                for key, remote in self._list(rel).items():
                    if not _safe_rel(key):  # e.g. "manifest/../../x": would be written outside the working copy
                        report.refused.append(key)
                        if log:
                            log(f"{self.key(key)}: refused, not downloaded (the key is no plain path inside "
                                f"the working copy {self.local})")
                    elif not local_only(key):
                        listing[key] = remote
                report.merge(self._pull_listing(rel, listing, state["objects"], any_run, log))
        return report

    def _pull_listing(self, prefix: str, listing: dict[str, _Remote], records: dict[str, list[Any]],
                      local_only: Callable[[str], bool], log: LogFn | None) -> SyncReport:
        report = SyncReport()
        for rel, remote in sorted(listing.items()):
            local = self.local / rel
            record, now = records.get(rel), _stat(local)
            if record and now == record[1:]:
                if record[0] == remote.identity:
                    report.unchanged += 1
                    continue
            elif now is not None and record and record[0] == remote.identity:
                report.kept_local.append(rel)  # written here, not pushed yet: the push will send it
                continue
            elif now is not None and log:
                log(f"{rel}: replaced by the store's version (the local copy was never pushed, or the store "
                    "changed since)")
            with atomic_path(local) as tmp:
                self.fs.get_file(self.key(rel), str(tmp))
            records[rel] = [remote.identity, *(_stat(local) or [])]
            report.downloaded.append(rel)
            report.bytes += local.stat().st_size
        for rel in [r for r in records if _under(r, prefix) and r not in listing]:
            local = self.local / rel
            if _stat(local) in (None, records[rel][1:]) and not local_only(rel):
                if local.exists():
                    local.unlink()
                    report.removed_local.append(rel)
                del records[rel]
        return report

    def pull_published(self, run_id: str | None = None, log: LogFn | None = None,
                       trees: Iterable[str] = PUBLISHED_TREES) -> SyncReport:
        """What a step may read (catalogue files and the ``trees``, as DataPaths attributes), plus
        the running run's own candidate folder; pulls the three published tables again while
        they are not one set (this pull landed in the middle of another worker's push)."""
        rels = [self.rel(getattr(self.paths, a)) for a in (*CATALOGUE_FILES, *trees)]
        report = self.pull(rels, run_id, log)
        tables = [self.rel(getattr(self.paths, t)) for t in PUBLISH_ORDER]
        for attempt in range(MIXED_SET_RETRIES if "manifest_dir" in trees else 0):
            try:
                versions = set(published_versions(self.paths).values())
            except MixedSetError:  # unreadable: pulled while being replaced? try again
                versions = {None, ""}
            if len(versions) <= 1:
                break
            time.sleep(0.5 * 2 ** attempt)
            report.merge(self.pull(tables, run_id, log))
        return report

    def pull_sources(self, log: LogFn | None = None) -> SyncReport:
        """The sources (and demographics CSVs) that the working copy's ``sources.yaml`` names by a
        relative path; absolute paths are local to the worker. An entry without such an object in
        the store is left to the catalogue's own checks, which name the source."""
        report = self.pull([self.rel(self.paths.catalog)], log=log)
        return report.merge(self.pull(source_keys(self.paths.catalog), log=log))

    # --- push -------------------------------------------------------------------------------------

    def _local_files(self, run_id: str | None) -> Iterator[str]:
        local_only = self._local_only(run_id)
        for attr in PUBLISHED_TREES:
            top = getattr(self.paths, attr)
            for folder, dirs, files in os.walk(top):
                dirs.sort()
                for name in sorted(files):
                    rel = self.rel(Path(folder) / name)
                    if not _is_temporary(name) and not local_only(rel):
                        yield rel

    def _upload_rank(self, rel: str) -> tuple[int, str]:
        """Faces first (tables refer to them), metrics.json after the models, manifest last."""
        last = [self.rel(self.paths.metrics_json), *(self.rel(getattr(self.paths, t)) for t in PUBLISH_ORDER)]
        if rel in last:
            return 2 + last.index(rel), rel
        return (0 if _under(rel, self.rel(self.paths.faces_dir)) else 1), rel

    def push(self, run_id: str | None = None, keep_candidates: int | None = None,
             log: LogFn | None = None, lock_wait: float = STORE_LOCK_WAIT_S) -> SyncReport:
        """Upload what was written in the working copy since the last sync (see the module
        docstring for the order, the conflict rule and concurrent writers). With ``run_id``, that
        run's candidate folder is mirrored too (removed from the store once published); with
        ``keep_candidates``, only that many of the other (rejected) candidate folders are kept in
        the store. Waits at most ``lock_wait`` seconds for another writer's push."""
        self.open()
        report = SyncReport()
        own = self.rel(self.paths.candidates_dir / run_id) if run_id else None
        with self._state() as state:
            records = state["objects"]
            changed = [rel for rel in self._local_files(run_id)
                       if rel not in records or records[rel][1:] != _stat(self.local / rel)]
            gone = [rel for rel in records if own and _under(rel, own) and not (self.local / rel).exists()]
            if not changed and not gone:
                return report
            with self.push_lock(run_id, lock_wait, log):
                self._push_locked(report, records, changed, gone, own, keep_candidates)
        if log:
            log(f"pushed to {self.url}: {report.summary()}")
        return report

    def _push_locked(self, report: SyncReport, records: dict[str, list[Any]], changed: list[str],
                     gone: list[str], own: str | None, keep_candidates: int | None) -> None:
        """List, check for conflicts, upload: under the store's publication lock."""
        remote: dict[str, _Remote] = {}
        for attr in PUBLISHED_TREES:
            top = self.rel(getattr(self.paths, attr))
            if any(_under(rel, top) for rel in changed + gone):
                remote.update(self._list(top))
        conflicts = [rel for rel in changed + gone if rel in remote
                     and (rel not in records or records[rel][0] != remote[rel].identity)]
        if conflicts:
            raise StoreConflictError(
                f"{self.url}: {len(conflicts)} file(s) changed in the store since this working copy "
                f"({self.local}) last synced them, nothing uploaded: {', '.join(sorted(conflicts)[:10])}")
        manifest = self.rel(self.paths.manifest)
        for rel in sorted(changed, key=self._upload_rank):
            self._upload(rel, remote.get(rel) if rel == manifest else None, conditional=rel == manifest)
            self.fs.invalidate_cache(self.key(rel))
            records[rel] = [_identity(self.fs.info(self.key(rel))), *(_stat(self.local / rel) or [])]
            report.uploaded.append(rel)
            report.bytes += records[rel][1]
        for rel in gone:
            if rel in remote:
                self.fs.rm_file(self.key(rel))
                report.removed_remote.append(rel)
            del records[rel]
        if keep_candidates is not None and own and any(_under(r, own) for r in changed + gone):
            report.removed_remote += self._prune_candidates(keep_candidates, own)

    @property
    def _is_s3(self) -> bool:
        protocol = self.fs.protocol
        return any(p in S3_PROTOCOLS for p in (protocol if isinstance(protocol, (tuple, list)) else (protocol,)))

    @contextlib.contextmanager
    def push_lock(self, run_id: str | None = None, wait: float = STORE_LOCK_WAIT_S,
                  log: LogFn | None = None, lease: float = STORE_LOCK_LEASE_S) -> Iterator[None]:
        """Hold the store's publication lock (module docstring); :class:`StoreConflictError` naming
        the holder when it is not free within ``wait`` seconds."""
        if self._is_local_fs:
            try:
                with publication_lock(self.root_key, run_id, f"pushing from {self.local}", wait):
                    yield
            except PublishLockTimeout as exc:
                raise StoreConflictError(f"{self.url}: nothing uploaded: {exc}") from exc
            return
        if not self._is_s3:
            yield  # no conditional create through fsspec here: see docs/operations.md, "Object storage"
            return
        bucket, key, _ = self.fs.split_path(self.key(PUBLISH_LOCK))
        me = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(), "working_copy": str(self.local),
              "since": datetime.now().astimezone().isoformat(timespec="seconds")}
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            try:
                etag = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=json.dumps(me).encode(),
                                       IfNoneMatch="*")["ETag"]
                break
            except Exception as exc:  # noqa: BLE001 -- only a failed condition means "held"
                if not _precondition_failed(exc):
                    raise
            holder, holder_etag, age = self._lock_holder(bucket, key)
            if holder_etag is not None and age > lease:  # a dead writer's: remove it, if still the same
                with contextlib.suppress(Exception):
                    self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=holder_etag)
                if log:
                    log(f"{self.url}/{PUBLISH_LOCK}: removed a lock {age:.0f} s old ({holder})")
                continue
            if time.monotonic() >= deadline:
                who = (f"run {holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')}, working copy "
                       f"{holder.get('working_copy')}, since {holder.get('since')})" if isinstance(holder, dict)
                       else "another writer")
                raise StoreConflictError(
                    f"{self.url}: nothing uploaded: {who} holds the store's publication lock "
                    f"({self.url}/{PUBLISH_LOCK}); waited {wait:g} s. The files stay in the working copy "
                    f"({self.local}): push again once that push has finished (if that writer is gone, delete the "
                    "lock object)")
            time.sleep(min(1.0, max(wait, 0.05) / 10))
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # gone already (removed as stale): nothing to release
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)

    def _lock_holder(self, bucket: str, key: str) -> tuple[Any, str | None, float]:
        """(who holds the store lock, as it wrote itself; its ETag; its age in seconds), or
        (None, None, 0) when it is gone."""
        path = f"{bucket}/{key}"
        try:
            self.fs.invalidate_cache(path)
            info = self.fs.info(path)
            holder = json.loads(self.fs.cat_file(path) or b"null")
        except FileNotFoundError:
            return None, None, 0.0
        except ValueError:
            holder = None
        modified = _modified(info)
        return holder, info.get("ETag"), (time.time() - modified) if modified else 0.0

    def _upload(self, rel: str, listed: _Remote | None = None, conditional: bool = False) -> None:
        """One file to its final key. ``conditional`` (S3): only if the object is still the one
        ``listed`` (or still absent), else :class:`StoreConflictError`: nothing is overwritten."""
        local, key = self.local / rel, self.key(rel)
        if not self._is_local_fs:
            if not (conditional and self._is_s3):
                self.fs.put_file(str(local), key)  # one PUT (or a completed multipart upload): atomic
                return
            condition = {"IfMatch": listed.etag} if listed is not None and listed.etag else {"IfNoneMatch": "*"}
            try:  # one PUT up to 5 GB (chunksize): the condition applies to the object as a whole
                self.fs.put_file(str(local), key, chunksize=max(local.stat().st_size, 1), **condition)
            except Exception as exc:
                if not _precondition_failed(exc):
                    raise
                raise StoreConflictError(
                    f"{self.url}: {rel} changed in the store while this push was uploading (a writer that did not "
                    f"hold the store's publication lock); the store's {rel} was kept, not overwritten. The tables "
                    "uploaded just before it may now disagree with it: readers refuse such a set (MixedSetError) "
                    "until one writer pushes a whole set again") from exc
            return
        tmp = f"{key}.{uuid.uuid4().hex}.tmp"  # a local "store": copy beside, then rename
        self.fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(str(local), tmp)
        self.fs.mv(tmp, key)

    def _prune_candidates(self, keep: int, own: str) -> list[str]:
        """Remove candidate folders beyond the ``keep`` newest, this run's counting as the newest
        (as :func:`fer_pipeline.publish.prune_rejected` does locally)."""
        top = self.rel(self.paths.candidates_dir)
        folders: dict[str, list[tuple[str, float]]] = {}
        for rel, remote in self._list(top).items():
            folder = rel[len(top) + 1:].split("/", 1)[0]
            folders.setdefault(f"{top}/{folder}", []).append((rel, remote.modified))
        others = sorted((f for f in folders if f != own), key=lambda f: (max(m for _, m in folders[f]), f))
        removed = []
        for folder in others[:max(len(others) - (keep - 1), 0)]:  # this run's folder counts as one kept
            for rel, _ in folders[folder]:
                self.fs.rm_file(self.key(rel))
                removed.append(rel)
        return removed


def source_keys(catalogue: Path) -> list[str]:
    """Relative paths the catalogue names (sources, demographics CSVs outside them). A catalogue
    that cannot be read or is malformed names none: the run's own :func:`load_catalog` then
    reports it, naming the source. Synthetic sources stay local (they are generated)."""
    try:
        catalog = load_catalog(catalogue, check_paths=False)  # the sources are not pulled yet
    except (CatalogError, OSError):
        return []
    keys: list[str] = []
    for spec in catalog.sources:
        if spec.kind == "synthetic":
            continue
        if spec.path.is_relative_to(catalogue.parent):  # written relative to the data root
            keys.append(_glob_free(spec.path.relative_to(catalogue.parent).as_posix()))
        csv = spec.demographics.csv if spec.demographics is not None else None
        if csv and csv.strip() and not Path(csv).expanduser().is_absolute():
            keys.append(_glob_free(Path(csv).as_posix().strip("/")))
    return [k for k in dict.fromkeys(keys) if k not in ("", ".") and ".." not in k.split("/")]


def _glob_free(rel: str) -> str:
    """The part of a (demographics) pattern before its first wildcard: the prefix to pull."""
    head = re.split(r"[*?\[]", rel, maxsplit=1)[0]
    return head.rsplit("/", 1)[0] if head != rel else rel


def open_data_root(root: str | os.PathLike[str] | None = None, trees: Iterable[str] = PUBLISHED_TREES,
                   working_copy: str | os.PathLike[str] | None = None, log: LogFn | None = None) -> DataPaths:
    """Local :class:`DataPaths` for a data root (``root``, else ``$FER_DATA_DIR``, else ``data/``):
    a folder as it is; an object-store URL as its working copy, with the catalogue files and
    ``trees`` (DataPaths attributes) pulled first. For readers outside a run (CLI, summary)."""
    setting = data_root_setting(str(root) if root else "")
    if not is_store_url(setting):
        return DataPaths(Path(setting).expanduser().resolve())
    store = ObjectStore(setting, working_copy)
    store.pull_published(trees=tuple(trees), log=log)
    return store.paths
