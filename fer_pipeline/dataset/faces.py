"""The faces stage: decode, validate and normalise every candidate image, in parallel, once.

Work is keyed by raw content hash in the :class:`~fer_pipeline.dataset.face_store.FaceStore`: files seen
before under the same settings are not read, decoded or hashed again, so re-running after a
source grows only processes the new files. Large batches are decoded in worker processes
(both cores; :mod:`fer_pipeline.dataset.face_batch` is what a worker runs) while the parent streams
bytes out of the sources through a bounded queue, so memory stays bounded.

One bad file is one rejected row, never a failed run: a file that cannot be read now (removed,
permission, above the size cap) or that makes the decoder raise or its worker process die gets
its own reason. Those outcomes are not stored in the face cache (they may not last: a worker
killed for memory, a permission fixed); only what decoding the bytes says about them is.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fer_pipeline.dataset.face_batch import ChunkResult, init_worker, process_chunk
from fer_pipeline.dataset.face_store import INDEX_COLUMNS, FaceStore
from fer_pipeline.dataset.preprocess import PreprocessSettings
from fer_pipeline.dataset.source_readers import MemberError

CHUNK = 128  # images per task sent to a worker
SHARD_ROWS = 20_000  # faces per shard file: bounds the parent's memory on huge sources
PARALLEL_MIN = 10_000  # below this many new images, worker start-up (~1 s: spawn + imports) costs more than it saves
IN_FLIGHT_PER_WORKER = 8  # chunks queued per worker: the parent reads ahead while workers start

ReadFn = Callable[[str, str], bytes]  # (source, source_path) -> raw bytes; raises MemberError when unreadable
Item = tuple[str, bytes]  # (raw content sha256, bytes)
ChunkFn = Callable[[list[Item], PreprocessSettings], ChunkResult]
WORKER_DIED = "decoder crashed (its worker process died)"


class _WorkerDied(RuntimeError):
    """The worker process decoding a file died (crashed, or killed for memory)."""


def index_frame(results: list[ChunkResult]) -> pd.DataFrame:
    """Workers' chunk results as rows of the face index (INDEX_COLUMNS minus face_ref).

    Built once per shard, not per chunk: a DataFrame per 128 images cost the parent process
    more CPU than reading the files."""
    def per_file(col: str) -> list[object]:
        return [v for r in results for v in getattr(r, col)]

    df = pd.DataFrame({col: per_file(col) for col in ("sha256", "reason", "width", "height")})
    ok = df["reason"].isna().to_numpy()
    for col in ("pixel_sha", "phash", "phash_mirror"):
        text = np.full(len(df), None, dtype=object)
        text[ok] = per_file(col)
        df[col] = text
    for col in ("mean_intensity", "std_intensity"):
        numbers = np.full(len(df), np.nan)
        numbers[ok] = per_file(col)
        df[col] = numbers
    return df


def _read_failure(exc: Exception) -> str:
    if isinstance(exc, MemberError):
        return exc.problem.reason
    return f"unreadable ({type(exc).__name__}: {exc})"


def _chunks(todo: list[tuple[str, str, str]], read: ReadFn, failures: dict[str, str]) -> Iterator[list[Item]]:
    """Chunks of (sha256, bytes); a file that cannot be read goes to ``failures`` with its reason."""
    batch: list[Item] = []
    for sha, source, path in todo:
        try:
            batch.append((sha, read(source, path)))
        except Exception as exc:  # noqa: BLE001 - one unreadable file is that file's outcome
            failures[sha] = _read_failure(exc)
            continue
        if len(batch) == CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch


def _decoder_error(exc: BaseException) -> str:
    return f"decoder error ({type(exc).__name__}: {exc})"


def _one_by_one(chunk: list[Item], run: Callable[[list[Item]], ChunkResult],
                failures: dict[str, str]) -> Iterator[ChunkResult]:
    """A chunk that failed as a whole, again file by file: only the file at fault fails."""
    for item in chunk:
        try:
            yield run([item])
        except Exception as exc:  # noqa: BLE001
            failures[item[0]] = _decoder_error(exc)


class _WorkerPool:
    """Worker processes that outlive a failing chunk.

    A chunk whose task raises, or whose worker process dies (the pool is then restarted), is
    run again one file per task, so the file at fault gets the reason and the others their
    faces. Results come back in submission order, at most ``limit`` chunks in flight."""

    def __init__(self, workers: int, settings: PreprocessSettings, chunk_fn: ChunkFn) -> None:
        self.workers, self.settings, self.chunk_fn = workers, settings, chunk_fn
        self.limit = workers * IN_FLIGHT_PER_WORKER
        self.generation = 0  # which pool a future belongs to: restart only the current one
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        ctx = mp.get_context("spawn")  # fork is unsafe inside a threaded Dagster run process
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=init_worker)

    def _restart(self, generation: int) -> None:
        if generation == self.generation:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool, self.generation = self._start(), self.generation + 1

    def _submit(self, items: list[Item]) -> tuple[Future[ChunkResult], int]:
        try:
            return self._pool.submit(self.chunk_fn, items, self.settings), self.generation
        except BrokenProcessPool:  # a worker died since the last result
            self._restart(self.generation)
            return self._pool.submit(self.chunk_fn, items, self.settings), self.generation

    def _run_one(self, items: list[Item]) -> ChunkResult:
        future, generation = self._submit(items)
        try:
            return future.result()
        except BrokenProcessPool:
            self._restart(generation)
            raise _WorkerDied(WORKER_DIED) from None

    def map(self, chunks: Iterator[list[Item]], failures: dict[str, str]) -> Iterator[ChunkResult]:
        in_flight: deque[tuple[Future[ChunkResult], int, list[Item]]] = deque()
        for chunk in chunks:
            in_flight.append((*self._submit(chunk), chunk))
            while len(in_flight) > self.limit:  # bounded: stream, don't buffer a dataset
                yield from self._collect(*in_flight.popleft(), failures)
        while in_flight:
            yield from self._collect(*in_flight.popleft(), failures)

    def _collect(self, future: Future[ChunkResult], generation: int, chunk: list[Item],
                 failures: dict[str, str]) -> Iterator[ChunkResult]:
        try:
            yield future.result()
            return
        except BrokenProcessPool:
            self._restart(generation)
        except Exception:  # noqa: BLE001 - retried file by file below
            pass
        for item in chunk:
            try:
                yield self._run_one([item])
            except Exception as exc:  # noqa: BLE001
                failures[item[0]] = WORKER_DIED if isinstance(exc, _WorkerDied) else _decoder_error(exc)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class FacesReport:
    table: pd.DataFrame  # one row per candidate: source, source_path, sha256 + INDEX_COLUMNS
    processed: int  # distinct images decoded this time
    reused: int  # distinct images found in the cache
    seconds: float
    workers: int


def process_faces(candidates: pd.DataFrame, read: ReadFn, store: FaceStore, settings: PreprocessSettings,
                  workers: int | None = None, log: Callable[[str], None] | None = None,
                  ignore_cache: bool = False, parallel_min: int = PARALLEL_MIN,
                  chunk_fn: ChunkFn = process_chunk) -> FacesReport:
    """Bring the face store up to date for ``candidates`` (columns source, source_path, sha256).

    ``ignore_cache`` decodes every candidate again (a rebuild from scratch) and replaces the
    store's index with exactly these candidates' results. Worker processes are used from
    ``parallel_min`` new images on; results are identical either way. ``chunk_fn`` is what
    decodes a chunk (a worker runs it; tests swap in one that fails).
    """
    start = time.perf_counter()
    index = store.load_index()
    if ignore_cache:
        index = index.iloc[0:0]
    first = candidates.drop_duplicates("sha256")
    known = pd.Index(index["sha256"].to_numpy(dtype=object))  # hash lookups (Series.isin on Arrow strings is slow)
    is_new = known.get_indexer(first["sha256"].to_numpy(dtype=object)) < 0 if len(known) else np.ones(len(first), bool)
    new = first.loc[is_new, ["sha256", "source", "source_path"]]
    todo = list(zip(new["sha256"].tolist(), new["source"].tolist(), new["source_path"].tolist()))
    workers = max(1, workers or os.cpu_count() or 1)
    use_pool = workers > 1 and len(todo) >= parallel_min
    new_index: list[pd.DataFrame] = []
    pending: list[ChunkResult] = []
    failures: dict[str, str] = {}  # sha256 -> why it could not be read or decoded now (not cached)
    done = 0

    def flush() -> None:
        if not pending:
            return
        faces = np.concatenate([r.faces for r in pending])
        part = index_frame(pending)
        part["face_ref"] = None
        if len(faces):
            shard_id = hashlib.sha1("".join(part["sha256"]).encode()).hexdigest()[:16]
            part.loc[part["reason"].isna(), "face_ref"] = store.write_shard(shard_id, faces)
        new_index.append(part)
        pending.clear()

    def consume(result: ChunkResult) -> None:
        nonlocal done
        pending.append(result)
        done += len(result.sha256)
        if sum(len(r.faces) for r in pending) >= SHARD_ROWS:
            flush()
        if log and done % (CHUNK * 40) < CHUNK:
            log(f"faces: {done}/{len(todo)} new images decoded")

    chunks = _chunks(todo, read, failures)
    if use_pool:
        pool = _WorkerPool(workers, settings, chunk_fn)
        try:
            for result in pool.map(chunks, failures):
                consume(result)
        finally:
            pool.close()
    else:
        for chunk in chunks:
            try:
                consume(chunk_fn(chunk, settings))
            except Exception:  # noqa: BLE001 - find the file at fault
                for result in _one_by_one(chunk, lambda items: chunk_fn(items, settings), failures):
                    consume(result)
    flush()
    if ignore_cache and not new_index:
        store.save_index(index)
    if new_index:
        index = pd.concat([index, *new_index], ignore_index=True) if len(index) else pd.concat(new_index, ignore_index=True)
        store.save_index(index)
    table = candidates[["source", "source_path", "sha256"]].merge(index[INDEX_COLUMNS], on="sha256", how="left")
    if failures:
        failed = table["sha256"].map(failures)
        table["reason"] = table["reason"].astype(object).where(failed.isna(), failed)
    return FacesReport(table, processed=len(todo), reused=len(first) - len(todo),
                       seconds=time.perf_counter() - start, workers=workers if use_pool else 1)
