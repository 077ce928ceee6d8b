"""The worker side of the faces stage: decode, validate, normalise and hash one chunk of files.

Two framings: a face crop is decoded and centre-cropped (:func:`process_chunk`); a photo of a
``faces: detect`` source goes through the face detector, and each face found is aligned, cut out
and then normalised the same way (:func:`process_detect_chunk`). Only NumPy, Pillow and
threadpoolctl are imported up front (no pandas), so the worker processes start fast; torch is
imported by the first detection. The parent (:mod:`fer_pipeline.faces.stage`) turns results
into tables.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from fer_pipeline.faces.framing import NO_FACE, Detection
from fer_pipeline.faces.phash import phashes, to_hex
from fer_pipeline.faces.preprocess import (
    DecodedFace,
    PreprocessSettings,
    decode_faces,
    open_checked,
    preprocess_image,
    reject_blank,
)

_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height

Box = tuple[float, float, float, float]


@dataclass
class ChunkResult:
    """What a worker returns for one chunk: one entry per *item* in the first eight lists (a file,
    or one face of a file for detected faces), one per *accepted* face (in order) in the rest."""

    sha256: list[str]
    reason: list[str | None]  # None: accepted
    width: list[int | None]  # original size, before orientation/resizing
    height: list[int | None]
    face_index: list[int]  # 0 for crops; the face's rank in its file (largest first) when detected
    faces_found: list[int | None]  # faces the detector found in the file (None: a crop, or not decodable)
    box: list[Box | None]  # the detector's box in pixels of the EXIF-oriented file
    score: list[float | None]
    faces: np.ndarray  # (n_ok, H, W) uint8
    pixel_sha: list[str]  # SHA-256 of the processed pixels: exact duplicates
    phash: list[str]
    phash_mirror: list[str]
    mean_intensity: np.ndarray
    std_intensity: np.ndarray
    detections: int = 0  # images run through the face detector


def _finish(sha256: list[str], decoded: list[DecodedFace], settings: PreprocessSettings,
            face_index: list[int], faces_found: list[int | None], box: list[Box | None],
            score: list[float | None], detections: int = 0) -> ChunkResult:
    """Statistics, thumbnails and perceptual hashes, once for the whole chunk."""
    ok = [d.face for d in decoded if d.ok]
    faces = np.stack(ok) if ok else np.zeros((0, *settings.image_size), np.uint8)  # type: ignore[arg-type]
    flat = faces.reshape(len(faces), faces[0].size if len(faces) else 0)  # (0, -1) cannot be reshaped
    ph, mph = phashes(faces)
    return ChunkResult(
        sha256=sha256, reason=[d.reason for d in decoded],
        width=[d.width for d in decoded], height=[d.height for d in decoded],
        face_index=face_index, faces_found=faces_found, box=box, score=score, faces=faces,
        pixel_sha=[hashlib.sha256(f.tobytes()).hexdigest() for f in faces],
        phash=to_hex(ph), phash_mirror=to_hex(mph),
        mean_intensity=flat.mean(axis=1) if len(flat) else np.zeros(0),
        std_intensity=flat.std(axis=1) if len(flat) else np.zeros(0), detections=detections)


def process_chunk(items: list[tuple[str, bytes]], settings: PreprocessSettings) -> ChunkResult:
    """Decode + validate + hash a chunk of (raw content sha256, bytes) face crops.

    Per-image work is only what Pillow must do (open, decode, orient, resize); statistics,
    thumbnails and perceptual hashes are computed once for the whole chunk."""
    n = len(items)
    return _finish([sha for sha, _ in items], decode_faces([data for _, data in items], settings), settings,
                   [0] * n, [None] * n, [None] * n, [None] * n)


_DETECTORS: dict[tuple[str, str], Any] = {}  # one loaded detector per settings, per process


def _detector(detection: Detection) -> Any:
    from fer_pipeline.faces.detect import make_detector

    options = detection.detector_options()
    key = (detection.detector, json.dumps(options, sort_keys=True))
    if key not in _DETECTORS:  # one torch thread: parallel work comes from the worker processes
        _DETECTORS[key] = make_detector(detection.detector, **options, num_threads=1)
    return _DETECTORS[key]


def detect_file(data: bytes, settings: PreprocessSettings, detection: Detection, detector: Any
                ) -> tuple[list[tuple[int, int | None, Box | None, float | None, DecodedFace]], bool]:
    """The items of one file: (face index, faces found, box, score, decoded face or reason), and
    whether the detector ran. Never raises for bad input: the file's one item gets the reason."""
    from fer_pipeline.faces.detect import align_face, to_rgb

    max_side = getattr(detector, "max_side", None) or 1024
    opened = open_checked(data, settings, ("RGB", (max_side, max_side)))  # big JPEGs decode at >= max_side
    width, height = opened.width, opened.height
    def fail(reason: str) -> tuple[list[tuple[int, int | None, Box | None, float | None, DecodedFace]], bool]:
        return [(0, None, None, None, DecodedFace(None, width, height, reason))], False

    if opened.image is None or width is None or height is None:
        return fail(opened.reason or "unreadable")
    img = opened.image
    try:
        turned = img.getexif().get(0x0112, 1) in _ROTATED
        rgb = to_rgb(img)
    except Exception as exc:  # noqa: BLE001 - e.g. a mode Pillow cannot turn into RGB
        return fail(f"cannot convert to RGB ({img.mode}: {exc})")
    full_w, full_h = (height, width) if turned else (width, height)
    sx, sy = full_w / rgb.width, full_h / rgb.height  # a drafted JPEG decodes smaller than the file
    try:
        found = detector.detect(rgb)
    except Exception as exc:  # noqa: BLE001 - a detector bug on one image must not stop a chunk
        return fail(f"face detection failed ({type(exc).__name__}: {exc})")
    if not found:
        return [(0, 0, None, None, DecodedFace(None, width, height, NO_FACE))], True
    items = []
    for k, face in enumerate(found):
        b = face.box
        box = (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)
        try:
            crop = align_face(rgb, face, detection.margin, settings.image_size)
            decoded = DecodedFace(preprocess_image(crop, settings.image_size), width, height, None)
        except Exception as exc:  # noqa: BLE001
            decoded = DecodedFace(None, width, height, f"face crop failed ({type(exc).__name__}: {exc})")
        items.append((k, len(found), box, float(face.score), decoded))
    return items, True


def process_detect_chunk(items: list[tuple[str, bytes]], settings: PreprocessSettings,
                         detection: Detection) -> ChunkResult:
    """Detect faces in a chunk of (raw content sha256, bytes) photos; every face found becomes one
    item (aligned, cut with the margin, then normalised like a crop), a photo without a face one
    item with the reason :data:`NO_FACE`."""
    detector = _detector(detection)
    sha256: list[str] = []
    rows: list[tuple[int, int | None, Box | None, float | None, DecodedFace]] = []
    detections = 0
    for sha, data in items:
        found, ran = detect_file(data, settings, detection, detector)
        detections += ran
        sha256 += [sha] * len(found)
        rows += found
    decoded = reject_blank([r[4] for r in rows], settings)
    return _finish(sha256, decoded, settings, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                   [r[3] for r in rows], detections)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)


def init_worker() -> None:
    """Worker start-up: one BLAS thread per process, and a malloc that keeps freed memory.

    * Each worker already owns a core; letting NumPy's BLAS start threads of its own in every
      worker oversubscribes the cores, which made two workers no faster than one.
    * Every chunk allocates a few MB of float64 temporaries; glibc hands blocks that large
      back to the kernel on free, so the next chunk page-faults them in again (about 1,500
      faults per chunk, a fifth of the worker's time on a VM). A fixed 32 MB mmap threshold
      keeps them in the heap.
    * SIGTERM back to its default: a worker inherits its launcher's dispositions, and one started
      under a shell or job runner that ignores SIGTERM survives the pool's ``terminate()`` when a
      sibling crashes, blocks writing a result nobody reads, and the interpreter then waits for
      it at exit forever.
    """
    import ctypes
    import ctypes.util
    import signal

    from threadpoolctl import threadpool_limits

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threadpool_limits(1)
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name) if libc_name else None
        if libc is not None and hasattr(libc, "mallopt"):  # glibc; other C libraries keep their defaults
            libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)
    except OSError:
        pass
