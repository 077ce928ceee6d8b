"""The faces stage on real files: worker processes give exactly the in-process result, and
the content-addressed cache means a second run decodes nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from fer_pipeline.faces.store import FaceStore, load_faces
from fer_pipeline.faces.stage import CHUNK, process_faces
from fer_pipeline.faces.preprocess import PreprocessSettings
from fer_pipeline_tests.conftest import face_png


def _candidates(n: int) -> tuple[pd.DataFrame, dict[str, bytes]]:
    files = {f"img/{i:04d}.png": face_png(i) for i in range(n)}
    files["img/broken.png"] = face_png(1)[:150]
    files["img/text.png"] = b"not an image at all"
    files["img/copy_of_0.png"] = files["img/0000.png"]  # same bytes under another name
    rows = [{"source": "s", "source_path": p, "sha256": hashlib.sha256(d).hexdigest()} for p, d in files.items()]
    return pd.DataFrame(rows), files


def _face_table(root: Path, table: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    ok = table[table["reason"].isna()]
    cols = ["source_path", "reason", "width", "height", "pixel_sha", "phash", "phash_mirror",
            "mean_intensity", "std_intensity"]
    return table[cols].sort_values("source_path").reset_index(drop=True), load_faces(root, ok.sort_values("source_path")["face_ref"])


def test_worker_processes_match_in_process_and_cache_is_reused(tmp_path: Path) -> None:
    n = CHUNK * 2 + 17  # several chunks, one partial
    cands, files = _candidates(n)
    settings = PreprocessSettings()

    def read(source: str, path: str) -> bytes:
        return files[path]

    results = {}
    for label, workers, parallel_min in (("serial", 1, 10**9), ("pool", 2, 0)):
        root = tmp_path / label
        report = process_faces(cands, read, FaceStore(root, settings.key), settings, workers=workers,
                               parallel_min=parallel_min)
        assert report.workers == workers
        assert report.processed == n + 2 and report.reused == 0  # the byte-identical copy is decoded once
        results[label] = _face_table(root, report.table)
    (serial, serial_px), (pool, pool_px) = results["serial"], results["pool"]
    pd.testing.assert_frame_equal(serial, pool)
    assert np.array_equal(serial_px, pool_px) and len(serial_px) == n + 1
    reasons = serial.set_index("source_path")["reason"]
    assert reasons["img/broken.png"].startswith("unreadable or truncated")
    assert reasons["img/text.png"].startswith("not an image")

    again = process_faces(cands, read, FaceStore(tmp_path / "pool", settings.key), settings, workers=2,
                          parallel_min=0)
    assert again.processed == 0 and again.reused == n + 2
    pd.testing.assert_frame_equal(_face_table(tmp_path / "pool", again.table)[0], pool)


def _sigterm_ignored(_: object) -> bool:
    import signal

    return signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_face_workers_can_be_terminated_even_when_the_launcher_ignores_sigterm() -> None:
    """A pool whose sibling worker crashed terminates the others; a worker that inherited an
    ignored SIGTERM (a job runner's disposition) would survive, block on a full result pipe,
    and hang interpreter exit. The worker initializer restores the default."""
    import multiprocessing as mp
    import signal
    from concurrent.futures import ProcessPoolExecutor

    from fer_pipeline.faces.batch import init_worker

    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=init_worker) as pool:
            assert pool.submit(_sigterm_ignored, None).result() is False
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:  # the inherited case
            assert pool.submit(_sigterm_ignored, None).result() is True
    finally:
        signal.signal(signal.SIGTERM, before)
