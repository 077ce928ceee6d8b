"""The faces stage: decode, validate and normalise every candidate image, in parallel, once.

Work is keyed by raw content hash in the :class:`~fer_pipeline.dataset.face_store.FaceStore`: files seen
before under the same settings are not read, decoded or hashed again, so re-running after a
source grows only processes the new files. Large batches are decoded in worker processes
(both cores; :mod:`fer_pipeline.dataset.face_batch` is what a worker runs) while the parent streams
bytes out of the sources through a bounded queue, so memory stays bounded.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fer_pipeline.dataset.face_batch import ChunkResult, init_worker, process_chunk
from fer_pipeline.dataset.face_store import INDEX_COLUMNS, FaceStore
from fer_pipeline.dataset.preprocess import PreprocessSettings

CHUNK = 128  # images per task sent to a worker
SHARD_ROWS = 20_000  # faces per shard file: bounds the parent's memory on huge sources
PARALLEL_MIN = 10_000  # below this many new images, worker start-up (~1 s: spawn + imports) costs more than it saves
IN_FLIGHT_PER_WORKER = 8  # chunks queued per worker: the parent reads ahead while workers start

ReadFn = Callable[[str, str], bytes]  # (source, source_path) -> raw bytes


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


def _chunks(todo: list[tuple[str, str, str]], read: ReadFn) -> Iterator[list[tuple[str, bytes]]]:
    batch: list[tuple[str, bytes]] = []
    for sha, source, path in todo:
        batch.append((sha, read(source, path)))
        if len(batch) == CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class FacesReport:
    table: pd.DataFrame  # one row per candidate: source, source_path, sha256 + INDEX_COLUMNS
    processed: int  # distinct images decoded this time
    reused: int  # distinct images found in the cache
    seconds: float
    workers: int


def process_faces(candidates: pd.DataFrame, read: ReadFn, store: FaceStore, settings: PreprocessSettings,
                  workers: int | None = None, log: Callable[[str], None] | None = None,
                  ignore_cache: bool = False, parallel_min: int = PARALLEL_MIN) -> FacesReport:
    """Bring the face store up to date for ``candidates`` (columns source, source_path, sha256).

    ``ignore_cache`` decodes every candidate again (a rebuild from scratch) and replaces the
    store's index with exactly these candidates' results. Worker processes are used from
    ``parallel_min`` new images on; results are identical either way.
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

    if use_pool:
        ctx = mp.get_context("spawn")  # fork is unsafe inside a threaded Dagster run process
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker) as pool:
            in_flight = []
            for chunk in _chunks(todo, read):
                in_flight.append(pool.submit(process_chunk, chunk, settings))
                while len(in_flight) > workers * IN_FLIGHT_PER_WORKER:  # bounded: stream, don't buffer a dataset
                    consume(in_flight.pop(0).result())
            for fut in in_flight:
                consume(fut.result())
    else:
        for chunk in _chunks(todo, read):
            consume(process_chunk(chunk, settings))
    flush()
    if ignore_cache and not new_index:
        store.save_index(index)
    if new_index:
        index = pd.concat([index, *new_index], ignore_index=True) if len(index) else pd.concat(new_index, ignore_index=True)
        store.save_index(index)
    table = candidates[["source", "source_path", "sha256"]].merge(index[INDEX_COLUMNS], on="sha256", how="left")
    return FacesReport(table, processed=len(todo), reused=len(first) - len(todo),
                       seconds=time.perf_counter() - start, workers=workers if use_pool else 1)
