"""The worker side of the faces stage: decode, validate, normalise and hash one chunk of files.

Only NumPy, Pillow and threadpoolctl are imported here (no pandas), so the worker processes of
the faces stage start fast; the parent (:mod:`fer_pipeline.dataset.faces`) turns results into tables.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fer_pipeline.dataset.phash import phashes, to_hex
from fer_pipeline.dataset.preprocess import PreprocessSettings, decode_faces


@dataclass
class ChunkResult:
    """What a worker returns for one chunk: one entry per file in the first four lists, one per
    *accepted* face (in order) in the rest."""

    sha256: list[str]
    reason: list[str | None]  # None: accepted
    width: list[int | None]  # original size, before orientation/resizing
    height: list[int | None]
    faces: np.ndarray  # (n_ok, H, W) uint8
    pixel_sha: list[str]  # SHA-256 of the processed pixels: exact duplicates
    phash: list[str]
    phash_mirror: list[str]
    mean_intensity: np.ndarray
    std_intensity: np.ndarray


def process_chunk(items: list[tuple[str, bytes]], settings: PreprocessSettings) -> ChunkResult:
    """Decode + validate + hash a chunk of (raw content sha256, bytes).

    Per-image work is only what Pillow must do (open, decode, orient, resize); statistics,
    thumbnails and perceptual hashes are computed once for the whole chunk."""
    decoded = decode_faces([data for _, data in items], settings)
    ok = [d.face for d in decoded if d.ok]
    faces = np.stack(ok) if ok else np.zeros((0, *settings.image_size), np.uint8)  # type: ignore[arg-type]
    flat = faces.reshape(len(faces), faces[0].size if len(faces) else 0)  # (0, -1) cannot be reshaped
    ph, mph = phashes(faces)
    return ChunkResult(
        sha256=[sha for sha, _ in items], reason=[d.reason for d in decoded],
        width=[d.width for d in decoded], height=[d.height for d in decoded], faces=faces,
        pixel_sha=[hashlib.sha256(f.tobytes()).hexdigest() for f in faces],
        phash=to_hex(ph), phash_mirror=to_hex(mph),
        mean_intensity=flat.mean(axis=1) if len(flat) else np.zeros(0),
        std_intensity=flat.std(axis=1) if len(flat) else np.zeros(0))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)


def init_worker() -> None:
    """Worker start-up: one BLAS thread per process, and a malloc that keeps freed memory.

    * Each worker already owns a core; letting NumPy's BLAS start threads of its own in every
      worker oversubscribes the cores, which made two workers no faster than one.
    * Every chunk allocates a few MB of float64 temporaries; glibc hands blocks that large
      back to the kernel on free, so the next chunk page-faults them in again (about 1,500
      faults per chunk, a fifth of the worker's time on a VM). A fixed 32 MB mmap threshold
      keeps them in the heap.
    """
    import ctypes
    import ctypes.util

    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name) if libc_name else None
        if libc is not None and hasattr(libc, "mallopt"):  # glibc; other C libraries keep their defaults
            libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)
    except OSError:
        pass
