"""The faces stage: decode, validate and normalise every candidate image, in parallel, once.

Work is keyed by raw content hash in the :class:`~fer_pipeline.faces.store.FaceStore`: files seen
before under the same settings are not read, decoded or hashed again, so re-running after a
source grows only processes the new files. Large batches are decoded in worker processes
(both cores; :mod:`fer_pipeline.faces.batch` is what a worker runs) while the parent streams
bytes out of the sources. What the parent holds is bounded by bytes, not by a count of files
(``max_bytes_in_flight``): files read and not yet decoded never add up to more than the budget,
whatever their sizes, and a chunk closes at :data:`CHUNK` files or at its share of the budget.
A file larger than the whole budget is still processed, alone (nothing else is held meanwhile).

One bad file is one rejected row, never a failed run: a file that cannot be read now (removed,
permission, above the size cap) or that makes the decoder raise or its worker process die gets
its own reason. Those outcomes are not stored in the face cache (they may not last: a worker
killed for memory, a permission fixed); only what decoding the bytes says about them is.

Sources with ``faces: detect`` go through the face detector in the same pool (small chunks: a
photo costs about as much as 200 crops): every face found is one item, cached by content hash +
detector settings, so an unchanged photo is never detected twice (:mod:`fer_pipeline.faces.store`).
A file is an item of the faces table once per face kept (``face_index``), or once with its reason.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fer_pipeline.faces.batch import (
    ChunkResult,
    init_worker,
    process_chunk,
    process_detect_chunk,
)
from fer_pipeline.faces.framing import SourceFraming
from fer_pipeline.faces.preprocess import PreprocessSettings
from fer_pipeline.faces.store import INDEX_COLUMNS, ITEM_KEY, FaceStore
from fer_pipeline.limits import MAX_BYTES_IN_FLIGHT
from fer_pipeline.sources.files import MemberError
from fer_pipeline.sources.framing import CROP

CHUNK = 128  # images per task sent to a worker
DETECT_CHUNK = 4  # photos per detection task (~50 ms each): small, so both workers share a few photos
# A photo through the detector weighs this many crops when choosing worker processes: it costs ~200
# crops' work, but detecting workers also import torch and load the networks (~3 s), so the pool pays
# from about 140 new photos on.
DETECT_COST = 70
SHARD_ROWS = 20_000  # faces per shard file: bounds the parent's memory on huge sources
PARALLEL_MIN = 10_000  # below this many new images, worker start-up (~1 s: spawn + imports) costs more than it saves
IN_FLIGHT_PER_WORKER = 8  # chunks queued per worker: the parent reads ahead while workers start

ReadFn = Callable[[str, str], bytes]  # (source, source_path) -> raw bytes; raises MemberError when unreadable
Item = tuple[str, bytes]  # (raw content sha256, bytes)
ChunkFn = Callable[[list[Item], PreprocessSettings], ChunkResult]
Job = tuple[str, ChunkFn, list[Item]]  # (framing, what decodes the chunk, the chunk)
FailureKey = tuple[str, str]  # (sha256, framing)
WORKER_DIED = "decoder crashed (its worker process died)"


def face_keys(table: pd.DataFrame) -> pd.Series:
    """Content address of each item: the file's SHA-256 for a crop (as before detection existed), a
    hash of (file hash, framing, face index) for a detected face. Image ids are its first 16 characters."""
    crop = table["framing"].astype(str) == CROP
    out = table["sha256"].astype(object).copy()
    if (~crop).any():
        parts = (table.loc[~crop, "sha256"].astype(str) + "|" + table.loc[~crop, "framing"].astype(str) + "|"
                 + table.loc[~crop, "face_index"].astype("int64").astype(str))
        out.loc[~crop] = [hashlib.sha256(p.encode()).hexdigest() for p in parts]
    return out


class _WorkerDied(RuntimeError):
    """The worker process decoding a file died (crashed, or killed for memory)."""


def index_frame(results: list[ChunkResult], framings: list[str] | None = None) -> pd.DataFrame:
    """Workers' chunk results as rows of the face index (INDEX_COLUMNS minus face_ref); ``framings``
    gives each chunk's framing (default: crops).

    Built once per shard, not per chunk: a DataFrame per 128 images cost the parent process
    more CPU than reading the files."""
    def per_item(col: str) -> list[object]:
        return [v for r in results for v in getattr(r, col)]

    df = pd.DataFrame({col: per_item(col) for col in ("sha256", "reason", "width", "height")})
    df["framing"] = [f for f, r in zip(framings or [CROP] * len(results), results) for _ in r.sha256]
    df["face_index"] = np.asarray(per_item("face_index"), dtype=np.int64)
    df["faces_found"] = pd.array(per_item("faces_found"), dtype="Int64")
    boxes = np.array([b if b is not None else (np.nan,) * 4 for b in per_item("box")], dtype=np.float64).reshape(-1, 4)
    for i, col in enumerate(("box_left", "box_top", "box_right", "box_bottom")):
        df[col] = boxes[:, i]
    df["detector_score"] = np.array([np.nan if v is None else v for v in per_item("score")], dtype=np.float64)
    ok = df["reason"].isna().to_numpy()
    for col in ("pixel_sha", "phash", "phash_mirror"):
        text = np.full(len(df), None, dtype=object)
        text[ok] = per_item(col)
        df[col] = text
    for col in ("mean_intensity", "std_intensity"):
        numbers = np.full(len(df), np.nan)
        numbers[ok] = np.concatenate([getattr(r, col) for r in results]) if len(results) else []
        df[col] = numbers
    return df


def _read_failure(exc: Exception) -> str:
    if isinstance(exc, MemberError):
        return exc.problem.reason
    return f"unreadable ({type(exc).__name__}: {exc})"


class _Budget:
    """File bytes the stage holds: read from a source and not yet decoded (the chunk being built,
    and chunks sent to a worker whose result has not come back). ``peak`` is the most ever held."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held, self.peak = max(1, int(limit)), 0, 0

    def fits(self, n: int) -> bool:
        """Whether ``n`` more bytes may be read now: always when nothing is held (a file larger
        than the budget proceeds, alone)."""
        return self.held == 0 or self.held + n <= self.limit

    def take(self, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)

    def give(self, n: int) -> None:
        self.held -= n


class _Serial:
    """Chunks decoded in this process, one at a time, when collected (the in-process path)."""

    limit = 0  # no chunk waits: each is decoded as soon as it is sent

    def __init__(self, settings: PreprocessSettings) -> None:
        self.settings = settings
        self._jobs: deque[tuple[Job, int]] = deque()

    @property
    def pending(self) -> int:
        return len(self._jobs)

    def submit(self, job: Job, nbytes: int) -> None:
        self._jobs.append((job, nbytes))

    def collect_oldest(self, budget: _Budget, failures: dict[FailureKey, str]) -> Iterator[tuple[str, ChunkResult]]:
        job, nbytes = self._jobs.popleft()
        try:
            results = [job[1](job[2], self.settings)]
        except Exception:  # noqa: BLE001 - find the file at fault
            results = list(_one_by_one(job, self.settings, failures))
        budget.give(nbytes)
        for result in results:
            yield job[0], result


def _stream(todo: list[tuple[str, str, str, str]], sizes: list[int], fns: Mapping[str, ChunkFn], read: ReadFn,
            failures: dict[FailureKey, str], runner: _Serial | _WorkerPool, budget: _Budget,
            chunk_bytes: int) -> Iterator[tuple[str, ChunkResult]]:
    """Read ``todo`` (rows: sha256, source, path, framing) into chunks of one framing each, send them
    to ``runner`` and yield (framing, result) in order, holding at most ``budget`` bytes of files.

    ``sizes`` are the sizes declared by the inventory (0: unknown): before a file is read, results
    are collected until it fits. A file that cannot be read goes to ``failures`` with its reason."""
    batch: list[Item] = []
    batch_bytes = 0
    current = CROP

    def send() -> None:
        nonlocal batch, batch_bytes
        runner.submit((current, fns[current], batch), batch_bytes)
        batch, batch_bytes = [], 0

    for (sha, source, path, framing), declared in zip(todo, sizes):
        if batch and (framing != current or batch_bytes + declared > chunk_bytes):
            send()
        while not budget.fits(declared):
            if batch:  # held either way: send it so that it can be decoded and let go
                send()
            yield from runner.collect_oldest(budget, failures)
        current = framing
        try:
            data = read(source, path)
        except Exception as exc:  # noqa: BLE001 - one unreadable file is that file's outcome
            failures[(sha, framing)] = _read_failure(exc)
            continue
        budget.take(len(data))  # what was read (a file grown since the inventory counts in full)
        batch.append((sha, data))
        batch_bytes += len(data)
        if len(batch) == (CHUNK if framing == CROP else DETECT_CHUNK) or batch_bytes >= chunk_bytes:
            send()
        while runner.pending > runner.limit:  # bounded: stream, don't buffer a dataset
            yield from runner.collect_oldest(budget, failures)
    if batch:
        send()
    while runner.pending:
        yield from runner.collect_oldest(budget, failures)


def _decoder_error(exc: BaseException) -> str:
    return f"decoder error ({type(exc).__name__}: {exc})"


def _one_by_one(job: Job, settings: PreprocessSettings, failures: dict[FailureKey, str]) -> Iterator[ChunkResult]:
    """A chunk that failed as a whole, again file by file: only the file at fault fails."""
    framing, fn, chunk = job
    for item in chunk:
        try:
            yield fn([item], settings)
        except Exception as exc:  # noqa: BLE001
            failures[(item[0], framing)] = _decoder_error(exc)


class _WorkerPool:
    """Worker processes that outlive a failing chunk.

    A chunk whose task raises, or whose worker process dies (the pool is then restarted), is
    run again one file per task, so the file at fault gets the reason and the others their
    faces. Results come back in submission order (:func:`_stream` keeps at most ``limit``
    chunks and the byte budget in flight)."""

    def __init__(self, workers: int, settings: PreprocessSettings) -> None:
        self.workers, self.settings = workers, settings
        self.limit = workers * IN_FLIGHT_PER_WORKER
        self.generation = 0  # which pool a future belongs to: restart only the current one
        self._in_flight: deque[tuple[Future[ChunkResult], int, Job, int]] = deque()  # (.., job, bytes)
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        ctx = mp.get_context("spawn")  # fork is unsafe inside a threaded Dagster run process
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=init_worker)

    def _restart(self, generation: int) -> None:
        if generation == self.generation:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool, self.generation = self._start(), self.generation + 1

    def _submit(self, fn: ChunkFn, items: list[Item]) -> tuple[Future[ChunkResult], int]:
        try:
            return self._pool.submit(fn, items, self.settings), self.generation
        except BrokenProcessPool:  # a worker died since the last result
            self._restart(self.generation)
            return self._pool.submit(fn, items, self.settings), self.generation

    def _run_one(self, fn: ChunkFn, items: list[Item]) -> ChunkResult:
        future, generation = self._submit(fn, items)
        try:
            return future.result()
        except BrokenProcessPool:
            self._restart(generation)
            raise _WorkerDied(WORKER_DIED) from None

    @property
    def pending(self) -> int:
        return len(self._in_flight)

    def submit(self, job: Job, nbytes: int) -> None:
        self._in_flight.append((*self._submit(job[1], job[2]), job, nbytes))

    def collect_oldest(self, budget: _Budget, failures: dict[FailureKey, str]) -> Iterator[tuple[str, ChunkResult]]:
        """The oldest chunk's results (its files retried one per task if the chunk failed); its
        bytes are let go once its outcome is known."""
        future, generation, job, nbytes = self._in_flight.popleft()
        framing, fn, chunk = job
        try:
            result: ChunkResult | None = future.result()
        except BrokenProcessPool:
            self._restart(generation)
            result = None
        except Exception:  # noqa: BLE001 - retried file by file below
            result = None
        if result is not None:
            budget.give(nbytes)
            yield framing, result
            return
        results = []
        for item in chunk:
            try:
                results.append(self._run_one(fn, [item]))
            except Exception as exc:  # noqa: BLE001
                failures[(item[0], framing)] = WORKER_DIED if isinstance(exc, _WorkerDied) else _decoder_error(exc)
        budget.give(nbytes)
        for result in results:
            yield framing, result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class FacesReport:
    table: pd.DataFrame  # one row per item (a candidate, or each kept face of a detect source's file):
    #                      source, source_path, sha256 + INDEX_COLUMNS + face_key
    processed: int  # distinct images decoded this time (per framing)
    reused: int  # distinct images found in the cache
    seconds: float
    workers: int
    detected: int = 0  # images run through the face detector this time
    detect_reused: int = 0  # images of detect sources whose faces came from the cache
    peak_bytes_in_flight: int = 0  # the most file bytes held at once (read, not yet decoded)


def process_faces(candidates: pd.DataFrame, read: ReadFn, store: FaceStore, settings: PreprocessSettings,
                  workers: int | None = None, log: Callable[[str], None] | None = None,
                  ignore_cache: bool = False, parallel_min: int = PARALLEL_MIN,
                  chunk_fn: ChunkFn = process_chunk,
                  framings: Mapping[str, SourceFraming] | None = None,
                  max_bytes_in_flight: int = MAX_BYTES_IN_FLIGHT) -> FacesReport:
    """Bring the face store up to date for ``candidates`` (columns source, source_path, sha256).

    ``framings`` says per source how its files become faces (absent: crops). ``ignore_cache``
    decodes every candidate again (a rebuild from scratch) and replaces the store's index with
    exactly these candidates' results. Worker processes are used from ``parallel_min`` new
    images on (a photo to detect counts :data:`DETECT_COST`); results are identical either way.
    ``chunk_fn`` is what decodes a chunk of crops (a worker runs it; tests swap in one that fails).
    ``max_bytes_in_flight`` bounds the file bytes held at once; a ``bytes`` column in ``candidates``
    (the inventory's declared sizes) lets the stage wait for room before reading a file.
    """
    start = time.perf_counter()
    framings = framings or {}
    per_source = {name: f.key for name, f in framings.items()}
    detections = {f.key: f.detection for f in framings.values() if f.detection is not None}
    fns: dict[str, ChunkFn] = {CROP: chunk_fn}
    fns.update({key: functools.partial(process_detect_chunk, detection=d) for key, d in detections.items()})
    cands = candidates[["source", "source_path", "sha256"]].copy()
    declared = pd.to_numeric(candidates["bytes"], errors="coerce").fillna(0).astype("int64") \
        if "bytes" in candidates else pd.Series(0, index=candidates.index, dtype="int64")
    cands["framing"] = cands["source"].map(per_source).fillna(CROP).astype(str) if per_source else CROP
    index = store.load_index()
    if ignore_cache:
        index = index.iloc[0:0]
    first = cands.drop_duplicates(ITEM_KEY)
    known = pd.Index((index["sha256"].astype(str) + "|" + index["framing"].astype(str)).unique()) if len(index) \
        else pd.Index([])  # hash lookups (Series.isin on Arrow strings is slow)
    unit = (first["sha256"].astype(str) + "|" + first["framing"]).to_numpy(dtype=object)
    is_new = known.get_indexer(unit) < 0 if len(known) else np.ones(len(first), bool)
    new = first.loc[is_new].sort_values("framing", key=lambda f: f != CROP, kind="stable")  # crops first
    todo = list(zip(new["sha256"].tolist(), new["source"].tolist(), new["source_path"].tolist(),
                    new["framing"].tolist()))
    sizes = declared.loc[new.index].clip(lower=0).tolist()
    n_detect = int((new["framing"] != CROP).sum())
    workers = max(1, workers or os.cpu_count() or 1)
    use_pool = workers > 1 and len(todo) - n_detect + DETECT_COST * n_detect >= parallel_min
    new_index: list[pd.DataFrame] = []
    pending: list[tuple[str, ChunkResult]] = []
    failures: dict[FailureKey, str] = {}  # (sha256, framing) -> why it could not be read or decoded now (not cached)
    done = detected = 0

    def flush() -> None:
        if not pending:
            return
        faces = np.concatenate([r.faces for _, r in pending])
        part = index_frame([r for _, r in pending], [f for f, _ in pending])
        part["face_ref"] = None
        if len(faces):
            ids = part["sha256"] + "|" + part["framing"] + "|" + part["face_index"].astype(str)
            shard_id = hashlib.sha1("".join(ids).encode()).hexdigest()[:16]
            part.loc[part["reason"].isna(), "face_ref"] = store.write_shard(shard_id, faces)
        new_index.append(part)
        pending.clear()

    def consume(framing: str, result: ChunkResult) -> None:
        nonlocal done, detected
        pending.append((framing, result))
        done += len(set(result.sha256))
        detected += result.detections
        if sum(len(r.faces) for _, r in pending) >= SHARD_ROWS:
            flush()
        if log and done % (CHUNK * 40) < len(set(result.sha256)):
            log(f"faces: {done}/{len(todo)} new images decoded")

    budget = _Budget(max_bytes_in_flight)
    runner: _Serial | _WorkerPool = _WorkerPool(workers, settings) if use_pool else _Serial(settings)
    # a chunk's share of the budget: every chunk the pool may queue, plus the one being built
    chunk_bytes = max(1, budget.limit // (runner.limit + 1))
    try:
        for framing, result in _stream(todo, sizes, fns, read, failures, runner, budget, chunk_bytes):
            consume(framing, result)
    finally:
        if isinstance(runner, _WorkerPool):
            runner.close()
    flush()
    if ignore_cache and not new_index:
        store.save_index(index)
    if new_index:
        index = pd.concat([index, *new_index], ignore_index=True) if len(index) else pd.concat(new_index, ignore_index=True)
        store.save_index(index)
    table = _item_table(cands, index, framings, failures)
    n_detect_units = int((first["framing"] != CROP).sum())
    return FacesReport(table, processed=len(todo), reused=len(first) - len(todo),
                       seconds=time.perf_counter() - start, workers=workers if use_pool else 1,
                       detected=detected, detect_reused=n_detect_units - n_detect,
                       peak_bytes_in_flight=budget.peak)


def _item_table(cands: pd.DataFrame, index: pd.DataFrame, framings: Mapping[str, SourceFraming],
                failures: Mapping[FailureKey, str]) -> pd.DataFrame:
    """One row per item: each candidate joined with its cached outcome(s) under its framing; of a
    ``keep: largest`` source's detected faces only the largest (face index 0)."""
    cols = [c for c in INDEX_COLUMNS if c not in ITEM_KEY]
    table = cands.merge(index[[*ITEM_KEY, *cols]], on=ITEM_KEY, how="left")
    keep_all = {name for name, f in framings.items() if f.keep_all}
    face_index = table["face_index"].fillna(0).astype("int64")  # a file that failed now has no index row
    table = table[(face_index == 0) | table["source"].isin(keep_all)].reset_index(drop=True)
    table["face_index"] = table["face_index"].fillna(0).astype("int64")
    table["faces_found"] = table["faces_found"].astype("Int64")
    for col in ("box_left", "box_top", "box_right", "box_bottom", "detector_score", "mean_intensity",
                "std_intensity"):
        table[col] = table[col].astype("float64")
    if failures:
        unit = list(zip(table["sha256"], table["framing"]))
        failed = pd.Series([failures.get(u) for u in unit], index=table.index, dtype=object)
        table["reason"] = table["reason"].astype(object).where(failed.isna(), failed)
    table["face_key"] = face_keys(table)
    return table[["source", "source_path", "sha256", *cols, "framing", "face_key"]]


FILLS_FRAME = 0.5  # a face box covering at least this share of its image: the image is already a crop
FRAMING_COLUMNS = ["source", "images", "no_face", "several_faces", "fills_frame", "no_face_share",
                   "several_faces_share", "fills_frame_share"]


def framing_shares(table: pd.DataFrame) -> pd.DataFrame:
    """Per source with detected faces: of the images that went through the detector, how many had no
    face, several faces, or a face filling the frame (box area >= :data:`FILLS_FRAME` of the image),
    and those shares. High shares mean the source's framing is probably wrong (crops or group photos
    configured as ``faces: detect``)."""
    seen = table[table["faces_found"].notna()]
    files = seen.sort_values("face_index", kind="stable").drop_duplicates(["source", "source_path"])
    area = (files["box_right"] - files["box_left"]) * (files["box_bottom"] - files["box_top"])
    fills = (area / (files["width"].astype(float) * files["height"].astype(float))).fillna(0) >= FILLS_FRAME
    per = pd.DataFrame({"source": files["source"], "no_face": files["faces_found"] == 0,
                        "several_faces": files["faces_found"] >= 2, "fills_frame": fills})
    out = per.groupby("source").agg(images=("no_face", "size"), no_face=("no_face", "sum"),
                                    several_faces=("several_faces", "sum"), fills_frame=("fills_frame", "sum"))
    for col in ("no_face", "several_faces", "fills_frame"):
        out[col] = out[col].astype("int64")
        out[f"{col}_share"] = (out[col] / out["images"]).round(4)
    return out.reset_index().reindex(columns=FRAMING_COLUMNS)
