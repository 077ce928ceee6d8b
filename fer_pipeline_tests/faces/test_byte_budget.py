"""Memory bounded by bytes (issue 19): the faces stage never holds more file bytes than its budget
whatever the file sizes, a file larger than the budget is still processed (alone), and big
images are decoded small (JPEG draft, box reduce) into the same face."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_pipeline.faces import preprocess
from fer_pipeline.faces.batch import ChunkResult, process_chunk
from fer_pipeline.faces.preprocess import PreprocessSettings, decode_face, open_checked
from fer_pipeline.faces.stage import process_faces
from fer_pipeline.faces.store import FaceStore

KB = 1024


def _scene(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth RGB picture (low frequencies only): its face does not depend on the resampler."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = 128 + 60 * np.sin(x * (3 + seed)) + 50 * np.cos(y * (2 + seed % 3))
    return np.clip(np.stack([base, base * 0.9, base * 1.1], -1), 0, 255).astype(np.uint8)


def _jpeg(size: int, seed: int) -> bytes:
    """A real JPEG of exactly ``size`` bytes: an encoded picture and a trailer after its end marker."""
    buf = io.BytesIO()
    Image.fromarray(_scene(64 + seed % 7, 64, seed), "RGB").save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    assert len(data) < size
    return data + bytes([seed % 251]) * (size - len(data))


def _files(sizes: list[int]) -> tuple[pd.DataFrame, dict[str, bytes]]:
    files = {f"img/{i:04d}.jpg": _jpeg(s, i) for i, s in enumerate(sizes)}
    rows = [{"source": "s", "source_path": p, "sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)}
            for p, d in files.items()]
    return pd.DataFrame(rows), files


class _Meter:
    """Counts bytes read and bytes decoded (in this process) independently of the stage."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.read_bytes, self.decoded_bytes = files, 0, 0
        self.max_held = 0
        self.held_at_read: dict[str, int] = {}

    def read(self, source: str, path: str) -> bytes:
        data = self.files[path]
        self.read_bytes += len(data)
        held = self.read_bytes - self.decoded_bytes
        self.held_at_read[path] = held
        self.max_held = max(self.max_held, held)
        return data

    def chunk(self, items: list[tuple[str, bytes]], settings: PreprocessSettings) -> ChunkResult:
        self.decoded_bytes += sum(len(d) for _, d in items)
        return process_chunk(items, settings)


def test_read_ahead_never_holds_more_than_the_byte_budget(tmp_path: Path) -> None:
    sizes = [(10 + (i * 7) % 31) * KB for i in range(150)]  # 10-40 KB, 3.7 MB in all
    budget = 100 * KB
    cands, files = _files(sizes)
    meter = _Meter(files)
    settings = PreprocessSettings()
    report = process_faces(cands, meter.read, FaceStore(tmp_path, settings.key), settings, workers=1,
                           chunk_fn=meter.chunk, max_bytes_in_flight=budget)
    assert meter.read_bytes == meter.decoded_bytes == sum(sizes)  # every file read once, decoded once
    assert 40 * KB < meter.max_held <= budget  # bounded, and the budget was used (not one file at a time)
    assert report.peak_bytes_in_flight == meter.max_held
    assert report.table["reason"].isna().all() and len(report.table) == len(sizes)


def test_a_file_larger_than_the_budget_is_processed_alone(tmp_path: Path) -> None:
    sizes = [20 * KB] * 10 + [300 * KB] + [20 * KB] * 10
    cands, files = _files(sizes)
    meter = _Meter(files)
    settings = PreprocessSettings()
    report = process_faces(cands, meter.read, FaceStore(tmp_path, settings.key), settings, workers=1,
                           chunk_fn=meter.chunk, max_bytes_in_flight=100 * KB)
    big = "img/0010.jpg"
    assert meter.held_at_read[big] == 300 * KB  # nothing else held while it was read
    assert max(v for k, v in meter.held_at_read.items() if k != big) <= 100 * KB
    row = report.table.set_index("source_path").loc[big]
    assert pd.isna(row["reason"]) and row["width"] == 64 + 10 % 7


def test_worker_processes_keep_the_byte_budget(tmp_path: Path) -> None:
    sizes = [(8 + (i * 5) % 41) * KB for i in range(120)]  # 8-48 KB, 3.3 MB in all
    budget = 120 * KB
    cands, files = _files(sizes)
    settings = PreprocessSettings()
    reports = {}
    for label, workers, parallel_min in (("serial", 1, 10**9), ("pool", 2, 0)):
        reports[label] = process_faces(cands, lambda _s, p: files[p], FaceStore(tmp_path / label, settings.key),
                                       settings, workers=workers, parallel_min=parallel_min,
                                       max_bytes_in_flight=budget)
    pool = reports["pool"]
    assert pool.workers == 2
    assert 48 * KB < pool.peak_bytes_in_flight <= budget
    cols = ["source_path", "reason", "pixel_sha", "phash"]
    serial_t = reports["serial"].table[cols].sort_values("source_path").reset_index(drop=True)
    pool_t = pool.table[cols].sort_values("source_path").reset_index(drop=True)
    pd.testing.assert_frame_equal(serial_t, pool_t)
    assert pool_t["reason"].isna().all()


def _full_decode_face(data: bytes, settings: PreprocessSettings) -> np.ndarray:
    """The face without any shortcut: every pixel decoded, no reduce (the reference)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return preprocess.preprocess_image(img, settings.image_size)


def test_big_jpeg_is_decoded_at_a_reduced_scale_into_the_expected_face(monkeypatch: pytest.MonkeyPatch) -> None:
    w, h = 4000, 3000  # 12 MP
    buf = io.BytesIO()
    Image.fromarray(_scene(w, h, 3), "RGB").save(buf, "JPEG", quality=92)
    data = buf.getvalue()
    settings = PreprocessSettings()
    opened = open_checked(data, settings, ("L", (48, 48)))
    assert opened.image is not None and (opened.width, opened.height) == (w, h)
    assert opened.image.width <= w // 8 and opened.image.height >= 48  # draft: 1/8 scale, never below the target
    face = decode_face(data, settings)
    assert face.ok and face.face is not None and face.face.shape == (48, 48) and (face.width, face.height) == (w, h)
    monkeypatch.setattr(preprocess, "REDUCE_ABOVE", 10**12)
    reference = _full_decode_face(data, settings)
    diff = np.abs(face.face.astype(int) - reference.astype(int))
    assert diff.mean() < 1.5 and diff.max() <= 6


def test_big_png_is_reduced_before_conversion_into_the_same_face(monkeypatch: pytest.MonkeyPatch) -> None:
    w, h = 2600, 2000  # 5.2 MP: above REDUCE_ABOVE
    rgba = np.dstack([_scene(w, h, 5), np.full((h, w), 180, np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG", compress_level=1)
    data = buf.getvalue()
    settings = PreprocessSettings()
    reduced = decode_face(data, settings)
    monkeypatch.setattr(preprocess, "REDUCE_ABOVE", 10**12)
    full = decode_face(data, settings)
    assert reduced.ok and full.ok and reduced.face is not None and full.face is not None
    diff = np.abs(reduced.face.astype(int) - full.face.astype(int))
    assert diff.max() <= 2  # box average then bilinear vs bilinear alone: rounding only
